"""Running a benchmark script as a user does (`python benchmarks/<name>.py ...`) and checking what every
benchmark reports, for the benchmark smoke tests."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, *argv: str) -> dict:
    """Run `benchmarks/<name>` offline and return the one JSON object that is its whole stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *argv],
        capture_output=True,
        check=False,  # the assertion below shows the benchmark's stderr
        text=True,
        env=env,
        cwd=BENCHMARKS.parent,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_hardware(result: dict) -> None:
    """The hardware block every benchmark prints beside its numbers."""
    hardware = result["hardware"]
    assert hardware["device"] == "cpu"
    assert hardware["cpu"] and hardware["torch"]
    assert positive(hardware["torch_threads"])
    assert "load_average_1m_at_end" in hardware
