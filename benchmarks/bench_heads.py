"""Heads: parameter count and step time of the NdLinear head vs the linear head, at the real size (768 -> 256 for
each tower, grids 24 x 32 -> 16 x 16) and at the tiny size (32 -> 16, grids 4 x 8 -> 4 x 4).

The two projection heads of an NdCLIP (vision and text) are built alone from the config, as `NdClipProjection`s,
for each head type. A timed call is forward + backward of both heads on a batch of random pooled vectors (the
gradients of the inputs and the weights, as inside a training step), in fp32 and under bf16 autocast. Candidates
run interleaved after warmup rounds (ndlinear, linear, ndlinear_without_copies, then in reverse order, and so on),
each sample the mean of `--repeats` calls; the result gives medians and ratios of the same run (and ratios of the
fastest samples, `_by_min`: on a shared machine other work only adds time). `ndlinear_without_copies` is the
package's maths applied without its per-axis transposed copies (benchmarks/common.py), checked equal to it first.
`macs_per_sample` counts the multiply-adds of one forward of one head for one example.

Retrieval quality after the same training budget (R@1/R@5 on the demo data) is not measured here; it belongs to
`run_clip.py`.

    python benchmarks/bench_heads.py
    python benchmarks/bench_heads.py --device cuda --batch_size 4096
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]  # common.py, and the model files at the repository root
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
from torch import nn

from configuration_ndclip import NdClipConfig, tower_width
from modeling_ndclip import NdClipProjection
from tiny_towers import tiny_config

SIZES = ("tiny", "real")
HEAD_TYPES = ("ndlinear", "linear")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=comma_list(SIZES), default=list(SIZES), help="tiny, real or tiny,real")
    parser.add_argument("--dtype", type=comma_list(DTYPES), default=list(DTYPES), help="fp32, bf16 or fp32,bf16")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed samples per candidate")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=10, help="calls averaged in one timed sample")
    add_common_args(parser)
    return parser.parse_args(argv)


def build_config(size: str) -> NdClipConfig:
    return tiny_config(vocab_size=1000) if size == "tiny" else NdClipConfig()


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


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    result = {"benchmark": "heads", "hardware": hardware_info(args.device), "heads": {}, "step_time": {}}
    for size in args.size:
        result["heads"][size] = describe_heads(size, args.device)
        for dtype in args.dtype:
            result["step_time"][f"{size}/{dtype}"] = measure_head_steps(args, size, dtype)
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
