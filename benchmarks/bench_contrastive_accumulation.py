"""Contrastive accumulation: peak memory and time per optimizer step of k micro-batches of b through the gradient
cache (`run_clip.py --contrastive_accumulation`, ndclip/gradient_cache.py) against the plain big batch of k x b (the
same loss and gradients) and against plain accumulation of k x b (each micro-batch's loss with its own negatives only:
cheaper, but not a contrastive batch of k x b).

Targets (issue 11): the gradient cache's peak memory close to that of one micro-batch (plain accumulation's, whose
step holds one micro-batch's activations at a time) plus the embeddings, well below the big batch's; its extra compute
about one more forward pass (a step of forward + backward costs about three forwards, so about 4/3 of the big batch's
time).

How it measures:
- The model is run_clip.py's at the real size (ViT-B/16 at 224 + DistilBERT-base, projection 256, random weights;
  benchmarks/workloads.py) or the tiny one, in training mode; the batch is random (pixel values, 32 random tokens per
  caption). A step is what run_clip.py's training step does without accelerate: the forward pass(es) (under bf16
  autocast for `--dtype bf16`, the loss outside it, as accelerate's prepared model does), the softmax loss over the
  batch (`ndclip.losses.global_loss`), the backward pass(es), AdamW and `zero_grad`.
- Time: the three modes share one model and optimizer and run interleaved (big, gradient cache, plain, then the
  reverse order, ...) after warmup rounds; medians per mode, and the per-round ratio against the big batch of the
  same round (a slow spell of the shared machine slows the whole round and cancels out of its ratios).
- Peak memory: one fresh subprocess per mode (`--memory_child`), as benchmarks/bench_train_step.py does it: the
  memory after importing torch (baseline), the model, AdamW and the batch, a first step with micro-batches of one
  pair (which allocates the gradients and AdamW's state, fixed costs of every step after), then the peak of one step
  at full size. CPU: the resident set size, the peak being `VmHWM` after a reset through `/proc/self/clear_refs`; the
  children run with `MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0` (unless set), so that freed activations
  leave the RSS instead of staying in glibc's heap. CUDA: `torch.cuda.max_memory_allocated`. `peak_bytes` = peak -
  baseline (weights, gradients, AdamW state and the step's activations), `step_extra_bytes` = peak - memory before the
  step (activations and what the backward allocates). With `--tensor_peak`, a second step runs under torch.profiler
  for the peak of live tensors by category (slow at the real size on a CPU).

Defaults: real size, b = 8, k = 4 (k x b = 32, run_clip.py's default batch), fp32, 3 timed rounds after 1 warmup: on
2 CPU cores a real-size step of 32 takes tens of seconds, so a run takes about 15 minutes on an idle machine.

    python benchmarks/bench_contrastive_accumulation.py
    python benchmarks/bench_contrastive_accumulation.py --device cuda --micro_batch_size 32 --accumulation_steps 8
    python benchmarks/bench_contrastive_accumulation.py --size tiny --rounds 10
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
    emit,
    finish,
    hardware_info,
    mib,
    profile_tensor_peak,
    ratio,
    run_child,
    setup_torch,
    summarize,
    time_interleaved,
)
from workloads import SIZES, build_model, make_inputs

from ndclip.gradient_cache import backward_through_cache, embed_without_gradients, split_batch
from ndclip.losses import global_loss

MODES = ("big_batch", "contrastive_accumulation", "plain_accumulation")
BASELINE = "big_batch"
# glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so the RSS would not drop when a
# micro-batch's activations are freed: these make it return them (inherited by the memory children).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="real")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--micro_batch_size", type=int, default=8, help="b: pairs per micro-batch")
    parser.add_argument("--accumulation_steps", type=int, default=4, help="k: micro-batches per optimizer step")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every mode once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no_timing", action="store_true", help="measure peak memory only")
    parser.add_argument("--tensor_peak", action="store_true", help="also profile the peak of live tensors (slow)")
    parser.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.accumulation_steps < 2 or args.micro_batch_size < 1:
        parser.error("--accumulation_steps must be at least 2 and --micro_batch_size at least 1")
    return args


# ----- the three steps ------------------------------------------------------------------------------------------


def make_step(model, optimizer, inputs: dict, mode: str, chunks: int, device: str, dtype: str):
    """One optimizer step of `mode` on `inputs` (k x b pairs), in `chunks` micro-batches where it accumulates."""

    def forward(**batch):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return model(**batch)

    def loss_of(outputs) -> torch.Tensor:
        return global_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias)

    micro_batches = split_batch(inputs, chunks)

    def step():
        if mode == "big_batch":
            loss_of(forward(**inputs)).backward()
        elif mode == "contrastive_accumulation":
            cache = embed_without_gradients(forward, micro_batches, torch.device(device))
            backward_through_cache(forward, micro_batches, cache, loss_of(cache))
        else:  # plain accumulation, scaled as accelerate scales it
            for micro_batch in micro_batches:
                (loss_of(forward(**micro_batch)) / chunks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ----- time per step --------------------------------------------------------------------------------------------


def measure_time(args) -> dict:
    k, b = args.accumulation_steps, args.micro_batch_size
    model = build_model(args.size, "ndlinear", args.seed, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs = make_inputs(model.config, k * b, args.seed, args.device)
    candidates = {mode: make_step(model, optimizer, inputs, mode, k, args.device, args.dtype) for mode in MODES}
    times = time_interleaved(candidates, args.rounds, args.warmup, args.device, alternate_order=True)
    median = {mode: statistics.median(seconds) for mode, seconds in times.items()}
    return {
        "step": {mode: {**summarize(seconds), "pairs_per_s": k * b / median[mode]} for mode, seconds in times.items()},
        "time_ratio_vs_big_batch": {
            mode: statistics.median(t / base for t, base in zip(times[mode], times[BASELINE], strict=True))
            for mode in MODES
            if mode != BASELINE
        },
    }


# ----- peak memory, one fresh process per mode ------------------------------------------------------------------


def memory_child(args) -> dict:
    """Runs inside the fresh subprocess: the peak memory of one step of `args.mode` (see the module docstring)."""
    k, b = args.accumulation_steps, args.micro_batch_size
    memory = PeakMemory(args.device)
    baseline = memory.current()
    model = build_model(args.size, "ndlinear", args.seed, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    make_step(model, optimizer, make_inputs(model.config, k, args.seed, args.device), args.mode, k, args.device,
              args.dtype)()  # fmt: skip
    step = make_step(model, optimizer, make_inputs(model.config, k * b, args.seed, args.device), args.mode, k,
                     args.device, args.dtype)  # fmt: skip
    gc.collect()
    before_step = memory.current()
    memory.reset_peak()
    step()
    peak = memory.peak()
    result = {
        "method": memory.method,
        "peak_bytes": peak - baseline,
        "step_extra_bytes": peak - before_step,
        "peak_mib": mib(peak - baseline),
        "step_extra_mib": mib(peak - before_step),
    }
    if args.tensor_peak:
        result |= profile_tensor_peak(step, args.device)  # a second step, after the first's peak was read
    return result


def measure_memory(args) -> dict:
    argv = (
        f"--memory_child --size {args.size} --dtype {args.dtype} --micro_batch_size {args.micro_batch_size} "
        f"--accumulation_steps {args.accumulation_steps} --device {args.device} --seed {args.seed}"
    ).split()
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--tensor_peak"] if args.tensor_peak else []
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)
    modes = {mode: run_child(Path(__file__), [*argv, "--mode", mode]) for mode in MODES}
    base = modes[BASELINE]
    ratios = {
        mode: {
            "peak": ratio(modes[mode]["peak_bytes"], base["peak_bytes"]),
            "step_extra": ratio(modes[mode]["step_extra_bytes"], base["step_extra_bytes"]),
            "tensor_peak": ratio(modes[mode].get("tensor_peak_bytes") or 0, base.get("tensor_peak_bytes") or 0),
        }
        for mode in MODES
        if mode != BASELINE
    }
    return {"modes": modes, "ratio_vs_big_batch": ratios, "malloc_env": {k: os.environ[k] for k in MALLOC_ENV}}


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.memory_child:
        emit(memory_child(args))
        return
    k, b = args.accumulation_steps, args.micro_batch_size
    result = {
        "benchmark": "contrastive_accumulation",
        "hardware": hardware_info(args.device),
        "size": args.size,
        "dtype": args.dtype,
        "micro_batch_size": b,
        "accumulation_steps": k,
        "pairs_per_step": k * b,
    }
    if not args.no_timing:
        result["time"] = measure_time(args)
        gc.collect()
    if not args.no_memory:
        result["memory"] = measure_memory(args)
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
