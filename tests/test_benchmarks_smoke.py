"""The benchmark scripts run end to end at their smallest settings and print one JSON object with the expected keys.

No timing is asserted (the numbers depend on the machine and on whatever else runs on it): only that the scripts
work, that the numbers they report are positive, and that their correctness checks pass."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, arguments: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *arguments.split()],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=BENCHMARKS.parent,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout)  # the whole stdout is one JSON object


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_hardware(result: dict) -> None:
    hardware = result["hardware"]
    assert hardware["device"] == "cpu"
    assert hardware["cpu"] and hardware["torch"]
    assert positive(hardware["torch_threads"])


def test_train_step_throughput(tmp_path):
    output = tmp_path / "train_step.json"
    result = run_benchmark(
        "bench_train_step.py",
        f"--size tiny --dtype fp32 --batch_size 4 --steps 2 --warmup 1 --no_memory --output {output}",
    )
    assert json.loads(output.read_text()) == result
    check_hardware(result)
    run = result["throughput"]["tiny/fp32"]
    assert run["batch_size"] == 4
    for candidate in ("ndlinear", "linear", "ndlinear_without_copies"):
        assert positive(run["step"][candidate]["samples_per_s"])
        assert run["step"][candidate]["samples"] == 2
        assert positive(run["heads_fwd_bwd"][candidate]["median_s"])
        assert positive(run["head_share_of_step"][candidate])
    ratios = (
        "ndlinear_vs_linear_throughput",
        "without_copies_vs_ndlinear_throughput",
        "without_copies_vs_ndlinear_head_speed",
    )
    for key in (*ratios, *(ratio + "_by_min" for ratio in ratios)):
        assert positive(run[key]), key
    for key in ("model_flops_per_sample", "achieved_flops_per_s", "fraction_of_matmul_peak"):
        assert positive(run[key]), key
    assert positive(run["matmul_flops_per_s"]["fp32"])
    assert 0 <= run["without_copies_max_rel_diff"] < 1e-4
    target = result["targets"]["ndlinear_vs_linear_throughput >= 0.98"]["tiny/fp32"]
    assert target["met"] in (True, False) or target["met"].startswith("unresolved")
    assert target["spread"] >= 0
    assert result["memory"] == {}


def test_train_step_memory():
    result = run_benchmark("bench_train_step.py", "--size tiny --dtype fp32 --batch_size 4 --memory_only")
    assert result["throughput"] == {}
    memory = result["memory"]["tiny/fp32"]
    for config in ("no_checkpointing", "checkpointing"):
        assert positive(memory[config]["peak_bytes"])
        assert memory[config]["step_extra_bytes"] >= 0
        assert positive(memory[config]["parameter_bytes"])
        assert positive(memory[config]["tensor_peak_bytes"])
        assert memory[config]["tensor_peak_by_category_mib"]["parameter"] > 0
    assert positive(memory["checkpointing_peak_ratio"]) and positive(memory["checkpointing_tensor_peak_ratio"])
    target = result["targets"]["checkpointing_peak_ratio <= 0.6 at batch 32"]["tiny/fp32"]
    assert target["batch_size"] == 4 and target["met"].startswith("n/a")


def test_heads():
    result = run_benchmark("bench_heads.py", "--size tiny --dtype fp32 --batch_size 8 --steps 2 --warmup 1 --repeats 1")
    check_hardware(result)
    heads = result["heads"]["tiny"]
    assert heads["parameters"]["ndlinear"]["total"] < heads["parameters"]["linear"]["total"]
    assert positive(heads["linear_to_ndlinear_parameters"])
    run = result["step_time"]["tiny/fp32"]
    for candidate in ("ndlinear", "linear", "ndlinear_without_copies"):
        assert positive(run["fwd_bwd"][candidate]["median_s"])
        assert positive(run["fwd_bwd"][candidate]["samples_per_s"])
    for key in ("ndlinear_vs_linear_time", "without_copies_vs_ndlinear_speed"):
        assert positive(run[key]) and positive(run[key + "_by_min"]), key
    assert 0 <= run["without_copies_max_rel_diff"] < 1e-4


def test_eval():
    result = run_benchmark("bench_eval.py", "--images 40 --scale 2 --steps 2 --large_steps 1 --warmup 1")
    check_hardware(result)
    small, large = "40x200", "80x400"
    assert positive(result["time"][small]["naive"]["median_s"])
    assert positive(result["time"][small]["chunked"]["median_s"])
    assert positive(result["time"][small]["chunked_vs_naive_time"])
    assert result["time"][small]["metrics_max_abs_diff_naive_vs_chunked"] == pytest.approx(0.0, abs=0.02)
    assert positive(result["time"][large]["chunked"]["median_s"])
    assert "naive" not in result["time"][large]
    for size, methods in ((small, ("naive", "chunked")), (large, ("chunked",))):
        for method in methods:
            assert result["memory"][size][method]["extra_bytes"] >= 0
        images, captions = map(int, size.split("x"))
        assert result["memory"][size]["naive_similarity_matrix_bytes"] == images * captions * 4
        assert positive(result["memory"][size]["chunked_bound_bytes"])
    assert result["bounded_memory"]["pairs_growth"] == 4
