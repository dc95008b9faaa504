"""Frozen-tower cache: with both towers frozen (`--freeze_vision_model --freeze_text_model`, LiT-style) the tower
outputs are computed once and the heads train from the cache; every epoch after the first must be at least 20x
faster than without the cache (`--disable_feature_cache`).

Setup: `--images` JPEG photos of `--image_size` px (default 64 of 224x224) in a Kaggle-layout Flickr8k folder (see
`flickr8k_like.py`; 10% are held out for the evaluation), a WordPiece tokenizer trained on their captions, and
an NdCLIP folder per size with random weights (`real`: ViT-B/16 at 224 + DistilBERT-base; `tiny`: tiny towers at
30 px), as in `bench_end_to_end.py`.

How it measures: for each configuration (size, frozen towers) `run_clip.py` runs twice in subprocesses with the
same data, seed and flags (`--num_train_epochs E --per_device_train_batch_size B --logging_steps 1`), cached (the
default) and with `--disable_feature_cache`. The child's progress bars print after every step
(`TQDM_MININTERVAL=0 TQDM_MINITERS=1`) and this script timestamps each print and each log line as they arrive (see
`run_clip_timing.run_clip_timed`). With the epoch of every step from `metrics.jsonl`:
- `epoch_train_s` of epoch e >= 2: from the end of the evaluation after epoch e-1 (its `eval at step` log line) to
  the progress print of epoch e's last step: the whole training epoch (new loader iterator, collation, every step),
  and nothing else. `ratio` = median uncached / median cached over epochs 2..E, `worst_ratio` = the fastest
  uncached epoch over the slowest cached one. The target is on these training epochs.
- `epoch_with_eval_s`: from the last step of epoch e-1 to the last step of epoch e, so the evaluation that
  `run_clip.py` runs at every epoch end is included. The evaluation runs the frozen towers on the evaluation split
  every time (only the training split is cached), which bounds this ratio.
- `eval_s` (per epoch end), `cache_build_s` (cached runs: first caching progress print to the `cached frozen tower
  features` log line) and `first_epoch_s` (cache build + first training epoch for cached runs).
- `loss_max_rel_diff`: the cached run must train exactly like the uncached one; the largest relative difference of
  their per-step training losses.

Defaults (a few minutes on 2 CPU cores): 64 images, batch 16 (3 steps per epoch), 4 epochs; both towers frozen at
the tiny and the real size, and the vision tower alone frozen at the tiny size.

    python benchmarks/bench_frozen_cache.py
    python benchmarks/bench_frozen_cache.py --configs real/both,real/vision --images 256 --epochs 3
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers or datasets is imported

from common import add_common_args, emit, finish, hardware_info, setup_torch
from flickr8k_like import train_tokenizer, write_flickr8k_like
from run_clip_timing import child_env, run_clip_timed, step_epochs
from workloads import SIZES, save_model_folder

TARGET = 20.0
FROZEN_FLAGS = {"both": ["--freeze_vision_model", "--freeze_text_model"], "vision": ["--freeze_vision_model"]}
DEFAULT_CONFIGS = "tiny/both,tiny/vision,real/both"


def parse_configs(text: str) -> list[tuple[str, str]]:
    configs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        size, _, frozen = item.partition("/")
        if size not in SIZES or frozen not in FROZEN_FLAGS:
            raise ValueError(f"expected size/frozen with size in {SIZES} and frozen in {tuple(FROZEN_FLAGS)}: {item!r}")
        configs.append((size, frozen))
    return configs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=parse_configs, default=parse_configs(DEFAULT_CONFIGS),
                        help=f"size/frozen items (frozen: both or vision), default {DEFAULT_CONFIGS}")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224, help="side of the square JPEG photos")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4, help="epochs 2.. are compared")
    parser.add_argument("--workers", type=int, default=0, help="--dataloader_num_workers")
    parser.add_argument("--keep", help="keep the generated data, models and run folders here")
    add_common_args(parser)
    return parser.parse_args(argv)


# ----- reading one run's timeline -------------------------------------------------------------------------------


def first_time(lines: list[tuple[float, str]], text: str) -> float | None:
    return next((t for t, line in lines if text in line), None)


def epoch_timeline(run: dict) -> dict:
    """Per-epoch times of one run (see the module docstring), from its progress prints, log lines and metrics."""
    epochs = step_epochs(run["metrics"])
    last_step = {epoch: max(step for step, e in epochs.items() if e == epoch) for epoch in sorted(set(epochs.values()))}
    printed = dict(run["progress"]["train"])
    eval_end = {}
    for t, line in run["lines"]:
        if "eval at step " in line:
            step = int(line.split("eval at step ")[1].split(":")[0])
            eval_end.update({epoch: t for epoch, last in last_step.items() if last == step})
    caching_prints = [times[0][1] for desc, times in run["progress"].items() if desc.startswith("caching")]
    cached_line = first_time(run["lines"], "cached frozen tower features")
    cache_build = cached_line - min(caching_prints) if caching_prints and cached_line is not None else None
    n = len(last_step)
    train = [printed[last_step[0]] - printed[0]] + [printed[last_step[e]] - eval_end[e - 1] for e in range(1, n)]
    return {
        "steps_per_epoch": {str(e): sum(1 for x in epochs.values() if x == e) for e in last_step},
        "epoch_train_s": train,
        "epoch_with_eval_s": [printed[last_step[e]] - printed[last_step[e - 1]] for e in range(1, n)],
        "eval_s": [eval_end[e] - printed[last_step[e]] for e in range(n) if e in eval_end],
        "cache_build_s": cache_build,
        "first_epoch_s": train[0] + (cache_build or 0.0),
        "wall_s": run["wall_s"],
    }


def losses(run: dict) -> list[float]:
    return [record["loss"] for record in run["metrics"] if "loss" in record]


def compare(cached: dict, uncached: dict, cached_losses, uncached_losses) -> dict:
    cached_train, uncached_train = cached["epoch_train_s"][1:], uncached["epoch_train_s"][1:]
    cached_eval, uncached_eval = cached["epoch_with_eval_s"], uncached["epoch_with_eval_s"]
    ratio = statistics.median(uncached_train) / statistics.median(cached_train)
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(cached_losses, uncached_losses)]
    return {
        "ratio": ratio,
        "worst_ratio": min(uncached_train) / max(cached_train),
        "ratio_with_eval": statistics.median(uncached_eval) / statistics.median(cached_eval),
        "first_epoch_ratio": uncached["first_epoch_s"] / cached["first_epoch_s"],
        "loss_max_rel_diff": max(gaps) if gaps else None,
        "compared_steps": len(gaps),
    }


# ----- the benchmark --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.device != "cpu":
        raise SystemExit("bench_frozen_cache.py runs run_clip.py on the CPU only")
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2: epochs after the first are compared")
    result = {"benchmark": "frozen_cache", "hardware": hardware_info(args.device), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_frozen_cache_") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data_dir = workdir / "flickr8k_like"
        result["data"] = write_flickr8k_like(data_dir, args.images, size=(args.image_size, args.image_size),
                                             portrait_every=None, seed=args.seed)
        tokenizer = train_tokenizer(data_dir)
        models = {}
        for size, frozen in args.configs:
            if size not in models:
                models[size] = save_model_folder(workdir / f"model_{size}", size, tokenizer, args.seed)
            common = ["--model_name_or_path", str(models[size]), "--data_dir", str(data_dir),
                      "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
                      "--logging_steps", "1", "--seed", str(args.seed), "--dataloader_num_workers", str(args.workers),
                      *FROZEN_FLAGS[frozen]]
            runs = {}
            for name, extra in (("cached", []), ("uncached", ["--disable_feature_cache"])):
                out = workdir / f"run_{size}_{frozen}_{name}"
                runs[name] = run_clip_timed([*common, "--output_dir", str(out), "--overwrite_output_dir", *extra],
                                            child_env(workdir, args.threads))
            timelines = {name: epoch_timeline(run) for name, run in runs.items()}
            result["configs"][f"{size}/{frozen}"] = {
                **timelines,
                **compare(timelines["cached"], timelines["uncached"], losses(runs["cached"]), losses(runs["uncached"])),
            }
    result["settings"] = {"images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
                          "epochs": args.epochs, "workers": args.workers}
    target = f"ratio (uncached / cached training epoch, epochs 2..) >= {TARGET}"
    result["targets"] = {target: {
        key: {"value": round(config["ratio"], 2), "worst": round(config["worst_ratio"], 2),
              "met": config["ratio"] >= TARGET}
        for key, config in result["configs"].items() if key.endswith("/both")
    }}
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
