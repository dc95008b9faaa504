"""The training image path benchmark (`benchmarks/bench_data_path.py`) at its smallest settings: the three paths
(NdCLIP's collator, the previous per-image path, the decode_image + scripted-transform baseline) run on 64-px
Flickr8k-like JPEGs and give finite, positive times and ratios. No timing is asserted."""

import json

from benchmark_runs import check_hardware, positive, run_benchmark


def test_data_path(tmp_path, capsys):
    output = tmp_path / "data_path.json"
    result = run_benchmark(
        capsys, "bench_data_path", "--workloads", "small30", "--images", "16", "--batch_size", "4",
        "--per_image", "1", "--workers", "0", "--rounds", "1", "--warmup", "0", "--output", str(output),
    )  # fmt: skip
    assert json.loads(output.read_text()) == result
    check_hardware(result)
    assert result["data"]["small"]["photo_size"] == [64, 64] and positive(result["data"]["small"]["mean_file_bytes"])
    small = result["workloads"]["small30"]
    assert set(small["per_image_ms"]) == {"after", "before", "baseline"}
    assert all(positive(value) for value in small["per_image_ms"].values())
    batch = small["per_batch"]["workers0"]
    assert all(positive(value) for value in batch["per_batch_ms"].values())
    for ratio in ("after/baseline", "before/baseline", "after/before"):
        assert positive(small["per_image_ratio"][ratio]["median"]) and positive(batch[ratio]["median"])
        assert batch[ratio]["interval_95"] is None  # one round gives no interval
    assert batch["target_after_le_baseline"] == "unresolved (fewer than 6 rounds)"
