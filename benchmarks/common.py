"""What the NdCLIP benchmarks share: the hardware label, interleaved timing, peak memory of a fresh process, the
bf16 autocast switch, an NdLinear forward without copies, and printing the one JSON result.

Every benchmark times its candidates side by side in the same run, interleaved (A, B, A, B, ...) after a warmup,
and reports medians and ratios against the baseline measured in that run: on a shared machine only such ratios
mean something. Peak memory is measured one configuration per fresh subprocess (`run_child`), so that one
configuration's allocations never count against another's.
"""

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

DTYPES = ("fp32", "bf16")


# ----- command line and output ----------------------------------------------------------------------------------


def add_common_args(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the JSON result to this file")


def comma_list(choices: tuple[str, ...], allow_empty: bool = False) -> Callable[[str], list[str]]:
    """An argparse type for `a,b` lists whose items must be among `choices`."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if (not items and not allow_empty) or unknown:
            raise ValueError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return items

    parse.__name__ = "list"
    return parse


def setup_torch(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")


def emit(result: dict, output: str | None = None) -> None:
    """Print the one JSON object of a run (and write it to `output`)."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if output:
        Path(output).write_text(text + "\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16 matmuls are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def hardware_info(device: str) -> dict:
    """The label every absolute number needs: what it was measured on, and how busy the machine was."""
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def finish(result: dict) -> dict:
    """Stamp the end of a run: the load average shows whether other work shared the machine."""
    result["hardware"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


# ----- timing ---------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: str,
    repeats: dict[str, int] | None = None,
    alternate_order: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured in turn (A, B, A, B, ...) so that they share the machine's mood.

    `warmup` untimed rounds come first; each timed sample of candidate `name` is the mean of `repeats[name]`
    back-to-back calls (default 1; use more for calls too short for the clock). `alternate_order` runs every other
    round in reverse (A, B, B, A, ...), so that no candidate always comes first in its round.
    """
    repeats = repeats or {}
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times = {name: [] for name in candidates}
    for round_index in range(rounds):
        order = list(candidates.items())
        if alternate_order and round_index % 2:
            order.reverse()
        for name, fn in order:
            calls = repeats.get(name, 1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
    return times


def median_confidence_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of `values`: the order statistics whose ranks the
    binomial(n, 1/2) distribution puts `(1 - confidence) / 2` below and above. None for fewer than 6 values (no such
    interval at 95%)."""
    ordered, n = sorted(values), len(values)
    tail = (1 - confidence) / 2
    below, k = 0.0, 0  # P(Binomial(n, 1/2) < k+1), accumulated while it stays within the tail
    while below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


def summarize(seconds: list[float]) -> dict:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "samples": len(seconds),
    }


class LoaderEpoch:
    """A callable that pulls one epoch of batches from a training DataLoader, as `run_clip.py` does: the collator's
    `set_epoch`, a fresh iterator (with workers, the worker processes start anew, as without `persistent_workers`),
    every batch pulled and dropped. It keeps the time to the first batch and the time of the rest (the steady rate
    of a long epoch). `threads`: torch intra-op threads of this process during the epoch (None: unchanged)."""

    def __init__(self, loader, collator, threads: int | None = None):
        self.loader, self.collator, self.threads = loader, collator, threads
        self.epoch = 0
        self.first_batch_s, self.rest_s, self.batches = [], [], len(loader)

    def __call__(self) -> None:
        self.collator.set_epoch(self.epoch)
        self.epoch += 1
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            start = time.perf_counter()
            batches = iter(self.loader)
            next(batches)
            first = time.perf_counter()
            for _ in batches:
                pass
            self.first_batch_s.append(first - start)
            self.rest_s.append(time.perf_counter() - first)
        finally:
            torch.set_num_threads(threads)


def measure_matmul_flops(device: str, dtype: str, rounds: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype`: the machine's practical peak, right now, as the yardstick for
    `fraction_of_matmul_peak` (honest throughput accounting, as nanoGPT's `estimate_mfu`)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    size = 4096 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    times = time_interleaved({"matmul": lambda: a @ b}, rounds=rounds, warmup=1, device=device)["matmul"]
    return 2 * size**3 / statistics.median(times)


@contextmanager
def autocast(device: str, dtype: str):
    """bf16 autocast for `dtype == "bf16"`; plain fp32 otherwise."""
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        yield


# ----- peak memory of a fresh process ---------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


class PeakMemory:
    """Current and peak memory of this process, on the CPU or on the GPU.

    CPU: resident set size (RSS). `reset_peak` writes 5 to `/proc/self/clear_refs`, which resets the kernel's
    high-water mark `VmHWM` to the current RSS; `peak` reads `VmHWM` back. Where that file is not writable the
    peak is `ru_maxrss`, the high-water mark of the whole process life (method `ru_maxrss`), which is why each
    configuration runs in its own fresh process. RSS counts what the process touched, including memory that the C
    allocator keeps after `free`, so it is an upper bound of what torch held.
    CUDA: `torch.cuda.memory_allocated` / `max_memory_allocated` after `reset_peak_memory_stats` (tensors only;
    the CUDA context and the caching allocator's reserve are not counted).
    """

    def __init__(self, device: str):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device == "cuda" else "VmHWM after clear_refs"

    def current(self) -> int:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return _proc_status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "ru_maxrss (whole process life)"

    def peak(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.method == "ru_maxrss (whole process life)":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        return _proc_status_bytes("VmHWM")


def profile_tensor_peak(fn: Callable[[], object], device: str) -> dict:
    """Peak bytes of live tensors while `fn` runs, and what they were at that moment, from torch.profiler's memory
    timeline (the analogue of `torch.cuda.max_memory_allocated` on any device, without the C allocator's slack).

    Tensors that exist before `fn` count from the first time an operator touches them (parameters, optimizer
    state, the batch). Categories are the profiler's: parameter, optimizer_state, input, activation, gradient,
    autograd_detail, temporary, unknown. `export_memory_timeline` is marked deprecated in torch 2.x (it points to the
    CUDA-only snapshot tools), so a torch without it gives `None` here rather than failing the benchmark.
    """
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX

        with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
            fn()
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            path = Path(folder) / "timeline.json"
            prof.export_memory_timeline(str(path), device="cuda:0" if device == "cuda" else "cpu")
            _, sizes = json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001 - a profiler feature missing must not cost the whole benchmark
        print(f"profile_tensor_peak: {type(error).__name__}: {error}", file=sys.stderr)
        return {"tensor_peak_bytes": None, "tensor_peak_by_category_mib": None}
    names = ["unused"] + [
        (category.name.lower() if category is not None else "unknown")
        for category, _ in sorted(_CATEGORY_TO_INDEX.items(), key=lambda item: item[1])
    ]
    at_peak = max(sizes, key=sum)
    return {
        "tensor_peak_bytes": sum(at_peak),
        "tensor_peak_by_category_mib": {name: mib(size) for name, size in zip(names, at_peak) if size},
    }


def run_child(script: Path, argv: list[str], timeout: float | None = None) -> dict:
    """Run `python script argv...` in a fresh process and return the JSON object it prints."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(argv)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout)


def ratio(numerator: float, denominator: float) -> float | None:
    """`numerator / denominator`, or None where the denominator is not positive (a memory delta can be 0 at tiny
    sizes, when freed memory the allocator kept is reused)."""
    return numerator / denominator if denominator > 0 else None


def mib(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)


# ----- the NdLinear head, applied without copies ----------------------------------------------------------------


def ndlinear_forward_without_copies(ndlinear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`ndlinear.NdLinear.forward` (with `transform_outer=True`) without moving any axis.

    The package transposes each axis to the end, makes it contiguous, applies the axis's `nn.Linear` and transposes
    back (two copies per axis). Here the tensor keeps its layout: axis `i` is contracted by viewing `x` as
    `[before, d_i, after]` (a view, for the contiguous tensors a head sees) and left-multiplying by the weight; the last
    axis is a plain `F.linear`. Same sums, same order of axes, so the result equals the package's up to float rounding.
    """
    if not ndlinear.transform_outer:
        raise NotImplementedError("only the transform_outer=True order (NdLinear's default) is implemented")
    last = x.dim() - 1
    for axis, layer in enumerate(ndlinear.align_layers, start=1):
        if axis == last:
            x = nn.functional.linear(x, layer.weight, layer.bias)
            continue
        shape = x.shape
        grid = x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))
        grid = torch.matmul(layer.weight, grid) + layer.bias[:, None]  # [before, out, after]
        x = grid.view(*shape[:axis], layer.out_features, *shape[axis + 1 :])
    return x


@contextmanager
def heads_without_copies(model: nn.Module):
    """Within the block, every `NdLinear` in `model` runs `ndlinear_forward_without_copies` (weights unchanged)."""
    from ndlinear import NdLinear

    layers = [m for m in model.modules() if isinstance(m, NdLinear)]
    for layer in layers:
        layer.forward = lambda x, layer=layer: ndlinear_forward_without_copies(layer, x)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def make_heads_step(heads: nn.ModuleList, batch_size: int, device: str, dtype: str, without_copies: bool = False):
    """Forward + backward of projection heads alone, as inside a training step: random pooled vectors in (one batch
    per head, the same for every call with the same arguments), and the gradients of those inputs and of the heads'
    weights out (`torch.autograd.grad`, so nothing accumulates between calls)."""
    generator = torch.Generator().manual_seed(1)
    pooled = [
        torch.randn(batch_size, math.prod(head.input_grid), generator=generator).to(device).requires_grad_()
        for head in heads
    ]
    params = list(heads.parameters())

    def forward():
        with heads_without_copies(heads) if without_copies else nullcontext(), autocast(device, dtype):
            return [head(x) for head, x in zip(heads, pooled)]

    output_grads = [torch.randn(out.shape, generator=generator).to(out) for out in forward()]

    def heads_step():
        return torch.autograd.grad(forward(), pooled + params, output_grads)

    return heads_step


def without_copies_max_rel_diff(heads: nn.ModuleList, batch_size: int, device: str) -> float:
    """Check (in fp32) that `ndlinear_forward_without_copies` gives the package's outputs and gradients up to float
    rounding (sums taken in another order, e.g. the bias gradients over the batch); return the largest difference
    relative to the largest value of its tensor."""
    package = make_heads_step(heads, batch_size, device, "fp32")()
    alternative = make_heads_step(heads, batch_size, device, "fp32", without_copies=True)()
    gaps = []
    for got, expected in zip(alternative, package):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
        gaps.append((got - expected).abs().max().item() / max(scale, 1e-30))
    return max(gaps)


def projection_macs_per_sample(projection: nn.Module) -> int:
    """Multiply-adds of one forward of an `NdClipProjection` for one example."""
    if hasattr(projection, "linear"):
        return projection.linear.in_features * projection.linear.out_features
    shape, macs = list(projection.input_grid), 0
    for axis, layer in enumerate(projection.ndlinear.align_layers):
        macs += layer.in_features * layer.out_features * math.prod(shape) // shape[axis]
        shape[axis] = layer.out_features
    return macs
