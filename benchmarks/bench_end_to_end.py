"""End to end: samples/s of a real `run_clip.py` run (data loading, transforms, collation, loss, logging, progress bar
included) against the bare model step rate at the same batch and size. Target: the pipeline costs at most 10%
(pipeline samples/s >= 0.9x bare samples/s), at the tiny and at the real size.

Setup: the Flickr8k-like folder of `flickr8k_like.py` (`--images` 500x375 JPEG photos, Kaggle layout), a
WordPiece tokenizer trained on its captions, and for each size an NdCLIP folder (`NdClipModel(config)` with random
weights + `NdClipProcessor(ViTImageProcessor, tokenizer)`, `save_pretrained`): `real` is ViT-B/16 at 224 +
DistilBERT-base, `tiny` is `ndclip.tiny_towers.tiny_config` at 30 px (`workloads.py`).

How it measures:
- Pipeline: `python run_clip.py --model_name_or_path <folder> --data_dir <folder> --max_train_steps N
  --per_device_train_batch_size B --logging_steps 1 --seed 0 [--dataloader_num_workers W]` in a subprocess, on the
  CPU (one process). `metrics.jsonl` has no timestamps, so the time of each step is taken from the outside: the
  child runs with `TQDM_MININTERVAL=0 TQDM_MINITERS=1` (tqdm's environment overrides), so its `train` progress bar
  prints after every optimizer step, and this script timestamps each print as it arrives on the pipe. The seconds
  per step are the sum of the gaps between consecutive prints over the number of steps they span, for gaps inside one
  epoch only (the epoch of each step is in `metrics.jsonl`): that leaves out the start-up, the first step (warmup),
  the evaluation at each epoch end (with the first step of the next epoch, which also pays for a fresh loader
  iterator) and the final evaluation and save. The per-step printing and the `metrics.jsonl` line of every step
  (`--logging_steps 1`) stay in, and count against the pipeline.
- Bare: the same model (loaded from the same folder) and batch shape in this process, random pixel values and the
  tokens of a real collated batch: forward, contrastive loss, backward, gradient clipping, AdamW step, zero_grad (see
  `workloads.make_bare_step`); a warmup step, then `--bare_steps` steps before and again after each
  pipeline run (A, B, A), so that both see the machine in the same mood.
- Both sides' samples/s = batch / the median of their per-step times, and `pipeline_over_bare` = pipeline samples/s
  / bare samples/s, per size and number of DataLoader workers: on a shared machine one slow step moves the mean of a
  few steps by 10% and more. The same ratio of the means is `pipeline_over_bare_from_means`.

Defaults: tiny at batch 32 (run_clip's default batch) for 30 steps (6 epochs of 5 steps on 180 training images),
real at batch 8 for 6 steps (a real-size step at batch 32 takes minutes on 2 CPU cores), 0 and 1 DataLoader
workers (loading in the training process, and run_clip's default on a 2-core machine: the cores less one); a few
minutes on 2 CPU cores.

    python benchmarks/bench_end_to_end.py
    python benchmarks/bench_end_to_end.py --size real --batch_size 32 --steps 10 --workers 0,1
"""

import argparse
import itertools
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers or datasets is imported

from common import add_common_args, comma_list, emit, finish, hardware_info, setup_torch, summarize
from flickr8k_like import prepare_data
from run_clip_timing import child_env, run_clip_timed, step_epochs
from workloads import (
    DEFAULT_BATCH,
    MAX_SEQ_LENGTH,
    SIZES,
    bare_inputs,
    image_processor_for,
    make_bare_step,
    save_model_folder,
)

from modeling_ndclip import NdClipModel
from ndclip.transforms import CaptionCollator, train_image_transform

