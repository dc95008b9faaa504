"""Heads: parameter count and step time of the NdLinear head vs the linear head, at the real size (768 -> 256 for
each tower, grids 24 x 32 -> 16 x 16) and at the tiny size (32 -> 16, grids 4 x 8 -> 4 x 4), and the retrieval
quality of both after the same training budget on the offline demo data.

The two projection heads of an NdCLIP (vision and text) are built alone from the config, as `NdClipProjection`s,
for each head type. A timed call is forward + backward of both heads on a batch of random pooled vectors (the
gradients of the inputs and the weights, as inside a training step), in fp32 and under bf16 autocast. Candidates
run interleaved after warmup rounds (ndlinear, linear, ndlinear_without_copies, then in reverse order, and so on),
each sample the mean of `--repeats` calls; the result gives medians and ratios of the same run (and ratios of the
fastest samples, `_by_min`: on a shared machine other work only adds time). `ndlinear_without_copies` is the
package's maths applied without its per-axis transposed copies (benchmarks/common.py), checked equal to it first.
`macs_per_sample` counts the multiply-adds of one forward of one head for one example.

Retrieval quality after the same training budget: `run_clip.py --preset demo --projection_type ndlinear|linear
--seed S` in a subprocess for each head type and each of `--quality_seeds` (the offline demo: generated shapes,
tiny towers, the demo's full budget of 20 epochs unless `--quality_steps`; the same seed gives both runs the same
data, captions and crops), then its `eval_results.json` on the 200 held-out images: image->text and text->image
R@1 / R@5 and the zero-shot accuracy, beside the heads' parameter count in that model. A run takes a few
minutes on 2 CPU cores; `--no_quality` skips them.

    python benchmarks/bench_heads.py
    python benchmarks/bench_heads.py --quality_seeds 0,1
    python benchmarks/bench_heads.py --device cuda --batch_size 4096 --no_quality
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
from common import (
    DTYPES,
    add_common_args,
    comma_list,
    emit,
    finish,
    hardware_info,
    make_heads_step,
    projection_macs_per_sample,
    setup_torch,
    summarize,
    time_interleaved,
    without_copies_max_rel_diff,
)
from run_clip_timing import RUN_CLIP
from torch import nn
from workloads import SIZES, build_config

from configuration_ndclip import NdClipConfig, tower_width
from modeling_ndclip import NdClipModel, NdClipProjection

HEAD_TYPES = ("ndlinear", "linear")
QUALITY_KEYS = ("image_to_text_recall@1", "image_to_text_recall@5", "text_to_image_recall@1",
                "text_to_image_recall@5", "zero_shot_accuracy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=comma_list(SIZES), default=list(SIZES), help="tiny, real or tiny,real")
    parser.add_argument("--dtype", type=comma_list(DTYPES), default=list(DTYPES), help="fp32, bf16 or fp32,bf16")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed samples per candidate")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=10, help="calls averaged in one timed sample")
    parser.add_argument("--quality_seeds", default="0", help="seeds of the demo runs per head type, e.g. 0,1")
    parser.add_argument("--quality_steps", type=int, help="--max_train_steps of the demo runs (default: the demo's)")
    parser.add_argument("--no_quality", action="store_true", help="skip the demo training runs")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.quality_seeds = [int(seed) for seed in args.quality_seeds.split(",") if seed.strip()]
    return args


def build_heads(config: NdClipConfig, projection_type: str, device: str) -> nn.ModuleList:
    """The vision and text heads an `NdClipModel` with this config and head type would have."""
    towers = (
        (config.vision_config, config.vision_input_grid),
        (config.text_config, config.text_input_grid),
    )
    heads = [
        NdClipProjection(tower_width(tower), config.projection_dim, projection_type, grid, config.projection_grid)
        for tower, grid in towers
    ]
    return nn.ModuleList(heads).to(device)


def parameter_counts(heads: nn.ModuleList) -> dict:
    vision, text = (sum(p.numel() for p in head.parameters()) for head in heads)
    return {"visual_projection": vision, "text_projection": text, "total": vision + text}


def describe_heads(size: str, device: str) -> dict:
    """Parameter counts and multiply-adds of both head types at one size."""
    config = build_config(size)
    heads = {kind: build_heads(config, kind, device) for kind in HEAD_TYPES}
    counts = {kind: parameter_counts(h) for kind, h in heads.items()}
    return {
        "grids": {
            "vision_input": config.vision_input_grid,
            "text_input": config.text_input_grid,
            "projection": config.projection_grid,
        },
        "parameters": counts,
        "linear_to_ndlinear_parameters": counts["linear"]["total"] / counts["ndlinear"]["total"],
        "macs_per_sample": {kind: [projection_macs_per_sample(head) for head in h] for kind, h in heads.items()},
    }


def measure_head_steps(args, size: str, dtype: str) -> dict:
    config = build_config(size)
    torch.manual_seed(args.seed)
    ndlinear, linear = (build_heads(config, kind, args.device) for kind in HEAD_TYPES)
    max_rel_diff = without_copies_max_rel_diff(ndlinear, args.batch_size, args.device)
    candidates = {
        "ndlinear": make_heads_step(ndlinear, args.batch_size, args.device, dtype),
        "linear": make_heads_step(linear, args.batch_size, args.device, dtype),
        "ndlinear_without_copies": make_heads_step(ndlinear, args.batch_size, args.device, dtype, True),
    }
    times = time_interleaved(
        candidates,
        args.steps,
        args.warmup,
        args.device,
        repeats={name: args.repeats for name in candidates},
        alternate_order=True,
    )
    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    fastest = {name: min(seconds) for name, seconds in times.items()}  # the least disturbed sample
    return {
        "batch_size": args.batch_size,
        "fwd_bwd": {
            name: {**summarize(seconds), "samples_per_s": args.batch_size / median[name]}
            for name, seconds in times.items()
        },
        "ndlinear_vs_linear_time": median["ndlinear"] / median["linear"],
        "ndlinear_vs_linear_time_by_min": fastest["ndlinear"] / fastest["linear"],
        "without_copies_vs_ndlinear_speed": median["ndlinear"] / median["ndlinear_without_copies"],
        "without_copies_vs_ndlinear_speed_by_min": fastest["ndlinear"] / fastest["ndlinear_without_copies"],
        "without_copies_max_rel_diff": max_rel_diff,
    }


def train_demo(projection_type: str, seed: int, steps: int | None, output_dir: Path, threads: int | None) -> dict:
    """`run_clip.py --preset demo` with this head type and seed; its held-out metrics and the heads' parameters."""
    command = [sys.executable, str(RUN_CLIP), "--preset", "demo", "--projection_type", projection_type,
               "--seed", str(seed), "--output_dir", str(output_dir)]
    if steps:
        command += ["--max_train_steps", str(steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLCONFIGDIR": str(output_dir.parent / "matplotlib")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=RUN_CLIP.parent, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads((output_dir / "eval_results.json").read_text())
    counts = NdClipModel.from_pretrained(output_dir).head_parameter_counts()
    return {
        "wall_s": time.perf_counter() - started,
        "steps": results["step"],
        "head_parameters": counts["visual_projection"] + counts["text_projection"],
        **{key: results[key] for key in QUALITY_KEYS},
    }


def measure_quality(args) -> dict:
    """Both head types trained on the demo data with the same budget and seeds; the mean over seeds per metric."""
    runs = {kind: {} for kind in HEAD_TYPES}
    with tempfile.TemporaryDirectory(prefix="bench_heads_demo_") as tmp:
        for seed in args.quality_seeds:
            for kind in HEAD_TYPES:
                output_dir = Path(tmp) / f"{kind}_seed{seed}"
                runs[kind][f"seed{seed}"] = train_demo(kind, seed, args.quality_steps, output_dir, args.threads)
    table = {
        kind: {key: statistics.mean(run[key] for run in by_seed.values()) for key in ("head_parameters", *QUALITY_KEYS)}
        for kind, by_seed in runs.items()
    }
    return {"seeds": args.quality_seeds, "max_train_steps": args.quality_steps or "the demo's", "runs": runs,
            "table": table}


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    result = {"benchmark": "heads", "hardware": hardware_info(args.device), "heads": {}, "step_time": {}}
    for size in args.size:
        result["heads"][size] = describe_heads(size, args.device)
        for dtype in args.dtype:
            result["step_time"][f"{size}/{dtype}"] = measure_head_steps(args, size, dtype)
    if not args.no_quality:
        result["quality_on_demo"] = measure_quality(args)
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
