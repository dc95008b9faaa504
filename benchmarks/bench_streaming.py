"""Streaming vs map-style: images/s of `run_clip.py --streaming`'s data path against the map-style one on the same
JPEG data, with 0, 1 and 2 DataLoader workers, and the cost of the shuffle buffer. Target: streaming keeps >= 0.9x
of map-style's training throughput at the real model size.

Data: the Flickr8k-like photos of `flickr8k_like.py` (`--images` 500x375 JPEGs, ~75 KB each, Kaggle layout), loaded
as `run_clip.py` loads them (`load_image_caption_dataset`, train split, images left encoded); the same train split
written by `ndclip shards`' writer (`ndclip.shards.write_shards`) as `--shards` webdataset tar shards, the original
JPEG bytes inside. Both sides collate with the same `CaptionCollator` and training transform (`--size`: the image
processor of the tiny model, 30 px, or of the real one, ViT-B/16 at 224).

How it measures, all candidates interleaved in the same rounds (after `--warmup` untimed rounds), one epoch per call:
- `map/workersW`: one epoch of `run_clip.make_loader`'s training DataLoader (`bench_data_pipeline.DataEpoch`).
- `stream/workersW/bufferB`: one epoch of `run_clip.make_stream_loader` (torchdata's StatefulDataLoader over
  `ndclip.training.ResumableStream` over `ndclip.streaming.training_stream`: the tar shards read by datasets,
  each sample checked, shuffled with a buffer of B samples (0: no buffer), `set_epoch` each epoch, each worker its
  own shards), as a one-process `--streaming` run reads it. B is 0 and `--buffer` (run_clip's default 1000).
  The stream checks every sample as it reads it (`ndclip.data.image_problem`: the image decoded in full), where the
  map-style path checked its split once, when it was loaded: that check is part of the stream's cost.
- `steady_images_per_s`: images after the first batch / their time (a long epoch's rate); `epoch_images_per_s`: the
  whole epoch, worker start and first batch included. Ratios `stream_over_map` per size and workers (buffer
  `--buffer`), and `buffer_cost` = the epoch rate of the stream with the buffer / without it (whole epochs: a buffer
  fills before its first sample comes out).
- Training throughput at the model's size: the bare training step (`workloads.make_bare_step`, fp32, batch
  `--batch_size`) timed in the same rounds; with 0 workers loading and the step alternate in one process, so a run's
  rate is 1 / (1/model + 1/data); with workers the loader runs beside the step, so its rate is at most
  min(model, data) (on a 2-core machine the workers and the step also share the cores: `--end_to_end` measures it).
  `training_stream_over_map` compares those rates, from whole epochs' loader rates.
- `--end_to_end`: real `run_clip.py` runs in subprocesses (`run_clip_timing.run_clip_timed`), map-style and
  `--streaming` on the same data, `--end_to_end_steps` steps each, timed per step from the progress bar within an
  epoch (as `bench_end_to_end.py`); `end_to_end_stream_over_map` = the ratio of their samples/s.

    python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --size real --images 400 --rounds 5 --end_to_end
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers or datasets is imported

import torch
from bench_data_pipeline import DataEpoch
from bench_end_to_end import within_epoch_step_times
from common import add_common_args, comma_list, emit, finish, hardware_info, setup_torch, summarize, time_interleaved
from flickr8k_like import prepare_data
from run_clip_timing import child_env, run_clip_timed
from workloads import (
    MAX_SEQ_LENGTH,
    SIZES,
    bare_inputs,
    build_config,
    image_processor_for,
    make_bare_step,
    save_model_folder,
)

from modeling_ndclip import NdClipModel
from ndclip.shards import write_shards
from ndclip.streaming import training_stream
from ndclip.training import ResumableStream, TrainingStream
from ndclip.transforms import CaptionCollator, train_image_transform
from run_clip import make_stream_loader

TARGET = 0.9
DEFAULT_BUFFER = 1000  # run_clip.py's --shuffle_buffer_size default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=comma_list(SIZES), default=["real"], help="tiny, real or tiny,real")
    parser.add_argument("--batch_size", type=int, default=8, help="the loaders' and the model step's batch")
    parser.add_argument("--images", type=int, default=200, help="photos generated (10%% are held out)")
    parser.add_argument("--shards", type=int, default=4, help="tar shards the train split is written as")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader num_workers to compare")
    parser.add_argument("--buffer", type=int, default=DEFAULT_BUFFER, help="the shuffle buffer compared with none")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one epoch / one step per candidate)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--end_to_end", action="store_true", help="also time run_clip.py runs, map vs --streaming")
    parser.add_argument("--end_to_end_steps", type=int, default=6, help="steps of each run_clip.py run")
    parser.add_argument("--end_to_end_workers", type=int, default=1, help="DataLoader workers of those runs")
    parser.add_argument("--data_dir", help="use this Kaggle-layout folder instead of generating one")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


class StreamEpoch:
    """One epoch of `run_clip.make_stream_loader` over the shards (a one-process `--streaming` run's loader): the
    loader's and the collator's `set_epoch`, a fresh iterator, every batch pulled and dropped; the time to the first
    batch and of the rest are kept, and the batches counted (a stream has no length)."""

    def __init__(self, shards: list[str], tokenizer, image_processor, batch_size: int, workers: int, buffer: int,
                 seed: int):  # fmt: skip
        stream, dropped = training_stream(shards, seed=seed, shuffle_buffer_size=buffer, num_workers=workers)
        self.collator = CaptionCollator(
            tokenizer, MAX_SEQ_LENGTH, seed=seed, image_transform=train_image_transform(image_processor)
        )
        loader_args = SimpleNamespace(
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, contrastive_accumulation=False,
            dataloader_pin_memory=False, seed=seed,
        )  # fmt: skip
        data = TrainingStream(ResumableStream(stream), dropped, shards, workers)
        self.loader = make_stream_loader(data, self.collator, loader_args)
        self.batch_size, self.epoch = batch_size, 0
        self.first_batch_s, self.rest_s, self.rest_batches = [], [], []

    def __call__(self) -> None:
        self.loader.set_epoch(self.epoch)
        self.collator.set_epoch(self.epoch)
        self.epoch += 1
        start = time.perf_counter()
        batches = iter(self.loader)
        next(batches)
        first = time.perf_counter()
        self.rest_batches.append(sum(1 for _ in batches))
        self.first_batch_s.append(first - start)
        self.rest_s.append(time.perf_counter() - first)

    def steady_images_per_s(self, rounds: int) -> float:
        return statistics.median(b * self.batch_size / s for b, s in zip(self.rest_batches[-rounds:],
                                                                         self.rest_s[-rounds:]))  # fmt: skip

    def epoch_images_per_s(self, rounds: int) -> float:
        pairs = zip(self.rest_batches[-rounds:], self.first_batch_s[-rounds:], self.rest_s[-rounds:])
        return statistics.median((b + 1) * self.batch_size / (f + r) for b, f, r in pairs)


def map_rates(epoch: DataEpoch, times: list[float], rounds: int) -> dict:
    return {"steady_images_per_s": epoch.steady_images_per_s(rounds),
            "epoch_images_per_s": epoch.batches * epoch.batch_size / statistics.median(times),
            "first_batch_median_s": statistics.median(epoch.first_batch_s[-rounds:])}  # fmt: skip


def stream_rates(epoch: StreamEpoch, rounds: int) -> dict:
    return {"steady_images_per_s": epoch.steady_images_per_s(rounds),
            "epoch_images_per_s": epoch.epoch_images_per_s(rounds),
            "first_batch_median_s": statistics.median(epoch.first_batch_s[-rounds:]),
            "batches_per_epoch": epoch.rest_batches[-1] + 1}  # fmt: skip


def training_rate(model_rate: float, data_rate: float, workers: int) -> float:
    """Samples/s of training fed by a loader of `data_rate`: in turn with the step (0 workers), or beside it."""
    return 1 / (1 / model_rate + 1 / data_rate) if workers == 0 else min(model_rate, data_rate)


def measure_loaders(args, size: str, train_split, shards: list[str], tokenizer) -> dict:
    processor = image_processor_for(size)
    candidates, epochs = {}, {}
    for workers in args.workers:
        epochs[f"map/workers{workers}"] = DataEpoch(
            train_split, tokenizer, processor, args.batch_size, workers, args.seed
        )
        for buffer in (0, args.buffer):
            epochs[f"stream/workers{workers}/buffer{buffer}"] = StreamEpoch(
                shards, tokenizer, processor, args.batch_size, workers, buffer, args.seed
            )
    candidates.update(epochs)
    first_batch = next(iter(DataEpoch(train_split, tokenizer, processor, args.batch_size, 0, args.seed).loader))
    torch.manual_seed(args.seed)
    model = NdClipModel(build_config(size, len(tokenizer)))
    candidates["model"] = make_bare_step(model, bare_inputs(first_batch, args.seed))
    times = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup, device="cpu", alternate_order=True)

    model_rate = args.batch_size / statistics.median(times["model"])
    result = {"model": {**summarize(times["model"]), "samples_per_s": model_rate}, "loaders": {},
              "stream_over_map": {}, "buffer_cost": {}, "training_stream_over_map": {}}  # fmt: skip
    for name, epoch in epochs.items():
        rates = (
            map_rates(epoch, times[name], args.rounds) if name.startswith("map") else stream_rates(epoch, args.rounds)
        )
        result["loaders"][name] = {"epoch": summarize(times[name]), **rates}
    for workers in args.workers:
        mapped = result["loaders"][f"map/workers{workers}"]
        streamed = result["loaders"][f"stream/workers{workers}/buffer{args.buffer}"]
        unbuffered = result["loaders"][f"stream/workers{workers}/buffer0"]
        key = f"workers{workers}"
        result["stream_over_map"][key] = {
            rate: streamed[rate] / mapped[rate] for rate in ("steady_images_per_s", "epoch_images_per_s")
        }
        # Whole epochs: a buffer fills before its first sample comes out, which the steady rate would leave out.
        result["buffer_cost"][key] = streamed["epoch_images_per_s"] / unbuffered["epoch_images_per_s"]
        # Whole epochs' rates, worker start, first batch and buffer filling included: the conservative side of both.
        result["training_stream_over_map"][key] = training_rate(
            model_rate, streamed["epoch_images_per_s"], workers
        ) / training_rate(model_rate, mapped["epoch_images_per_s"], workers)
    return result


def measure_end_to_end(args, size: str, data_dir: Path, shards_dir: Path, tokenizer, workdir: Path) -> dict:
    """run_clip.py map-style and --streaming, one after the other, then again in the other order (A, B, B, A)."""
    model_dir = save_model_folder(workdir / f"model_{size}", size, tokenizer, args.seed)
    common = ["--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--overwrite_output_dir",
              "--max_train_steps", str(args.end_to_end_steps), "--per_device_train_batch_size", str(args.batch_size),
              "--logging_steps", "1", "--seed", str(args.seed),
              "--dataloader_num_workers", str(args.end_to_end_workers)]  # fmt: skip
    variants = {"map": [], "stream": ["--streaming", "--train_shards", str(shards_dir / "*.tar")]}
    step_s = {name: [] for name in variants}
    for order in (("map", "stream"), ("stream", "map")):
        for name in order:
            out = workdir / f"e2e_{size}_{name}"
            run = run_clip_timed([*common, *variants[name], "--output_dir", str(out)], child_env(workdir, args.threads))
            timing = within_epoch_step_times(run)
            step_s[name].append(timing["median_step_s"] or timing["mean_step_s"])
    rates = {name: args.batch_size / statistics.median(seconds) for name, seconds in step_s.items()}
    return {"steps": args.end_to_end_steps, "workers": args.end_to_end_workers, "step_s": step_s,
            "samples_per_s": rates, "end_to_end_stream_over_map": rates["stream"] / rates["map"]}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.device != "cpu":
        raise SystemExit("the data paths run on the CPU; the model rate is measured with --device cpu only")
    result = {"benchmark": "streaming", "hardware": hardware_info(args.device), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_streaming_") as tmp:
        workdir = Path(tmp)
        data_dir, train_split, tokenizer, result["data"] = prepare_data(workdir, args.images, args.seed, args.data_dir)
        index = write_shards(train_split, workdir / "shards", num_shards=args.shards)
        shards = sorted(str(path) for path in (workdir / "shards").glob("*.tar"))
        result["data"]["shards"] = index["shards"]
        for size in args.size:
            result["sizes"][size] = measure_loaders(args, size, train_split, shards, tokenizer)
            if args.end_to_end:
                e2e = measure_end_to_end(args, size, data_dir, workdir / "shards", tokenizer, workdir)
                result["sizes"][size]["end_to_end"] = e2e
    result["settings"] = {"batch_size": args.batch_size, "rounds": args.rounds, "warmup": args.warmup,
                          "workers": args.workers, "buffer": args.buffer, "shards": args.shards}  # fmt: skip
    target = f"training_stream_over_map >= {TARGET}"
    result["targets"] = {target: {
        f"{size}/{workers}": {"value": round(value, 4), "met": value >= TARGET}
        for size, sized in result["sizes"].items() for workers, value in sized["training_stream_over_map"].items()
    }}  # fmt: skip
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
