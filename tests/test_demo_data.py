"""ndclip.demo: the generated image-caption set (schema, sizes, determinism, held-out split, captions that name the
class) and the tiny model + processor built for it. The minutes-long training is not run here."""

import re

import numpy as np
import pytest
import torch
from datasets import ClassLabel, DatasetDict, Image, List, Value
from PIL import Image as PILImage

from modeling_ndclip import NdClipModel
from ndclip.data import without_image_decoding
from ndclip.demo import (
    DEMO_CLASS_NAMES,
    DEMO_TRAINING_DEFAULTS,
    DEMO_ZERO_SHOT_TEMPLATE,
    demo_model_and_processor,
    draw_shape_image,
    make_demo_dataset,
    write_demo_examples,
)
from ndclip.tiny_towers import train_wordpiece_tokenizer
from processing_ndclip import NdClipProcessor


@pytest.fixture(scope="module")
def default_demo():
    """The data set `run_clip.py --preset demo` trains on (about 2 s to generate)."""
    return make_demo_dataset()


@pytest.fixture(scope="module")
def small_demo():
    return make_demo_dataset(num_train=24, num_validation=12, seed=3)


@pytest.fixture(scope="module")
def model_and_processor(default_demo):
    return demo_model_and_processor(default_demo, seed=0)


def pixel_bytes(split) -> list[bytes]:
    """Each image's PNG file: equal files are equal pixels, and reading them skips decoding thousands of images."""
    return [image["bytes"] for image in without_image_decoding(split)["image"]]


def test_schema(small_demo):
    assert isinstance(small_demo, DatasetDict)
    assert set(small_demo) == {"train", "validation"}
    features = small_demo["train"].features
    assert isinstance(features["image"], Image)
    assert features["captions"] == List(Value("string"), length=5)
    assert features["image_id"] == Value("int64")
    assert isinstance(features["label"], ClassLabel)
    assert features["label"].names == DEMO_CLASS_NAMES
    for split in small_demo.values():
        assert split["image_id"] == list(range(len(split)))
        image = split[0]["image"]
        assert image.mode == "RGB" and image.size == (32, 32)


def test_default_sizes_meet_the_spec(default_demo):
    # The spec's targets are measured over at least 100 held-out images and at least 4 classes.
    assert len(default_demo["validation"]) >= 100
    assert len(default_demo["train"]) >= 10 * len(default_demo["validation"])
    for split in default_demo.values():
        counts = np.bincount(split["label"], minlength=len(DEMO_CLASS_NAMES))
        assert counts.min() > 0 and counts.max() - counts.min() <= 1, counts  # every class, balanced


def test_same_seed_same_data_other_seed_other_data(small_demo):
    again = make_demo_dataset(num_train=24, num_validation=12, seed=3)
    other = make_demo_dataset(num_train=24, num_validation=12, seed=4)
    for split in ("train", "validation"):
        assert pixel_bytes(again[split]) == pixel_bytes(small_demo[split])
        assert again[split]["captions"] == small_demo[split]["captions"]
        assert pixel_bytes(other[split]) != pixel_bytes(small_demo[split])


def test_validation_images_are_not_in_train(default_demo):
    train, validation = set(pixel_bytes(default_demo["train"])), pixel_bytes(default_demo["validation"])
    assert not train & set(validation)
    assert len(set(validation)) == len(validation)  # no duplicates inside the held-out split either


def test_captions_name_their_class_and_only_it(default_demo):
    names = DEMO_CLASS_NAMES
    for split in default_demo.values():
        for captions, label in zip(split["captions"], split["label"]):
            assert len(set(captions)) == len(captions), captions  # different phrasings, not copies
            for caption in captions:
                mentioned = {name for name in names if re.search(rf"\b{name}\b", caption)}
                assert mentioned == {names[label]}, (caption, names[label])


