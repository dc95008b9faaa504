"""benchmarks/bench_training_options.py without its runs (each is a `run_clip.py --preset demo` subprocess of
minutes): the order of the runs, the equal-time step count, the resumable results file and the table."""

import json

import pytest
from benchmark_runs import import_benchmark

bench = import_benchmark("bench_training_options")


def record(option: str, seed: int, budget: int = 100, **values) -> dict:
    quality = dict.fromkeys(bench.QUALITY_KEYS, 0.5)
    return {"option": option, "seed": seed, "budget": budget, "steps": budget, "s_per_step": 0.1,
            "peak_rss_mib": 500.0, "training_rss_growth_mib": 20.0, "output_dir": f"/runs/{option}_seed{seed}",
            **quality, **values}  # fmt: skip


def test_every_option_runs_after_what_it_needs():
    assert bench.plan(["captions5_equal_time"]) == ["default", "captions5_equal_steps", "captions5_equal_time"]
    assert bench.plan(["prompt_ensemble", "sigmoid"]) == ["default", "prompt_ensemble", "sigmoid"]
    assert bench.plan(list(bench.OPTIONS)) == list(bench.OPTIONS)  # the listed order already satisfies every need
    with pytest.raises(Exception, match="comma-separated list of default"):
        bench.option_list("default,bogus")
    assert bench.demo_steps() == 1240  # the demo's 20 epochs of 62 steps, as the README's demo table


def test_equal_time_steps_and_step_times():
    default, captions5 = record("default", 0, s_per_step=0.2), record("captions5_equal_steps", 0, s_per_step=0.25)
    assert bench.equal_time_steps(1240, default, captions5) == 992  # 1240 x 0.2 / 0.25
    assert bench.equal_time_steps(1, default, captions5) == 1
    # Step n first shown at these times; the evaluation after step 3 is a gap the median leaves out.
    progress = {"train": [(1, 1.0), (2, 1.1), (3, 1.2), (4, 9.0), (5, 9.1), (6, 9.2)]}
    assert bench.median_step_seconds(progress) == pytest.approx(0.1)
    assert bench.median_step_seconds({}) is None


def test_results_file_resumes_after_a_half_written_line(tmp_path):
    path = tmp_path / "results.jsonl"
    assert bench.read_results(path) == []
    bench.append_result(path, record("default", 0))
    bench.append_result(path, record("default", 0, zero_shot_accuracy=0.75))  # a rerun: the latest counts
    with path.open("a") as f:
        f.write('{"option": "sigmoid", "se')  # killed while writing
    records = bench.read_results(path)
    assert len(records) == 2
    assert bench.find(records, "default", 0, 100)["zero_shot_accuracy"] == 0.75
    assert bench.find(records, "default", 0, 5) is None and bench.find(records, "sigmoid", 0, 100) is None
    bench.append_result(path, {**record("prompt_ensemble", 0), "ensemble": "builtin"})
    records = bench.read_results(path)
    assert bench.find(records, "prompt_ensemble", 0, 100, "builtin")["ensemble"] == "builtin"
    assert bench.find(records, "prompt_ensemble", 0, 100, "mine.txt") is None  # another ensemble: to be run


def test_table_means_over_seeds_and_ratios_to_the_same_seeds_default(tmp_path, capsys):
    records = [
        record("default", 0, s_per_step=0.1, peak_rss_mib=400.0, training_rss_growth_mib=10.0, zero_shot_accuracy=0.9),
        record("default", 1, s_per_step=0.2, peak_rss_mib=600.0, training_rss_growth_mib=20.0, zero_shot_accuracy=0.8),
        record("sigmoid", 0, s_per_step=0.15, peak_rss_mib=400.0, training_rss_growth_mib=10.0),
        record("sigmoid", 1, s_per_step=0.2, peak_rss_mib=660.0, training_rss_growth_mib=22.0),
        record("default", 0, budget=5, zero_shot_accuracy=0.1),  # another budget: not in this table
        {"option": "prompt_ensemble", "seed": 0, "budget": 100, "ensemble": "builtin", "ensemble_templates": 12,
         "zero_shot_accuracy_one_template": 0.9, "zero_shot_accuracy": 0.95},
        {"option": "prompt_ensemble", "seed": 0, "budget": 100, "ensemble": "mine.txt", "ensemble_templates": 3,
         "zero_shot_accuracy_one_template": 0.9, "zero_shot_accuracy": 0.85},
    ]  # fmt: skip
    lines = bench.table(records, budget=100).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    one, builtin, mine = (f"prompt_ensemble: {name}" for name in ("one template", "builtin (12 templates)",
                                                                    "mine.txt (3 templates)"))  # fmt: skip
    assert list(rows) == ["default", "sigmoid", one, builtin, mine]
    assert rows["default"][6] == "0.850" and rows["default"][-1] == "0, 1 |"
    assert rows["sigmoid"][7:12] == ["0.1750", "1.25", "530", "16.0", "1.05"]  # means of 1.5 and 1.0; of 1.0 and 1.1
    assert [rows[name][6] for name in (one, builtin, mine)] == ["0.900", "0.950", "0.850"]
    # --table_only prints the table of a results file, at the budget of --max_train_steps, and runs nothing.
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bench.main(["--table_only", "--results", str(tmp_path / "results.jsonl"), "--max_train_steps", "100"])
    assert capsys.readouterr().out.strip() == "\n".join(lines)
