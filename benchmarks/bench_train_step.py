"""Training step: samples/s of NdCLIP vs the same towers with `projection_type="linear"`, at the real size
(ViT-B/16 at 224 + DistilBERT-base, projection 256, random weights) and at a tiny size; fp32 and bf16 autocast;
peak memory with and without gradient checkpointing; and the projection heads' share of the step.

Targets: NdCLIP >= 0.98x the linear head's throughput (the heads must cost nothing); gradient checkpointing at
batch 32 uses <= 0.6x the peak memory.

How it measures:
- Throughput. Both models start from the same tower weights (the NdCLIP towers' state dicts are copied into the
  linear model), each with its own AdamW, and train on the same random batch (pixel_values `[B, 3, H, W]`,
  input_ids `[B, 32]`, attention mask of ones). A step is forward with `return_loss=True`, backward,
  `optimizer.step()`, `zero_grad()`. The candidates run interleaved (ndlinear, linear, ndlinear_without_copies,
  heads..., then the same in reverse order, and so on) after warmup rounds; samples/s is the batch size over the
  median step time, and every ratio compares numbers of the same run. The NdCLIP/linear throughput ratio is taken
  per round (the two steps of a round ran back to back, so a slow spell of the shared machine cancels out), and the
  target is judged on the 95% confidence interval of the median of those ratios (order statistics, no assumption
  about the noise): met when the interval lies at or above 0.98, missed when below, unresolved when it straddles
  it. The same ratio implied by the heads' own times (the only difference between the models, timed in many
  repeats; it leaves out the optimizer step over the heads' parameters, 2 x 928 for NdLinear against 2 x 196,864
  for the linear heads at the real size, so it errs against NdLinear) is reported and judged beside it
  (`met_by_heads`): on a shared CPU it resolves what whole steps cannot. `model_flops_per_sample` is the usual
  estimate (6 x matmul parameters x tokens + 12 x layers x tokens^2 x width per tower, + 6 x the heads'
  multiply-adds; no recompute), and `fraction_of_matmul_peak` divides the achieved FLOP/s by that of a square
  matmul measured in the same run.
- Head share. The two projection heads alone (forward + the backward a training step needs: gradients of their
  inputs and weights, via `torch.autograd.grad`) on random pooled vectors of the step's batch size, timed in the
  same interleaved rounds as the steps; share = head time / step time. The alternative head
  `ndlinear_without_copies` (benchmarks/common.py: the same per-axis linear layers applied to a `[before, axis,
  after]` view instead of transposing each axis to the end and back with `.contiguous()`) is checked equal to
  `ndlinear.NdLinear` (outputs and gradients, `torch.testing.assert_close`) and timed alone and, at the sizes in
  `--step_without_copies_sizes` (tiny by default), inside the full step (the NdCLIP model with its heads' forward
  swapped; same weights, same optimizer). Ratios `_by_min` compare the fastest samples: on a shared machine other
  work only ever adds time.
- Peak memory, NdCLIP only (the heads' own memory is negligible: 928 parameters each). Each configuration runs in a
  fresh subprocess (`--memory_child`): it notes the memory after importing torch (baseline), builds the model,
  AdamW and the batch, runs one batch-1 step (which allocates the AdamW state, a fixed cost of every step after),
  resets the peak, runs one step at the batch size and reads the peak. Process memory: on CPU the resident set
  size, the peak being the kernel's `VmHWM` after a reset through `/proc/self/clear_refs` (so the building of the
  model does not count); on CUDA `torch.cuda.max_memory_allocated`. `peak_bytes` = peak - baseline: weights,
  gradients, AdamW state and activations, what the training holds at its worst; `step_extra_bytes` = peak - memory
  before the step (gradients and activations). RSS also holds what the C allocator kept after `free`, so a second
  step then runs under torch.profiler, whose memory timeline gives the peak of live tensors and its breakdown by
  category (`tensor_peak_bytes`, `tensor_peak_by_category_mib`): the CPU analogue of `max_memory_allocated`.
  The checkpointing ratios divide the checkpointed run's numbers by the plain run's; the target is checked on both
  the process peak and the tensor peak. With glibc's default malloc, the checkpointed run's RSS stays well above its
  live tensors (recomputation frees and reallocates many blocks below the mmap threshold, which the heap keeps);
  `MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0` in the environment (inherited by the subprocesses) makes
  RSS follow the tensors.

Defaults: tiny at batch 32 (fp32 and bf16, 60 timed rounds), real at batch 8 (8 timed rounds; fp32 only on a CPU
without native bf16, where a real-size bf16 step takes minutes), sized for about 5 minutes on 2 idle CPU cores
(on a 2-core machine shared with two to three other jobs they took 13 to 19 minutes). `--size real --batch_size 32`
reproduces the checkpointing target (add `--memory_only` to skip the slow throughput rounds).

    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --size real --batch_size 32 --memory_only
    python benchmarks/bench_train_step.py --device cuda --size real --batch_size 32 --dtype fp32,bf16
"""

