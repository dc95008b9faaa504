"""Training image path: NdCLIP's collator (`after`) against the path before per-batch normalisation (`before`) and a
plain baseline (`baseline`), per image and per batch, with 0/1/2 DataLoader workers.

The three paths, each a collate_fn over the same training rows (images left encoded, as run_clip.py reads them) that
gives `pixel_values` [B, 3, H, W] float and the batch's tokenized captions (`CaptionCollator`'s text side for all):
- `after`: `CaptionCollator(image_transform=train_image_transform(processor))`, NdCLIP's training path: JPEGs
  decoded straight into uint8 tensors (`torchvision.io.decode_jpeg`), the seeded random crop resized on the uint8
  tensor, then float conversion and normalisation once per batch.
- `before`: the path as it was before (built here explicitly): PIL decoding (a JPEG at reduced size, `draft`, when it
  stays at least twice the output), RGB conversion to a numpy array, the same seeded random crop on the tensor, then
  float conversion and normalisation per image, and a stack of float tensors.
- `baseline`: the approach of transformers' `examples/pytorch/contrastive-image-text/run_clip.py`:
  `torchvision.io.decode_image(..., mode=RGB)` per image, then a `torch.jit.script`-ed `nn.Sequential(Resize,
  CenterCrop, ConvertImageDtype, Normalize)` per image (the example resizes bicubically; here with the processor's
  interpolation, as the other two paths, which makes the baseline no slower), stacked. No random crop, no seeding.

Image sets (`flickr8k_like.py`, Kaggle layout, read through `ndclip.data.load_image_caption_dataset`): `photo`,
500x375 JPEGs (every fourth one 375x500) as Flickr8k's; `small`, 64x64 JPEGs. Workloads pair an image set with an
output size: `photo224` (the real model's 224 px), `photo30` and `small30` (the tiny model's 30 px).

How it measures, all candidates interleaved in the same rounds (after `--warmup` untimed rounds):
- per image: one candidate call transforms `--per_image` images one at a time through the path's collate
  (a batch of one each: the whole per-image cost, normalisation included), in this process on one torch thread.
- per batch: one candidate call is one epoch of `run_clip.make_loader` (the training DataLoader: shuffled, full
  batches) with `--workers` workers; `per_batch_ms` is the median time per batch after the first (the first one
  carries the workers' start).
Ratios are taken per round (`after/baseline`, `before/baseline`, `after/before`) and given as the median with a
distribution-free 95% interval of it when there are at least 6 rounds (`common.median_confidence_interval`). The
target is `after/baseline` <= 1.0 per batch at every workload: `met` when the interval's upper end is <= 1.0,
`not met` when its lower end is > 1.0, else `unresolved`.

    python benchmarks/bench_data_path.py
    python benchmarks/bench_data_path.py --workloads small30 --workers 0 --rounds 6
"""

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers or datasets is imported

import PIL.Image
import torch
from common import (
    LoaderEpoch,
    add_common_args,
    comma_list,
    emit,
    finish,
    hardware_info,
    median_confidence_interval,
    time_interleaved,
)
from flickr8k_like import prepare_data, write_flickr8k_like
from torchvision import transforms as v1
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from workloads import MAX_SEQ_LENGTH, image_processor_for

from ndclip.transforms import (
    CaptionCollator,
    ImageTransform,
    encoded_image_bytes,
    encoded_image_source,
    one_torch_thread,
    to_rgb_array,
    train_image_transform,
)
from run_clip import make_loader

IMAGE_SETS = {"photo": ((500, 375), 4), "small": ((64, 64), None)}  # (width, height), every n-th one portrait
WORKLOADS = {"photo224": ("photo", "real"), "photo30": ("photo", "tiny"), "small30": ("small", "tiny")}
PATHS = ("after", "before", "baseline")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=comma_list(tuple(WORKLOADS)), default=list(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--batch_size", type=int, default=32, help="the DataLoader's batch (run_clip's default)")
    parser.add_argument("--images", type=int, default=240, help="images generated per set (10%% held out)")
    parser.add_argument("--per_image", type=int, default=32, help="images per per-image candidate call")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader num_workers to compare, e.g. 0,1,2")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (6 or more give a 95%% interval)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


# ----- the three image paths --------------------------------------------------------------------------------------


def previous_train_transform(image_processor) -> ImageTransform:
    """The training transform before per-batch normalisation, per image: PIL decoding (at reduced size when a JPEG
    stays at least twice the output), `to_rgb_array`, `ToImage`, the random crop, `ToDtype` and `Normalize`. Its
    `normalise` stage is the identity: the images come out normalised."""
    side = image_processor.size["height"], image_processor.size["width"]

    def decode(image):
        picture = PIL.Image.open(encoded_image_source(image))
        picture.draft(None, (2 * side[1], 2 * side[0]))
        picture.load()
        return picture

    per_image = v2.Compose([
        decode, to_rgb_array, v2.ToImage(),
        v2.RandomResizedCrop(side, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), interpolation=image_processor.resample),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(image_processor.image_mean, image_processor.image_std),
    ])  # fmt: skip
    return ImageTransform(per_image, normalise=lambda batch: batch)


