"""End to end: samples/s of a real `run_clip.py` run (data loading, transforms, collation, loss, logging, progress bar
included) against the bare model step rate at the same batch and size. Target: the pipeline costs at most 10%
(pipeline samples/s >= 0.9x bare samples/s), at the tiny and at the real size.

Setup: the Flickr8k-like folder of `bench_data_pipeline.py` (`--images` 500x375 JPEG photos, Kaggle layout), a
WordPiece tokenizer trained on its captions, and for each size an NdCLIP folder (`NdClipModel(config)` with random
weights + `NdClipProcessor(ViTImageProcessor, tokenizer)`, `save_pretrained`): `real` is ViT-B/16 at 224 +
DistilBERT-base, `tiny` is `tiny_towers.tiny_config` at 30 px.

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
  `bench_data_pipeline.make_bare_step`); a warmup step, then `--bare_steps` steps before and again after each
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
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]  # common.py, and the model files at the repository root
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers or datasets is imported

import torch
from bench_data_pipeline import (
    MAX_SEQ_LENGTH,
    SIZES,
    bare_inputs,
    build_config,
    image_processor_for,
    make_bare_step,
    prepare_data,
)
from common import (
    add_common_args,
    comma_list,
    emit,
    finish,
    hardware_info,
    setup_torch,
    summarize,
)

from ndclip.data import CaptionCollator, train_image_transform
from modeling_ndclip import NdClipModel
from processing_ndclip import NdClipProcessor

RUN_CLIP = BENCHMARKS.parent / "run_clip.py"
TARGET = 0.9
DEFAULT_BATCH = {"tiny": 32, "real": 8}
DEFAULT_STEPS = {"tiny": 30, "real": 6}
DEFAULT_BARE_STEPS = {"tiny": 10, "real": 2}
# A tqdm status line: "desc:  40%|████      | 2/5 [00:00<00:00, 78.13it/s]" (the bar itself may be absent).
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ")  # run_clip.py's logging format
PROGRESS = re.compile(r"^(?P<desc>[^:\r\n]+):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[")


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


# ----- model folders --------------------------------------------------------------------------------------------


def save_model_folder(folder: Path, size: str, tokenizer, seed: int) -> Path:
    """An NdCLIP of `size` with random weights and its processor, saved for `run_clip.py --model_name_or_path`."""
    torch.manual_seed(seed)
    NdClipModel(build_config(size, len(tokenizer))).save_pretrained(folder)
    NdClipProcessor(image_processor=image_processor_for(size), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def collated_batch(split, tokenizer, size: str, batch_size: int, seed: int) -> dict:
    """The first training batch as `run_clip.py` collates it (for the bare step's shapes and tokens)."""
    collator = CaptionCollator(tokenizer, MAX_SEQ_LENGTH, seed=seed,
                               image_transform=train_image_transform(image_processor_for(size)))
    return collator([split[i] for i in range(batch_size)])


# ----- run_clip.py in a subprocess, timed from the outside ------------------------------------------------------


def child_env(workdir: Path, threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1",  # a progress print after every step, to timestamp
           "HF_DATASETS_CACHE": str(workdir / "hf_cache"), "MPLCONFIGDIR": str(workdir / "matplotlib")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_clip_timed(argv: list[str], env: dict, timeout: float | None = None) -> dict:
    """Run `python run_clip.py argv...`, timestamping every progress-bar print on its stderr as it arrives.

    Returns `wall_s` (the whole run), `progress` {bar description: [(n, seconds since start)]} with the first time
    each count was shown, `lines` [(seconds since start, text)] of the other stderr lines (the log), and `metrics`
    (the lines of `metrics.jsonl` in `--output_dir`)."""
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(RUN_CLIP), *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=RUN_CLIP.parent)
    stdout = []
    drain = threading.Thread(target=lambda: stdout.append(process.stdout.read()), daemon=True)
    drain.start()
    progress, seen, lines, pending = {}, set(), [], ""
    timer = threading.Timer(timeout, process.kill) if timeout else None
    if timer:
        timer.start()
    try:
        while chunk := os.read(process.stderr.fileno(), 1 << 16):
            now = time.perf_counter() - start
            pending += chunk.decode("utf-8", errors="replace")
            pieces = re.split(r"[\r\n]", pending)
            pending = pieces.pop()  # maybe incomplete; a complete status line is parsed now and again later
            for number, piece in enumerate([*pieces, pending]):
                # A log line written while a bar is shown continues the bar's (unterminated) line: split it off.
                log = LOG_LINE.search(piece)
                bar, text = (piece[: log.start()], piece[log.start() :]) if log else (piece, "")
                match = PROGRESS.match(bar.strip())
                key = match and (match["desc"].strip(), int(match["n"]))
                if key and key not in seen:
                    seen.add(key)
                    progress.setdefault(key[0], []).append((key[1], now))
                text = text or ("" if match else bar)
                if number < len(pieces) and text.strip():  # complete lines only
                    lines.append((now, text.strip()))
        returncode = process.wait()
    finally:
        if timer:
            timer.cancel()
    wall = time.perf_counter() - start
    drain.join()
    if returncode != 0:
        raise RuntimeError(f"run_clip.py {' '.join(argv)} failed ({returncode}):\n" + "\n".join(text for _, text in lines[-30:]))
    metrics_path = output_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return {"wall_s": wall, "progress": progress, "lines": lines, "metrics": metrics}


def step_epochs(metrics: list[dict]) -> dict[int, int]:
    """{optimizer step: epoch} from the training lines of `metrics.jsonl` (logged every step)."""
    return {record["step"]: record["epoch"] for record in metrics if "loss" in record}


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


# ----- the benchmark --------------------------------------------------------------------------------------------


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
        data_dir, train_split, tokenizer, result["data"] = prepare_data(args, workdir)
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