import argparse
import gc
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
from common import (
    DTYPES,
    PeakMemory,
    add_common_args,
    comma_list,
    cpu_has_native_bf16,
    emit,
    finish,
    hardware_info,
    make_heads_step,
    measure_matmul_flops,
    median_confidence_interval,
    mib,
    profile_tensor_peak,
    projection_macs_per_sample,
    ratio,
    run_child,
    setup_torch,
    summarize,
    time_interleaved,
    without_copies_max_rel_diff,
)
from torch import nn
from workloads import DEFAULT_BATCH, SEQ_LEN, SIZES, build_model, make_inputs, make_train_step

from modeling_ndclip import NdClipModel

DEFAULT_STEPS = {"tiny": 60, "real": 8}  # rounds; 6 or more give the paired ratio a 95% interval
DEFAULT_WARMUP = {"tiny": 3, "real": 1}
HEAD_REPEATS = 20  # head calls per timed sample: one call is too short for the clock
THROUGHPUT_TARGET = 0.98
CHECKPOINTING_TARGET = 0.6
CHECKPOINTING_TARGET_BATCH = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=comma_list(SIZES), default=list(SIZES), help="tiny, real or tiny,real")
    parser.add_argument(
        "--dtype",
        type=comma_list(DTYPES),
        default=None,
        help="fp32, bf16 or fp32,bf16 (default both, except fp32 only for the real size on a CPU without native bf16)",
    )
    parser.add_argument("--batch_size", type=int, default=None, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per candidate, default {DEFAULT_STEPS}")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed rounds first, default {DEFAULT_WARMUP}")
    parser.add_argument(
        "--step_without_copies_sizes",
        type=comma_list(SIZES, allow_empty=True),
        default=["tiny"],
        help="sizes at which the full step is also timed with the copy-free head (default tiny: at the real size "
        "the heads are far below the step's noise, and their share is measured alone anyway); '' for none",
    )
    parser.add_argument("--memory_only", action="store_true", help="skip throughput, measure peak memory only")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    add_common_args(parser)
    return parser.parse_args(argv)


def dtypes_for(args, size: str) -> list[str]:
    if args.dtype is not None:
        return args.dtype
    if size == "real" and args.device == "cpu" and not cpu_has_native_bf16():
        return ["fp32"]
    return list(DTYPES)


# ----- models and data ------------------------------------------------------------------------------------------


def build_model_pair(size: str, seed: int, device: str) -> tuple[NdClipModel, NdClipModel]:
    """NdCLIP and the linear-head model with the same initial towers and logit scale (only the heads differ)."""
    ndlinear = build_model(size, "ndlinear", seed, device)
    linear = build_model(size, "linear", seed + 1, device)
    linear.vision_model.load_state_dict(ndlinear.vision_model.state_dict())
    linear.text_model.load_state_dict(ndlinear.text_model.state_dict())
    linear.logit_scale.data.copy_(ndlinear.logit_scale.data)
    return ndlinear, linear


