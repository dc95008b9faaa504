"""Length-grouped batches: how much caption padding they remove, and what that would save in a training step.

`run_clip.py` pads each batch's captions to the longest one in it (dynamic padding). Grouping captions of similar
length into the same batch (transformers' `LengthGroupedSampler`: shuffled mega-batches of 50 batches, sorted by
length within) pads less. This measures whether that is worth having:

- Padding: the captions' token lengths (with [CLS] and [SEP], truncated at 64), drawn with replacement to
  `--samples` training samples (default 8000, Flickr8k's images: the grouping works within mega-batches of 50
  batches, so the size of the epoch matters, not that of the caption file), then `--epochs` shuffled epochs of
  full batches each way (a seeded random permutation, as run_clip.py's sampler; `LengthGroupedSampler` with a
  seeded generator). `padded_length` is the mean over batches of the longest caption in the batch;
  `padding_fraction` the share of the padded tokens that are padding.
- Step time: the training step of `bench_train_step.py` (`workloads.make_train_step`: NdCLIP, forward with the
  contrastive loss, backward, AdamW) on random batches whose captions are `padded_length` tokens long (rounded),
  each way, interleaved over `--rounds` rounds; `grouped_vs_random_throughput` is the ratio of the median step
  times. Only the text tower's work changes: at the real size it runs ~15-25 tokens beside the image tower's 197.

Captions: `--captions_file` is a Flickr8k `Flickr8k.token.txt`, a Kaggle `captions.txt` or a text file with one
caption per line; without it, the templated captions of `ndclip.layouts.captions_of` (much more uniform in length
than real ones: pass real captions for a real answer). The tokenizer is a WordPiece one trained on the captions
(`ndclip.tiny_towers.train_wordpiece_tokenizer`; on Flickr8k's everyday words its lengths are close to DistilBERT's), or
`--tokenizer` (a saved tokenizer folder).

Not measured here: grouping by length also changes which captions meet as negatives in the contrastive loss (short
ones against short ones), which can change what the model learns.

    python benchmarks/bench_length_grouping.py
    python benchmarks/bench_length_grouping.py --captions_file Flickr8k_text/Flickr8k.token.txt --size real
"""

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
from common import add_common_args, emit, finish, hardware_info, setup_torch, summarize, time_interleaved
from transformers import AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler
from workloads import DEFAULT_BATCH, MAX_SEQ_LENGTH, SIZES, build_model, make_inputs, make_train_step

from ndclip.data import read_flickr8k_tokens, read_kaggle_captions
from ndclip.layouts import captions_of
from ndclip.tiny_towers import train_wordpiece_tokenizer

VOCAB_SIZE = 3000
DEFAULT_ROUNDS = {"tiny": 20, "real": 6}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions_file", help="Flickr8k.token.txt, Kaggle captions.txt, or one caption per line")
    parser.add_argument("--tokenizer", help="a saved tokenizer folder (default: WordPiece trained on the captions)")
    parser.add_argument("--images", type=int, default=400, help="generated images x 5 captions, without a file")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--batch_size", type=int, default=None, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--samples", type=int, default=8000, help="training samples per simulated epoch")
    parser.add_argument("--epochs", type=int, default=5, help="simulated epochs of batches for the padding")
    parser.add_argument("--rounds", type=int, default=None, help=f"timed steps each way, default {DEFAULT_ROUNDS}")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no_timing", action="store_true", help="padding only")
    add_common_args(parser)
    return parser.parse_args(argv)


def read_captions(path: str | None, images: int) -> list[str]:
    """The captions of `path`, read by the data layer's own Flickr8k readers (which name the file and line of a
    malformed entry), or of `images` generated images."""
    if path is None:
        return [caption for number in range(images) for caption in captions_of(number)]
    with open(path, encoding="utf-8") as file:
        first_line = file.readline()
    if first_line.strip().lower() == "image,caption":  # Kaggle's captions.txt
        by_image = read_kaggle_captions(path)
    elif "#" in first_line.split("\t")[0]:  # Flickr8k.token.txt: "<image>#<n>\t<caption>"
        by_image = read_flickr8k_tokens(path)
    else:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [caption for captions in by_image.values() for caption in captions]


