"""The data-pipeline, end-to-end and frozen-cache benchmarks run at their smallest settings (tiny size, a few
photos and steps) on Flickr8k-like files and print one JSON object whose numbers are finite and positive.

No timing is asserted (the numbers depend on the machine and on whatever else runs on it): only that the scripts
work, that they measured what they say, and that the frozen-cache runs train exactly like the uncached ones. The
`run_clip.py` runs are the subprocesses these benchmarks launch and time from the outside."""

import json

from benchmark_runs import check_hardware, positive, run_benchmark


def test_data_pipeline(tmp_path, capsys):
    output = tmp_path / "data_pipeline.json"
    result = run_benchmark(
        capsys, "bench_data_pipeline", "--size", "tiny", "--images", "24", "--batch_size", "4", "--workers", "0,1",
        "--rounds", "1", "--warmup", "0", "--output", str(output),
    )
    assert json.loads(output.read_text()) == result
    check_hardware(result)
    assert result["data"]["images"] == 24 and positive(result["data"]["mean_file_bytes"])
    assert result["data"]["train_images"] < 24  # a validation split was held out
    assert positive(result["model"]["tiny"]["samples_per_s"])
    assert set(result["data_pipeline"]["tiny"]) == {"workers0", "workers1"}  # one thread: no single-thread extra
    for workers, data in result["data_pipeline"]["tiny"].items():
        for key in ("epoch_images_per_s", "steady_images_per_s", "first_batch_median_s"):
            assert positive(data[key]), (workers, key)
        assert data["epoch"]["samples"] == 1  # --rounds 1
        assert positive(result["data_over_model"]["tiny"][workers]["steady"])
    assert 0 < result["serial_fraction_workers0"]["tiny"]["workers0"] < 1


def test_end_to_end(tmp_path, capsys):
    result = run_benchmark(
        capsys, "bench_end_to_end", "--size", "tiny", "--images", "30", "--batch_size", "4", "--steps", "8",
        "--bare_steps", "1", "--workers", "0", "--keep", str(tmp_path / "work"),
    )
    check_hardware(result)
    tiny = result["sizes"]["tiny"]
    assert tiny["batch_size"] == 4 and tiny["max_train_steps"] == 8
    assert positive(tiny["bare"]["samples_per_s"]) and tiny["bare"]["samples"] == 2  # one before, one after the run
    run = tiny["pipeline"]["workers0"]
    assert positive(run["samples_per_s"]) and positive(run["median_step_s"]) and positive(run["wall_s"])
    assert 1 <= run["timed_steps"] <= 6  # never the first step, never across the epoch end
    assert run["train_images"] == 27 and run["epochs"] == 2  # 30 photos, 3 held out; 6 steps of 4 per epoch
    assert positive(tiny["pipeline_over_bare"]["workers0"])
    history = (tmp_path / "work" / "run_tiny_workers0" / "metrics.jsonl").read_text().splitlines()
    assert sum("loss" in json.loads(line) for line in history) == 8  # logged at every step


def test_frozen_cache(capsys):
    result = run_benchmark(
        capsys, "bench_frozen_cache", "--configs", "tiny/both", "--images", "20", "--image_size", "32",
        "--batch_size", "4", "--epochs", "2",
    )
    check_hardware(result)
    config = result["configs"]["tiny/both"]
    for run in ("cached", "uncached"):
        timeline = config[run]
        assert timeline["steps_per_epoch"] == {"0": 4, "1": 4}, run  # 18 training photos in batches of 4
        assert len(timeline["epoch_train_s"]) == 2 and all(positive(t) for t in timeline["epoch_train_s"])
        assert len(timeline["epoch_with_eval_s"]) == 1 and positive(timeline["epoch_with_eval_s"][0])
        assert len(timeline["eval_s"]) == 2 and all(positive(t) for t in timeline["eval_s"])
    assert positive(config["cached"]["cache_build_s"]) and config["uncached"]["cache_build_s"] is None
    assert positive(config["ratio"]) and positive(config["ratio_with_eval"])
    assert config["compared_steps"] == 8 and config["loss_max_rel_diff"] < 1e-4  # the cache changes nothing