def heads_of(model: NdClipModel) -> nn.ModuleList:
    return nn.ModuleList([model.visual_projection, model.text_projection])


def train_flops_per_sample(model: NdClipModel) -> float:
    """Model FLOPs of one training example (forward + backward), as nanoGPT's `estimate_mfu`."""
    vision = model.config.vision_config
    tokens = {"vision_model": (vision.image_size // vision.patch_size) ** 2 + 1, "text_model": SEQ_LEN}
    flops = 0.0
    for name, num_tokens in tokens.items():
        tower = getattr(model, name)
        matmul_params = sum(m.weight.numel() for m in tower.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        config = tower.config
        flops += 6 * matmul_params * num_tokens + 12 * config.num_hidden_layers * num_tokens**2 * config.hidden_size
    heads = (model.visual_projection, model.text_projection)
    return flops + 6 * sum(projection_macs_per_sample(head) for head in heads)


# ----- throughput and head share --------------------------------------------------------------------------------


def measure_throughput(args, size: str, dtype: str) -> dict:
    batch_size = args.batch_size or DEFAULT_BATCH[size]
    ndlinear, linear = build_model_pair(size, args.seed, args.device)
    inputs = make_inputs(ndlinear.config, batch_size, args.seed, args.device)
    nd_optimizer = torch.optim.AdamW(ndlinear.parameters(), lr=1e-4)
    lin_optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-4)
    candidates = {
        "step/ndlinear": make_train_step(ndlinear, nd_optimizer, inputs, args.device, dtype),
        "step/linear": make_train_step(linear, lin_optimizer, inputs, args.device, dtype),
    }
    if size in args.step_without_copies_sizes:
        candidates["step/ndlinear_without_copies"] = make_train_step(
            ndlinear, nd_optimizer, inputs, args.device, dtype, without_copies=True
        )
    candidates |= {
        "heads/ndlinear": make_heads_step(heads_of(ndlinear), batch_size, args.device, dtype),
        "heads/linear": make_heads_step(heads_of(linear), batch_size, args.device, dtype),
        "heads/ndlinear_without_copies": make_heads_step(heads_of(ndlinear), batch_size, args.device, dtype, True),
    }
    max_rel_diff = without_copies_max_rel_diff(heads_of(ndlinear), batch_size, args.device)
    times = time_interleaved(
        candidates,
        rounds=args.steps or DEFAULT_STEPS[size],
        warmup=args.warmup if args.warmup is not None else DEFAULT_WARMUP[size],
        device=args.device,
        repeats={name: HEAD_REPEATS for name in candidates if name.startswith("heads/")},
        alternate_order=True,
    )
    # The yardstick is the faster of the fp32 matmul and the autocast dtype's (a CPU without native bf16 runs its
    # bf16 matmuls slower than fp32 ones, and autocast keeps many ops in fp32).
    matmul_flops = {d: measure_matmul_flops(args.device, d) for d in dict.fromkeys(("fp32", dtype))}
    result = summarize_throughput(times, batch_size, max_rel_diff)
    flops_per_sample = train_flops_per_sample(ndlinear)
    achieved = flops_per_sample * result["step"]["ndlinear"]["samples_per_s"]
    return result | {
        "model_flops_per_sample": flops_per_sample,
        "achieved_flops_per_s": achieved,
        "matmul_flops_per_s": matmul_flops,
        "fraction_of_matmul_peak": achieved / max(matmul_flops.values()),
    }


def paired_throughput_ratios(times: dict[str, list[float]]) -> list[float]:
    """NdCLIP's throughput over the linear head's, one ratio per round: the two steps of a round ran back to back, so
    a slower spell of the shared machine slows both and cancels out of their ratio."""
    return [linear / ndlinear for ndlinear, linear in zip(times["step/ndlinear"], times["step/linear"], strict=True)]


def summarize_throughput(times: dict[str, list[float]], batch_size: int, max_rel_diff: float) -> dict:
    """Medians, and the ratios between candidates. Ratios `_by_min` compare the fastest samples instead: on a
    shared machine, other work only ever adds time, so the minimum is the least disturbed sample.

    The throughput target is judged on the per-round ratios (`paired_throughput_ratios`): their median and its 95%
    confidence interval. `ndlinear_vs_linear_throughput_implied_by_heads` is the same ratio computed from the heads
    alone, which are the only difference between the two models: linear step time / (linear step time + NdLinear
    heads' time - linear heads' time), with the heads timed in many repeats (far less noisy than whole steps)."""
    median = {name: statistics.median(seconds) for name, seconds in times.items()}
    fastest = {name: min(seconds) for name, seconds in times.items()}

    def speedup(baseline: str, candidate: str) -> dict:
        if candidate not in times:
            return {"median": None, "by_min": None}
        return {"median": median[baseline] / median[candidate], "by_min": fastest[baseline] / fastest[candidate]}

    steps = {
        name.split("/")[1]: {**summarize(seconds), "samples_per_s": batch_size / median[name]}
        for name, seconds in times.items()
        if name.startswith("step/")
    }
    heads = {name.split("/")[1]: summarize(seconds) for name, seconds in times.items() if name.startswith("heads/")}
    throughput = speedup("step/linear", "step/ndlinear")
    paired = paired_throughput_ratios(times)
    interval = median_confidence_interval(paired)
    head_difference = median["heads/ndlinear"] - median["heads/linear"]
    without_copies_step = speedup("step/ndlinear", "step/ndlinear_without_copies")
    without_copies_head = speedup("heads/ndlinear", "heads/ndlinear_without_copies")
    return {
        "batch_size": batch_size,
        "step": steps,
        "ndlinear_vs_linear_throughput": statistics.median(paired),
        "ndlinear_vs_linear_throughput_ci95": interval,
        "ndlinear_vs_linear_throughput_of_medians": throughput["median"],
        "ndlinear_vs_linear_throughput_by_min": throughput["by_min"],
        "ndlinear_vs_linear_throughput_implied_by_heads": (
            median["step/linear"] / (median["step/linear"] + head_difference)
        ),
        "heads_fwd_bwd": heads,
        "head_share_of_step": {
            "ndlinear": median["heads/ndlinear"] / median["step/ndlinear"],
            "linear": median["heads/linear"] / median["step/linear"],
            "ndlinear_without_copies": median["heads/ndlinear_without_copies"] / median["step/ndlinear"],
        },
        "without_copies_vs_ndlinear_head_speed": without_copies_head["median"],
        "without_copies_vs_ndlinear_head_speed_by_min": without_copies_head["by_min"],
        "without_copies_vs_ndlinear_throughput": without_copies_step["median"],
        "without_copies_vs_ndlinear_throughput_by_min": without_copies_step["by_min"],
        "without_copies_max_rel_diff": max_rel_diff,
    }


# ----- peak memory, one fresh process per configuration ---------------------------------------------------------


def memory_child(args) -> dict:
    """Runs inside the fresh subprocess: the peak memory of one NdCLIP training step (see the module docstring)."""
    size, dtype = args.size[0], args.dtype[0]
    batch_size = args.batch_size or DEFAULT_BATCH[size]
    memory = PeakMemory(args.device)
    baseline = memory.current()
    model = build_model(size, "ndlinear", args.seed, args.device)
    if args.checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    make_train_step(model, optimizer, make_inputs(model.config, 1, args.seed, args.device), args.device, dtype)()
    step = make_train_step(
        model, optimizer, make_inputs(model.config, batch_size, args.seed, args.device), args.device, dtype
    )
    gc.collect()
    before_step = memory.current()
    memory.reset_peak()
    step()
    peak = memory.peak()
    return {
        "method": memory.method,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_bytes": peak - baseline,
        "step_extra_bytes": peak - before_step,
        "peak_mib": mib(peak - baseline),
        "step_extra_mib": mib(peak - before_step),
        **profile_tensor_peak(step, args.device),  # a second step, after the first's peak was read
    }


def measure_memory(args, size: str, dtype: str) -> dict:
    batch_size = args.batch_size or DEFAULT_BATCH[size]
    argv = (
        f"--memory_child --size {size} --dtype {dtype} --batch_size {batch_size} --device {args.device} "
        f"--seed {args.seed}"
    ).split()
    if args.threads:
        argv += ["--threads", str(args.threads)]
    plain = run_child(Path(__file__), argv)
    checkpointed = run_child(Path(__file__), argv + ["--checkpointing"])
    return {
        "batch_size": batch_size,
        "no_checkpointing": plain,
        "checkpointing": checkpointed,
        "checkpointing_peak_ratio": checkpointed["peak_bytes"] / plain["peak_bytes"],
        "checkpointing_step_extra_ratio": ratio(checkpointed["step_extra_bytes"], plain["step_extra_bytes"]),
        "checkpointing_tensor_peak_ratio": ratio(
            checkpointed["tensor_peak_bytes"] or 0, plain["tensor_peak_bytes"] or 0
        ),
    }


def throughput_verdict(interval: tuple[float, float] | None) -> bool | str:
    """Met when the whole 95% confidence interval of the paired ratio is at or above the target, missed when it is
    below; otherwise the run could not tell (too few rounds, or too noisy a machine), and says so."""
    if interval is None:
        return "unresolved: fewer than 6 rounds give no 95% interval"
    low, high = interval
    if low >= THROUGHPUT_TARGET:
        return True
    if high < THROUGHPUT_TARGET:
        return False
    return f"unresolved: the 95% interval [{low:.3f}, {high:.3f}] contains {THROUGHPUT_TARGET}"


def check_targets(throughput: dict, memory: dict) -> dict:
    targets = {
        f"ndlinear_vs_linear_throughput >= {THROUGHPUT_TARGET}": {},
        f"checkpointing_peak_ratio <= {CHECKPOINTING_TARGET} at batch {CHECKPOINTING_TARGET_BATCH}": {},
    }
    speed, mem = targets.values()
    for key, result in throughput.items():
        interval = result["ndlinear_vs_linear_throughput_ci95"]
        implied = result["ndlinear_vs_linear_throughput_implied_by_heads"]
        speed[key] = {
            "value": round(result["ndlinear_vs_linear_throughput"], 4),
            "ci95": interval and [round(bound, 4) for bound in interval],
            "met": throughput_verdict(interval),
            "implied_by_heads": round(implied, 4),
            "met_by_heads": implied >= THROUGHPUT_TARGET,
        }
    for key, result in memory.items():
        ratios = {
            "process_peak": result["checkpointing_peak_ratio"],
            "tensor_peak": result["checkpointing_tensor_peak_ratio"],
        }
        at_target_batch = result["batch_size"] == CHECKPOINTING_TARGET_BATCH
        mem[key] = {
            "batch_size": result["batch_size"],
            "value": {name: None if r is None else round(r, 4) for name, r in ratios.items()},
            "met": {name: r is not None and r <= CHECKPOINTING_TARGET for name, r in ratios.items()}
            if at_target_batch
            else "n/a: not measured at batch 32",
        }
    return targets


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.memory_child:
        emit(memory_child(args))
        return
    result = {"benchmark": "train_step", "hardware": hardware_info(args.device), "throughput": {}, "memory": {}}
    for size in args.size:
        for dtype in dtypes_for(args, size):
            key = f"{size}/{dtype}"
            if not args.memory_only:
                result["throughput"][key] = measure_throughput(args, size, dtype)
                gc.collect()
            if not args.no_memory:
                result["memory"][key] = measure_memory(args, size, dtype)
    result["targets"] = check_targets(result["throughput"], result["memory"])
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