class BaselineCollator:
    """The transformers example's image path: `decode_image` + a scripted tensor transform per image, stacked; the
    captions as `CaptionCollator` gives them."""

    def __init__(self, tokenizer, image_processor, seed: int):
        side = image_processor.size["height"]
        interpolation = v1.InterpolationMode(PIL.Image.Resampling(image_processor.resample).name.lower())
        self.transform = torch.jit.script(torch.nn.Sequential(
            v1.Resize([side], interpolation=interpolation, antialias=True), v1.CenterCrop(side),
            v1.ConvertImageDtype(torch.float), v1.Normalize(image_processor.image_mean, image_processor.image_std),
        ))  # fmt: skip
        self.text = CaptionCollator(tokenizer, MAX_SEQ_LENGTH, seed=seed)

    def set_epoch(self, epoch: int):
        self.text.set_epoch(epoch)

    def __call__(self, examples: list[dict]) -> dict:
        with one_torch_thread():
            pixels = [self.transform(self.decode(example["image"])) for example in examples]
        return self.text([{**example, "pixel_values": value} for example, value in zip(examples, pixels)])

    @staticmethod
    def decode(image: dict) -> torch.Tensor:
        return decode_image(torch.frombuffer(encoded_image_bytes(image), dtype=torch.uint8), mode=ImageReadMode.RGB)


def build_collator(path: str, tokenizer, image_processor, seed: int):
    if path == "baseline":
        return BaselineCollator(tokenizer, image_processor, seed)
    transform = train_image_transform if path == "after" else previous_train_transform
    return CaptionCollator(tokenizer, MAX_SEQ_LENGTH, seed=seed, image_transform=transform(image_processor))


def per_image_call(collator, examples: list[dict]):
    """Each example alone through the collator (a batch of one)."""

    def call():
        for example in examples:
            collator([example])

    return call


# ----- the benchmark --------------------------------------------------------------------------------------------


def prepare_image_set(workdir: Path, name: str, images: int, seed: int):
    size, portrait_every = IMAGE_SETS[name]
    folder = workdir / name
    info = write_flickr8k_like(folder, images, size=size, portrait_every=portrait_every, seed=seed)
    _, split, tokenizer, loaded = prepare_data(workdir, images, seed, data_dir=folder)
    return split, tokenizer, {**info, **loaded}


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    interval = median_confidence_interval(ratios)
    return {"median": statistics.median(ratios), "interval_95": interval}


def verdict(summary: dict) -> str:
    interval = summary["interval_95"]
    if interval is None:
        return "unresolved (fewer than 6 rounds)"
    return "met" if interval[1] <= 1.0 else "not met" if interval[0] > 1.0 else "unresolved"


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        raise SystemExit("the data path runs on the CPU; --device cuda has nothing to measure here")
    result = {"benchmark": "data_path", "hardware": hardware_info("cpu"), "git_revision": git_revision()}
    result["settings"] = {"batch_size": args.batch_size, "images": args.images, "per_image": args.per_image,
                          "workers": args.workers, "rounds": args.rounds, "warmup": args.warmup}
    candidates, epochs, data = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_data_path_") as tmp:
        image_sets = {WORKLOADS[workload][0] for workload in args.workloads}
        for name in sorted(image_sets):
            data[name] = prepare_image_set(Path(tmp), name, args.images, args.seed)
        for workload in args.workloads:
            image_set, size = WORKLOADS[workload]
            split, tokenizer, _ = data[image_set]
            if len(split) < 2 * args.batch_size:
                raise SystemExit(f"{len(split)} training images give fewer than 2 batches of {args.batch_size}")
            processor = image_processor_for(size)
            examples = [split[n] for n in range(min(args.per_image, len(split)))]
            for path in PATHS:
                collator = build_collator(path, tokenizer, processor, args.seed)
                candidates[f"{workload}/{path}/per_image"] = per_image_call(collator, examples)
                for workers in args.workers:
                    loader_args = SimpleNamespace(dataloader_num_workers=workers, dataloader_pin_memory=False,
                                                  seed=args.seed)
                    loader = make_loader(split, args.batch_size, collator, loader_args, train=True)
                    epochs[(workload, path, workers)] = candidates[f"{workload}/{path}/workers{workers}"] = (
                        LoaderEpoch(loader, collator)
                    )
        times = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup, device="cpu",
                                 alternate_order=True)

    result["data"] = {name: info for name, (_, _, info) in data.items()}
    result["workloads"] = {}
    for workload in args.workloads:
        per_image = {path: times[f"{workload}/{path}/per_image"] for path in PATHS}
        per_batch = {(path, w): [s / (epochs[(workload, path, w)].batches - 1)
                                 for s in epochs[(workload, path, w)].rest_s[-args.rounds:]]
                     for path in PATHS for w in args.workers}
        entry = {
            "per_image_ms": {path: 1000 * statistics.median(s) / args.per_image for path, s in per_image.items()},
            "per_image_ratio": {
                "after/baseline": ratio_summary(per_image["after"], per_image["baseline"]),
                "before/baseline": ratio_summary(per_image["before"], per_image["baseline"]),
                "after/before": ratio_summary(per_image["after"], per_image["before"]),
            },
            "per_batch": {},
        }
        for workers in args.workers:
            after, before, baseline = (per_batch[(path, workers)] for path in PATHS)
            summary = ratio_summary(after, baseline)
            entry["per_batch"][f"workers{workers}"] = {
                "per_batch_ms": {path: 1000 * statistics.median(per_batch[(path, workers)]) for path in PATHS},
                "after/baseline": summary,
                "before/baseline": ratio_summary(before, baseline),
                "after/before": ratio_summary(after, before),
                "target_after_le_baseline": verdict(summary),
            }
        result["workloads"][workload] = entry
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
