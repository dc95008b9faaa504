"""Running a benchmark's `main` in this process, as `python benchmarks/<name>.py ... --threads 1` runs it, and checking
the hardware block every benchmark prints, for the benchmark smoke tests.

In-process, because the point is that the benchmark code works: subprocesses remain where a benchmark launches them
itself (`run_clip.py` runs, fresh processes for peak memory). One torch thread: the smallest settings are tiny ops,
which on a shared 2-core machine run several times faster without the fork/join of a second thread.
"""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def import_benchmark(name: str):
    """`benchmarks/<name>.py` as a module. Python puts a script's own folder first on `sys.path`, which is how the
    benchmarks import their shared modules (`from common import ...`); this does the same for the import only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module(name)


def run_benchmark(capsys, name: str, *argv: str) -> dict:
    """Run `benchmarks/<name>.py argv... --threads 1` in this process and return the one JSON object it printed."""
    threads = torch.get_num_threads()
    capsys.readouterr()  # whatever an earlier step printed is not the benchmark's
    try:
        import_benchmark(name).main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_hardware(result: dict) -> None:
    """The hardware block every benchmark prints beside its numbers: `--threads 1` was applied, the load was read."""
    hardware = result["hardware"]
    assert hardware["torch_threads"] == 1
    assert hardware["load_average_1m_at_start"] >= 0 and hardware["load_average_1m_at_end"] >= 0
