"""The streaming benchmark runs at its smallest settings (tiny size, a few Flickr8k-like photos in two shards, loading
in this process) and prints one JSON object with finite, positive rates and ratios. No timing is asserted."""

from benchmark_runs import check_hardware, positive, run_benchmark


def test_streaming_against_map_style(capsys):
    result = run_benchmark(
        capsys, "bench_streaming", "--size", "tiny", "--images", "20", "--shards", "2", "--batch_size", "4",
        "--workers", "0", "--buffer", "8", "--rounds", "1", "--warmup", "0",
    )  # fmt: skip
    check_hardware(result)
    tiny = result["sizes"]["tiny"]
    assert set(tiny["loaders"]) == {"map/workers0", "stream/workers0/buffer0", "stream/workers0/buffer8"}
    assert sum(result["data"]["shards"].values()) == result["data"]["train_images"] == 18  # 2 of 20 held out
    for name, loader in tiny["loaders"].items():
        assert positive(loader["steady_images_per_s"]) and positive(loader["epoch_images_per_s"]), name
    assert tiny["loaders"]["stream/workers0/buffer8"]["batches_per_epoch"] == 4  # 18 samples, full batches of 4
    assert positive(tiny["stream_over_map"]["workers0"]["steady_images_per_s"])
    assert positive(tiny["buffer_cost"]["workers0"]) and positive(tiny["training_stream_over_map"]["workers0"])
    assert set(result["targets"]["training_stream_over_map >= 0.9"]) == {"tiny/workers0"}
