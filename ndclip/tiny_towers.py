"""Small NdCLIP parts that need no download: tower configs, a WordPiece tokenizer built from given texts, an image
processor. The offline demo (`ndclip.demo`, `run_clip.py --preset demo`), the tests and the benchmarks build their
models here."""

from collections import Counter
from collections.abc import Iterable

from tokenizers import normalizers, pre_tokenizers
from transformers import DistilBertConfig, DistilBertTokenizer, ViTConfig, ViTImageProcessor

from configuration_ndclip import NdClipConfig
from processing_ndclip import NdClipProcessor

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, max_length: int = 64
) -> DistilBertTokenizer:
    """A lower-casing WordPiece tokenizer (DistilBERT's kind) whose vocabulary is built from `texts`, the same in every
    process.

    The vocabulary is WordPiece's alphabet -- each character that starts a word, and each that continues one as
    `##c` -- then whole words, most frequent first, ties in alphabetical order, up to `vocab_size`. The `tokenizers`
    library's `WordPieceTrainer` is not used: it breaks ties between equally frequent pairs in hash-map order, which
    differs from process to process, so two runs with the same seed would get different tokenizers, models and
    numbers. Words left out of the vocabulary are split into characters; a word with a character the texts never
    put in that position is `[UNK]`, as with a trained WordPiece.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    starts = sorted({word[0] for word in counts})
    continuations = sorted({f"##{char}" for word in counts for char in word[1:]})
    vocab = list(dict.fromkeys(SPECIAL_TOKENS + starts + continuations))
    known = set(vocab)
    words = sorted((word for word in counts if word not in known), key=lambda word: (-counts[word], word))
    vocab += words[: max(0, vocab_size - len(vocab))]
    return DistilBertTokenizer(vocab={token: index for index, token in enumerate(vocab)}, model_max_length=max_length)


def tiny_vision_config(image_size: int = 30, patch_size: int = 2, hidden_size: int = 32, layers: int = 2) -> ViTConfig:
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
    )


def tiny_text_config(vocab_size: int, dim: int = 32, layers: int = 2, max_length: int = 64) -> DistilBertConfig:
    return DistilBertConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=layers,
        n_heads=4,
        hidden_dim=dim * 2,
        max_position_embeddings=max_length,
    )


def tiny_config(vocab_size: int, image_size: int = 30, projection_dim: int = 16, **kwargs) -> NdClipConfig:
    """An NdCLIP config with tiny towers (ViT image 30 / patch 2 / hidden 32, DistilBERT 2 layers / dim 32)."""
    return NdClipConfig(
        vision_config=tiny_vision_config(image_size=image_size).to_dict(),
        text_config=tiny_text_config(vocab_size).to_dict(),
        projection_dim=projection_dim,
        **kwargs,
    )


def tiny_processor(texts: Iterable[str], image_size: int = 30, vocab_size: int = 1000) -> NdClipProcessor:
    image_processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    return NdClipProcessor(image_processor=image_processor, tokenizer=train_wordpiece_tokenizer(texts, vocab_size))