TARGET = 0.9
DEFAULT_STEPS = {"tiny": 30, "real": 6}
DEFAULT_BARE_STEPS = {"tiny": 10, "real": 2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=comma_list(SIZES), default=list(SIZES), help="tiny, real or tiny,real")
    parser.add_argument("--batch_size", type=int, default=None, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of each run, default {DEFAULT_STEPS}")
    parser.add_argument("--bare_steps", type=int, default=None,
                        help=f"bare steps timed before and after each run, default {DEFAULT_BARE_STEPS}")
    parser.add_argument("--images", type=int, default=200, help="photos generated (10%% are held out)")
    parser.add_argument("--workers", default="0,1", help="--dataloader_num_workers values to run, e.g. 0,1,2")
    parser.add_argument("--data_dir", help="use this Kaggle-layout folder instead of generating one")
    parser.add_argument("--keep", help="keep the generated data, models and run folders here")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


# ----- the benchmark --------------------------------------------------------------------------------------------


def collated_batch(split, tokenizer, size: str, batch_size: int, seed: int) -> dict:
    """The first training batch as `run_clip.py` collates it (for the bare step's shapes and tokens)."""
    collator = CaptionCollator(tokenizer, MAX_SEQ_LENGTH, seed=seed,
                               image_transform=train_image_transform(image_processor_for(size)))
    return collator([split[i] for i in range(batch_size)])


def within_epoch_step_times(run: dict, first_epoch: int = 0, skip_steps: int = 1) -> dict:
    """Seconds per optimizer step from the `train` bar's timestamps, over gaps inside one epoch (>= `first_epoch`)
    that start at step `skip_steps` or later (step 1 is the first step; the gap before it is never used)."""
    epochs = step_epochs(run["metrics"])
    updates = [(n, t) for n, t in run["progress"].get("train", []) if n >= 1]
    seconds, steps, single = 0.0, 0, []
    for (n_a, t_a), (n_b, t_b) in itertools.pairwise(updates):
        if n_a < skip_steps or epochs.get(n_a) is None or epochs.get(n_a) != epochs.get(n_b):
            continue
        if epochs[n_a] < first_epoch:
            continue
        seconds += t_b - t_a
        steps += n_b - n_a
        if n_b - n_a == 1:
            single.append(t_b - t_a)
    if steps == 0:
        raise RuntimeError("no two progress prints within one epoch: run more steps per epoch")
    return {
        "mean_step_s": seconds / steps,
        "median_step_s": statistics.median(single) if single else None,
        "timed_steps": steps,
        "epochs": len(set(epochs.values())),
        "train_images": train_images(run),
    }


def train_images(run: dict) -> int | None:
    """The size of the training split, from run_clip.py's `training on N images` log line."""
    for _, line in run["lines"]:
        if match := re.search(r"training on (\d+) images", line):
            return int(match[1])
    return None


def time_bare(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def measure_size(args, size: str, data_dir: Path, train_split, tokenizer, workdir: Path) -> dict:
    batch_size = args.batch_size or DEFAULT_BATCH[size]
    steps = args.steps or DEFAULT_STEPS[size]
    bare_steps = args.bare_steps or DEFAULT_BARE_STEPS[size]
    if len(train_split) < 2 * batch_size:
        raise SystemExit(f"{len(train_split)} training images give fewer than 2 batches of {batch_size}")
    model_dir = save_model_folder(workdir / f"model_{size}", size, tokenizer, args.seed)
    model = NdClipModel.from_pretrained(model_dir)
    bare_step = make_bare_step(model, bare_inputs(collated_batch(train_split, tokenizer, size, batch_size, args.seed),
                                                  args.seed))
    bare_step()  # warmup
    bare = time_bare(bare_step, bare_steps)
    runs = {}
    for workers in args.workers:
        out = workdir / f"run_{size}_workers{workers}"
        run = run_clip_timed(
            ["--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
             "--overwrite_output_dir", "--max_train_steps", str(steps),
             "--per_device_train_batch_size", str(batch_size),
             "--logging_steps", "1", "--seed", str(args.seed), "--dataloader_num_workers", str(workers)],
            child_env(workdir, args.threads),
        )
        bare += time_bare(bare_step, bare_steps)
        runs[workers] = {"wall_s": run["wall_s"], **within_epoch_step_times(run)}
    bare_rate, bare_mean = batch_size / statistics.median(bare), statistics.mean(bare)
    result = {"batch_size": batch_size, "max_train_steps": steps,
              "bare": {**summarize(bare), "mean_s": bare_mean, "samples_per_s": bare_rate},
              "pipeline": {}, "pipeline_over_bare": {}, "pipeline_over_bare_from_means": {}}
    for workers, run in runs.items():
        key = f"workers{workers}"
        rate = batch_size / (run["median_step_s"] or run["mean_step_s"])
        result["pipeline"][key] = {**run, "samples_per_s": rate}
        result["pipeline_over_bare"][key] = rate / bare_rate
        result["pipeline_over_bare_from_means"][key] = bare_mean / run["mean_step_s"]
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.device != "cpu":
        raise SystemExit("bench_end_to_end.py runs run_clip.py on the CPU only")
    result = {"benchmark": "end_to_end", "hardware": hardware_info(args.device), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_end_to_end_") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data_dir, train_split, tokenizer, result["data"] = prepare_data(workdir, args.images, args.seed, args.data_dir)
        for size in args.size:
            result["sizes"][size] = measure_size(args, size, data_dir, train_split, tokenizer, workdir)
    result["method"] = ("pipeline: run_clip.py subprocess, s/step from timestamped per-step progress prints, gaps "
                        "inside an epoch only (no start-up, first step, epoch-end evaluation or final save); bare: "
                        "in-process step, same model and batch shape, timed before and after each run")
    target = f"pipeline_over_bare >= {TARGET}"
    result["targets"] = {target: {
        f"{size}/{workers}": {"value": round(value, 4), "met": value >= TARGET}
        for size, sized in result["sizes"].items() for workers, value in sized["pipeline_over_bare"].items()
    }}
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