def token_lengths(captions: list[str], tokenizer) -> list[int]:
    encoded = tokenizer(captions, truncation=True, max_length=MAX_SEQ_LENGTH)
    return [len(ids) for ids in encoded["input_ids"]]


def epoch_batches(lengths: list[int], batch_size: int, epochs: int, seed: int, grouped: bool) -> list[list[int]]:
    """The full batches (lists of caption indices) of `epochs` shuffled epochs."""
    batches = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        if grouped:
            order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
        else:
            order = torch.randperm(len(lengths), generator=generator).tolist()
        batches += [order[start : start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]
    return batches


def padding_statistics(lengths: list[int], batches: list[list[int]]) -> dict:
    padded = [max(lengths[i] for i in batch) for batch in batches]
    real_tokens = sum(lengths[i] for batch in batches for i in batch)
    padded_tokens = sum(length * len(batch) for length, batch in zip(padded, batches, strict=True))
    return {
        "batches": len(batches),
        "padded_length": statistics.mean(padded),
        "padded_length_median": statistics.median(padded),
        "padding_fraction": 1 - real_tokens / padded_tokens,
    }


def measure_steps(args, batch_size: int, lengths: dict[str, int]) -> dict:
    model = build_model(args.size, "ndlinear", args.seed, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    candidates = {
        way: make_train_step(model, optimizer, make_inputs(model.config, batch_size, args.seed, args.device, length),
                             args.device, "fp32")
        for way, length in lengths.items()
    }
    times = time_interleaved(candidates, rounds=args.rounds or DEFAULT_ROUNDS[args.size], warmup=args.warmup,
                             device=args.device, alternate_order=True)
    return {way: {**summarize(seconds), "samples_per_s": batch_size / statistics.median(seconds),
                  "caption_tokens": lengths[way]} for way, seconds in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    batch_size = args.batch_size or DEFAULT_BATCH[args.size]
    captions = read_captions(args.captions_file, args.images)
    if args.samples < 2 * batch_size:
        raise SystemExit(f"--samples {args.samples} give fewer than 2 batches of {batch_size}")
    tokenizer = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                 else train_wordpiece_tokenizer(captions, vocab_size=VOCAB_SIZE))
    caption_lengths = token_lengths(captions, tokenizer)
    draw = torch.randint(len(caption_lengths), (args.samples,), generator=torch.Generator().manual_seed(args.seed))
    lengths = [caption_lengths[i] for i in draw.tolist()]
    result = {
        "benchmark": "length_grouping",
        "hardware": hardware_info(args.device),
        "captions": {"source": args.captions_file or "ndclip.layouts.captions_of", "count": len(captions),
                     "tokenizer": args.tokenizer or f"WordPiece trained on the captions ({len(tokenizer)} tokens)",
                     "mean_tokens": statistics.mean(caption_lengths),
                     "stdev_tokens": statistics.pstdev(caption_lengths), "max_tokens": max(caption_lengths)},
        "settings": {"size": args.size, "batch_size": batch_size, "samples": args.samples, "epochs": args.epochs},
        "padding": {way: padding_statistics(lengths, epoch_batches(lengths, batch_size, args.epochs, args.seed,
                                                                   grouped=way == "grouped"))
                    for way in ("random", "grouped")},
    }
    if not args.no_timing:
        step_lengths = {way: round(stats["padded_length"]) for way, stats in result["padding"].items()}
        steps = measure_steps(args, batch_size, step_lengths)
        result["step"] = steps
        result["grouped_vs_random_throughput"] = steps["random"]["median_s"] / steps["grouped"]["median_s"]
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