def test_shapes_are_drawn_differently():
    # Same attributes and the same noise, only the shape changes: the pictures must differ clearly, not by a few
    # edge pixels (the circle and the square differ by their corners, about 14% of a large shape's image).
    attributes = {"colour": "red", "background": "white", "size": "large"}
    pictures = [
        np.asarray(draw_shape_image({**attributes, "shape": name}, 32, np.random.default_rng(0)))
        for name in DEMO_CLASS_NAMES
    ]
    for i in range(len(pictures)):
        for j in range(i + 1, len(pictures)):
            differing = (pictures[i] != pictures[j]).any(axis=-1).mean()
            assert differing > 0.05, (DEMO_CLASS_NAMES[i], DEMO_CLASS_NAMES[j], differing)


def test_model_and_processor_types_and_sizes(model_and_processor):
    # The image size comes from the data (32 by default); the text tower's vocabulary is the trained tokenizer's.
    model, processor = model_and_processor
    assert isinstance(model, NdClipModel) and isinstance(processor, NdClipProcessor)
    assert model.config.vision_config.image_size == 32
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.config.text_config.max_position_embeddings >= DEMO_TRAINING_DEFAULTS["max_seq_length"]


def test_tokenizer_knows_every_demo_word(model_and_processor, default_demo):
    # The tokenizer was trained on the training captions (and the prompts). The vocabulary is closed, so every
    # word of both splits and of the zero-shot prompts must be one whole token: no [UNK], and not even split into
    # word pieces (which a tokenizer trained on too little text would do for the words it missed).
    _, processor = model_and_processor
    tokenizer = processor.tokenizer
    texts = {caption for split in default_demo.values() for captions in split["captions"] for caption in captions}
    texts = sorted(texts) + [DEMO_ZERO_SHOT_TEMPLATE.format(name) for name in DEMO_CLASS_NAMES]
    words = {word for text in texts for word in re.findall(r"\w+|[^\w\s]", text)}
    assert {"circle", "photo", "orange", "background"} <= words
    for word in words:
        assert tokenizer.tokenize(word) == [word], word
    ids = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert max(len(row) for row in ids) <= DEMO_TRAINING_DEFAULTS["max_seq_length"]


def test_forward_on_a_processed_demo_batch(model_and_processor, small_demo):
    model, processor = model_and_processor
    rows = small_demo["train"][:4]
    batch = processor(text=[captions[0] for captions in rows["captions"]], images=rows["image"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (4, 4)
    assert out.image_embeds.shape == (4, model.config.projection_dim)
    assert torch.isfinite(out.loss)


def test_same_seed_same_initial_weights(small_demo):
    first, _ = demo_model_and_processor(small_demo, seed=1)
    second, _ = demo_model_and_processor(small_demo, seed=1)
    other, _ = demo_model_and_processor(small_demo, seed=2)
    torch.testing.assert_close(first.state_dict(), second.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))



def test_same_data_same_tokenizer_whatever_the_caption_order(small_demo):
    """The tokenizer is part of what a seed must fix: `tokenizers`' WordPiece trainer broke ties between equally
    frequent pairs differently on every call, so two demo runs with one seed trained different models."""
    texts = [caption for captions in small_demo["train"]["captions"] for caption in captions]
    _, first = demo_model_and_processor(small_demo, seed=1)
    again = train_wordpiece_tokenizer(texts, vocab_size=len(first.tokenizer) + 100)
    shuffled = train_wordpiece_tokenizer(texts[::-1], vocab_size=len(first.tokenizer) + 100)
    _, second = demo_model_and_processor(small_demo, seed=1)
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    assert again.get_vocab() == shuffled.get_vocab()
    assert first.tokenizer.tokenize("a big red circle") == ["a", "big", "red", "circle"]


def test_readme_examples_are_the_first_held_out_images_and_their_captions(tmp_path):
    images, captions_file = write_demo_examples(tmp_path, count=3)
    validation = make_demo_dataset(seed=0)["validation"]
    assert [path.name for path in images] == ["val_0.png", "val_1.png", "val_2.png"]
    for path, row in zip(images, validation):
        with PILImage.open(path) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(row["image"].convert("RGB")))
    lines = captions_file.read_text().splitlines()
    expected = [caption for row in validation.select(range(3)) for caption in row["captions"]]
    assert lines == list(dict.fromkeys(expected)) and len(lines) > 3
