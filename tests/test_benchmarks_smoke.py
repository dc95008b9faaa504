"""The benchmarks of the model's parts run at their smallest settings and print one JSON object whose numbers are
finite and positive and whose correctness checks pass.

No timing is asserted (the numbers depend on the machine and on whatever else runs on it): only that the scripts
work, that they measured what their options asked for, and that what they compare computes the same thing."""

import json

import pytest
from benchmark_runs import check_hardware, import_benchmark, positive, run_benchmark

from ndclip.layouts import captions_of


def test_train_step_throughput(tmp_path, capsys):
    output = tmp_path / "train_step.json"
    argv = f"--size tiny --dtype fp32 --batch_size 4 --steps 2 --warmup 1 --no_memory --output {output}".split()
    result = run_benchmark(capsys, "bench_train_step", *argv)
    assert json.loads(output.read_text()) == result
    check_hardware(result)
    assert result["memory"] == {}  # --no_memory
    run = result["throughput"]["tiny/fp32"]
    for candidate in ("ndlinear", "linear", "ndlinear_without_copies"):
        assert run["step"][candidate]["samples"] == 2, candidate  # --steps 2, every candidate in every round
        assert positive(run["step"][candidate]["samples_per_s"]) and positive(run["head_share_of_step"][candidate])
    for key in ("without_copies_vs_ndlinear_throughput", "ndlinear_vs_linear_throughput_implied_by_heads",
                "fraction_of_matmul_peak"):
        assert positive(run[key]), key
    assert 0 <= run["without_copies_max_rel_diff"] < 1e-4  # the copy-free head computes the package's head
    target = result["targets"]["ndlinear_vs_linear_throughput >= 0.98"]["tiny/fp32"]
    assert target["ci95"] is None and target["met"].startswith("unresolved: fewer than 6 rounds")


def test_median_confidence_interval_and_throughput_verdict():
    bench_train_step, common = import_benchmark("bench_train_step"), import_benchmark("common")

    # Binomial(20, 1/2): P(X <= 5) = 0.0207 <= 0.025 < P(X <= 6): the 6th and the 15th of 20 sorted values.
    assert common.median_confidence_interval([float(n) for n in range(20, 0, -1)]) == (6.0, 15.0)
    assert common.median_confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 2 / 2**5 > 0.025: no interval
    assert bench_train_step.throughput_verdict((0.99, 1.05)) is True
    assert bench_train_step.throughput_verdict((0.90, 0.97)) is False
    assert bench_train_step.throughput_verdict((0.97, 1.01)).startswith("unresolved: the 95% interval [0.970, 1.010]")


def test_train_step_memory(capsys):
    """One configuration's measurement, as its fresh subprocess runs it: gradient checkpointing lowers the peak of
    live tensors, and the profiler's parameter bytes are the model's."""
    argv = "--memory_child --size tiny --dtype fp32 --batch_size 4".split()
    plain = run_benchmark(capsys, "bench_train_step", *argv)
    checkpointed = run_benchmark(capsys, "bench_train_step", *argv, "--checkpointing")
    for memory in (plain, checkpointed):
        assert memory["tensor_peak_by_category_mib"]["parameter"] == pytest.approx(
            memory["parameter_bytes"] / 2**20, abs=0.1
        )
    assert checkpointed["parameter_bytes"] == plain["parameter_bytes"]
    assert checkpointed["tensor_peak_bytes"] < plain["tensor_peak_bytes"]


def test_heads(capsys):
    """Timing in this process; the quality runs in the `run_clip.py --preset demo` subprocesses the benchmark
    launches, one per head type."""
    result = run_benchmark(
        capsys, "bench_heads",
        *"--size tiny --dtype fp32 --batch_size 8 --steps 2 --warmup 1 --repeats 1 --quality_steps 2".split(),
    )
    check_hardware(result)
    heads = result["heads"]["tiny"]
    # The tiny towers' 32-wide outputs, grids 4 x 8 -> 4 x 4: 2 x (4x4 + 4 + 8x4 + 4) against 2 x (32 x 16 + 16).
    assert heads["parameters"]["ndlinear"]["total"] == 112 and heads["parameters"]["linear"]["total"] == 1056
    run = result["step_time"]["tiny/fp32"]
    for candidate in ("ndlinear", "linear", "ndlinear_without_copies"):
        assert run["fwd_bwd"][candidate]["samples"] == 2 and positive(run["fwd_bwd"][candidate]["samples_per_s"])
    assert positive(run["ndlinear_vs_linear_time"]) and positive(run["without_copies_vs_ndlinear_speed"])
    assert 0 <= run["without_copies_max_rel_diff"] < 1e-4
    quality = result["quality_on_demo"]
    for kind in ("ndlinear", "linear"):
        assert quality["runs"][kind]["seed0"]["steps"] == 2, kind  # --quality_steps reached run_clip.py
        for key in ("image_to_text_recall@1", "image_to_text_recall@5", "zero_shot_accuracy"):
            assert 0 <= quality["table"][kind][key] <= 1, (kind, key)
    # The demo's 64-wide towers: NdLinear heads 8 x 8 -> 8 x 8, 2 x (8x8 + 8 + 8x8 + 8), against 2 x (64 x 64 + 64).
    assert quality["table"]["ndlinear"]["head_parameters"] == 288
    assert quality["table"]["linear"]["head_parameters"] == 2 * (64 * 64 + 64)


def test_eval(capsys):
    """Timing in this process; peak memory in the fresh subprocesses the benchmark launches, one per measurement."""
    result = run_benchmark(capsys, "bench_eval", *"--images 40 --scale 2 --steps 2 --large_steps 1 --warmup 1".split())
    check_hardware(result)
    small, large = result["time"]["40x200"], result["time"]["80x400"]
    assert small["naive"]["samples"] == 2 and large["chunked"]["samples"] == 1 and "naive" not in large
    assert small["metrics_max_abs_diff_naive_vs_chunked"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < small["metrics"]["image_to_text_recall@10"] <= 1
    for size, methods in (("40x200", ("naive", "chunked")), ("80x400", ("chunked",))):
        for method in methods:
            assert result["memory"][size][method]["extra_bytes"] >= 0, (size, method)
    assert positive(result["bounded_memory"]["large_chunked_extra_vs_bound"])


def test_length_grouping(tmp_path, capsys):
    """On captions of a Flickr8k token file, grouping by length pads less than random batches."""
    token_file = tmp_path / "Flickr8k.token.txt"
    token_file.write_text("".join(f"{n}.jpg#{k}\t{text}\n" for n in range(20) for k, text in enumerate(captions_of(n))))
    result = run_benchmark(
        capsys, "bench_length_grouping", "--captions_file", str(token_file), "--samples", "256", "--epochs", "1",
        "--batch_size", "8", "--rounds", "1", "--warmup", "0",
    )
    check_hardware(result)
    assert result["captions"]["count"] == 100  # 20 images x 5 captions, read as a token file
    random, grouped = result["padding"]["random"], result["padding"]["grouped"]
    assert random["batches"] == grouped["batches"] == 32  # 256 samples in full batches of 8, one epoch
    assert 0 <= grouped["padding_fraction"] < random["padding_fraction"] < 1
    assert grouped["padded_length"] < random["padded_length"]
    assert result["step"]["grouped"]["caption_tokens"] < result["step"]["random"]["caption_tokens"]
    assert positive(result["grouped_vs_random_throughput"])
