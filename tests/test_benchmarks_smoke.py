"""The benchmark scripts run end to end at their smallest settings and print one JSON object with the expected keys.

No timing is asserted (the numbers depend on the machine and on whatever else runs on it): only that the scripts
work, that the numbers they report are positive, and that their correctness checks pass."""

import json

import pytest
from benchmark_runs import BENCHMARKS, check_hardware, positive, run_benchmark


def test_train_step_throughput(tmp_path):
    output = tmp_path / "train_step.json"
    result = run_benchmark(
        "bench_train_step.py",
        *f"--size tiny --dtype fp32 --batch_size 4 --steps 2 --warmup 1 --no_memory --output {output}".split(),
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
    assert positive(run["ndlinear_vs_linear_throughput_implied_by_heads"])
    assert positive(run["ndlinear_vs_linear_throughput_of_medians"])
    target = result["targets"]["ndlinear_vs_linear_throughput >= 0.98"]["tiny/fp32"]
    assert target["ci95"] is None and target["met"].startswith("unresolved: fewer than 6 rounds")
    assert target["met_by_heads"] == (run["ndlinear_vs_linear_throughput_implied_by_heads"] >= 0.98)
    assert result["memory"] == {}


def test_median_confidence_interval_and_throughput_verdict(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from bench_train_step import throughput_verdict
    from common import median_confidence_interval

    # Binomial(20, 1/2): P(X <= 5) = 0.0207 <= 0.025 < P(X <= 6): the 6th and the 15th of 20 sorted values.
    assert median_confidence_interval([float(n) for n in range(20, 0, -1)]) == (6.0, 15.0)
    assert median_confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 2 / 2**5 > 0.025: no 95% interval
    assert throughput_verdict((0.99, 1.05)) is True
    assert throughput_verdict((0.90, 0.97)) is False
    assert throughput_verdict((0.97, 1.01)).startswith("unresolved: the 95% interval [0.970, 1.010]")


def test_train_step_memory():
    result = run_benchmark("bench_train_step.py", *"--size tiny --dtype fp32 --batch_size 4 --memory_only".split())
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
    result = run_benchmark(
        "bench_heads.py",
        *"--size tiny --dtype fp32 --batch_size 8 --steps 2 --warmup 1 --repeats 1 --quality_steps 2".split(),
    )
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
    quality = result["quality_on_demo"]
    assert quality["seeds"] == [0] and quality["max_train_steps"] == 2
    for kind in ("ndlinear", "linear"):
        run = quality["runs"][kind]["seed0"]
        assert run["steps"] == 2 and positive(run["wall_s"])
        for key in ("image_to_text_recall@1", "image_to_text_recall@5", "zero_shot_accuracy"):
            assert 0 <= quality["table"][kind][key] <= 1
    # The demo's 64-wide towers: NdLinear heads 8 x 8 -> 8 x 8 (2 x (8x8 + 8 + 8x8 + 8) = 288) against 2 x (64 x 64 + 64).
    assert quality["table"]["ndlinear"]["head_parameters"] == 288
    assert quality["table"]["linear"]["head_parameters"] == 2 * (64 * 64 + 64)


def test_eval():
    result = run_benchmark("bench_eval.py", *"--images 40 --scale 2 --steps 2 --large_steps 1 --warmup 1".split())
    check_hardware(result)
    small, large = "40x200", "80x400"
    assert positive(result["time"][small]["naive"]["median_s"])
    assert positive(result["time"][small]["chunked"]["median_s"])
    assert positive(result["time"][small]["chunked_vs_naive_time"])
    assert result["time"][small]["metrics_max_abs_diff_naive_vs_chunked"] == pytest.approx(0.0, abs=1e-9)
    assert positive(result["time"][large]["chunked"]["median_s"])
    assert "naive" not in result["time"][large]
    for size, methods in ((small, ("naive", "chunked")), (large, ("chunked",))):
        for method in methods:
            assert result["memory"][size][method]["extra_bytes"] >= 0
        images, captions = map(int, size.split("x"))
        assert result["memory"][size]["naive_similarity_matrix_bytes"] == images * captions * 4
        assert positive(result["memory"][size]["chunked_bound_bytes"])
    assert result["bounded_memory"]["pairs_growth"] == 4


def test_length_grouping(tmp_path):
    """On captions of a Flickr8k token file, grouping by length pads less than random batches."""
    from ndclip.layouts import captions_of

    token_file = tmp_path / "Flickr8k.token.txt"
    token_file.write_text("".join(f"{n}.jpg#{k}\t{text}\n" for n in range(20) for k, text in enumerate(captions_of(n))))
    result = run_benchmark(
        "bench_length_grouping.py", "--captions_file", str(token_file), "--samples", "256", "--epochs", "1",
        "--batch_size", "8", "--rounds", "1", "--warmup", "0",
    )
    check_hardware(result)
    assert result["captions"]["count"] == 100 and positive(result["captions"]["mean_tokens"])
    random, grouped = result["padding"]["random"], result["padding"]["grouped"]
    assert random["batches"] == grouped["batches"] == 32
    assert 0 <= grouped["padding_fraction"] < random["padding_fraction"] < 1
    assert grouped["padded_length"] < random["padded_length"]
    for way in ("random", "grouped"):
        assert positive(result["step"][way]["samples_per_s"])
        assert result["step"][way]["caption_tokens"] == round(result["padding"][way]["padded_length"])
    assert positive(result["grouped_vs_random_throughput"])
