"""Training options on the offline demo (issue 11): quality, time per step and peak memory of each option against
the default, two seeds, as one markdown table.

Each option is `run_clip.py --preset demo` with a few flags, in a subprocess per (option, seed), timed from the
outside (`run_clip_timing.run_clip_timed`: the time of every optimizer step, the training process's peak resident
memory). Every training run gets the same optimizer steps (`--max_train_steps`, the demo's 1,240 unless given), and the
same seed gives every option the same data, initial weights and crops. Quality is the run's final evaluation on the
demo's 200 held-out images (`eval_results.json`): image->text and text->image R@1 / R@5, zero-shot accuracy (4 shapes).

Options (`--only`, comma-separated):
  default                        the demo as it is: batch 64, softmax loss, one caption per image.
  accumulation_plain             `--gradient_accumulation_steps 4` over batches of 16: the same 64 pairs per step,
                                 but each micro-batch's loss sees only its own 15 negatives.
  contrastive_accumulation       the same 4 x 16 with `--contrastive_accumulation`: exactly the loss of the batch of
                                 64 (the gradient-cache method), in the memory of 16, for about one more forward.
  sigmoid                        `--loss sigmoid` (SigLIP) instead of the softmax loss.
  captions5_equal_steps          `--captions_per_image 5`: all five captions of each of the 64 images in every batch.
  captions5_equal_time           the same, at the default's wall-clock budget: its steps are the default's times the
                                 ratio of their median time per step (default / captions5_equal_steps, same seed,
                                 measured by this benchmark in adjacent runs; both run first if missing).
  prompt_ensemble                evaluation only, on the default run's model: zero-shot accuracy with the one template
                                 `a photo of a {}.` against `--zero_shot_templates` of `--ensemble` (`builtin`, the
                                 set of ndclip.prompts, or a template file), through run_clip's own evaluation; the
                                 one-template number is checked to equal the training run's.

Every finished run is appended to `--results` (JSON lines) at once, so an interrupted benchmark resumes where it
stopped (runs already there are skipped; `--rerun` repeats them), and `--table_only` prints the table from that file.
The trained models stay in `--work_dir` (the prompt evaluation reads the default's). Ratios against the default are
per seed (same seed, same benchmark invocation where possible); on a shared machine only such ratios mean something,
and the load average is recorded with every run. Memory is the training process's resident set (data loader workers
not counted; `run_clip_timing.PeakRss`): its peak over the whole run, which on the CPU is mostly the Python and torch
runtime, the generated data and the model, and its growth during training (the peak from the first step on, less the
resident size at that step: activations, gradients, optimizer state), the column that tells options apart. On a GPU
these are host numbers; the accumulation's device memory at real size is measured by
benchmarks/bench_contrastive_accumulation.py.

    python benchmarks/bench_training_options.py --seeds 0 1 --results training_options.jsonl
    python benchmarks/bench_training_options.py --only default,sigmoid --seeds 0
    python benchmarks/bench_training_options.py --table_only --results training_options.jsonl
    python benchmarks/bench_training_options.py --max_train_steps 5 --seeds 0 --work_dir /tmp/opts  # a quick check
"""

import argparse
import datetime
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

from common import cpu_model, mib
from run_clip_timing import child_env, run_clip_timed

from ndclip.demo import DEMO_TRAINING_DEFAULTS, make_demo_dataset

QUALITY_KEYS = (
    "image_to_text_recall@1",
    "image_to_text_recall@5",
    "text_to_image_recall@1",
    "text_to_image_recall@5",
    "zero_shot_accuracy",
)
DEMO_BATCH = DEMO_TRAINING_DEFAULTS["per_device_train_batch_size"]
ACCUMULATION_STEPS = 4
MICRO_BATCH = ["--gradient_accumulation_steps", str(ACCUMULATION_STEPS),
               "--per_device_train_batch_size", str(DEMO_BATCH // ACCUMULATION_STEPS)]  # fmt: skip
# The flags of each training option, on top of `--preset demo --seed S --max_train_steps N`.
TRAINING_OPTIONS = {
    "default": [],
    "accumulation_plain": MICRO_BATCH,
    "contrastive_accumulation": [*MICRO_BATCH, "--contrastive_accumulation"],
    "sigmoid": ["--loss", "sigmoid"],
    "captions5_equal_steps": ["--captions_per_image", "5"],
    "captions5_equal_time": ["--captions_per_image", "5"],
}
PROMPT_OPTION = "prompt_ensemble"
OPTIONS = (*TRAINING_OPTIONS, PROMPT_OPTION)
# What an option needs to have run first, with the same seed.
NEEDS = {"captions5_equal_time": ("default", "captions5_equal_steps"), PROMPT_OPTION: ("default",)}


def demo_steps() -> int:
    """The demo's optimizer steps: its epochs over its training images in batches of `DEMO_BATCH` (the last partial
    batch dropped)."""
    import inspect

    train_images = inspect.signature(make_demo_dataset).parameters["num_train"].default
    return DEMO_TRAINING_DEFAULTS["num_train_epochs"] * (train_images // DEMO_BATCH)


def option_list(text: str) -> list[str]:
    options = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [option for option in options if option not in OPTIONS]
    if not options or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(OPTIONS)}, got {text!r}")
    return options


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=option_list, default=list(OPTIONS), help="options to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max_train_steps", type=int, help="optimizer steps of every run (default: the demo's)")
    parser.add_argument("--ensemble", default="builtin", help="prompt_ensemble's templates: `builtin` or a file")
    parser.add_argument("--results", default="training_options.jsonl", help="JSON lines, one per finished run")
    parser.add_argument("--work_dir", help="where the runs' output folders stay (default: a new temporary folder)")
    parser.add_argument("--rerun", action="store_true", help="run again what --results already holds")
    parser.add_argument("--table_only", action="store_true", help="print the table of --results; run nothing")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's own choice)")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before a run is killed")
    args = parser.parse_args(argv)
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be at least 1, got {args.max_train_steps}")
    return args


# ----- the results file -----------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    """The records of `path` (none when it does not exist); a half-written last line (a killed run) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_result(path: Path, record: dict) -> None:
    """One line more; after a half-written last line (a killed run) on a line of its own, so both stay readable."""
    cut = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if cut else "") + json.dumps(record) + "\n")


def find(records: list[dict], option: str, seed: int, budget: int, ensemble: str | None = None) -> dict | None:
    """The latest record of (option, seed) at this step budget (for `prompt_ensemble`, of this ensemble)."""
    key = (option, seed, budget, ensemble)
    matches = [r for r in records if (r["option"], r["seed"], r["budget"], r.get("ensemble")) == key]
    return matches[-1] if matches else None


# ----- runs -----------------------------------------------------------------------------------------------------


def median_step_seconds(progress: dict) -> float | None:
    """The median time between consecutive optimizer steps of the `train` progress bar (evaluations and epoch
    starts fall between a few steps: the median leaves them out)."""
    times = [t for _, t in sorted(progress.get("train", []))]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else None


def equal_time_steps(budget: int, default: dict, captions5: dict) -> int:
    """Steps of `captions_per_image 5` that take the default's time: the default's steps times the ratio of the
    median times per step (at least 1)."""
    return max(1, round(budget * default["s_per_step"] / captions5["s_per_step"]))


def train_option(option: str, seed: int, steps: int, budget: int, work_dir: Path, args) -> dict:
    """One `run_clip.py --preset demo` run of `option`; its record."""
    output_dir = work_dir / f"{option}_seed{seed}"
    argv = ["--preset", "demo", "--seed", str(seed), "--max_train_steps", str(steps), "--output_dir",
            str(output_dir), "--overwrite_output_dir", *TRAINING_OPTIONS[option]]  # fmt: skip
    load_before = os.getloadavg()[0]
    run = run_clip_timed(argv, child_env(work_dir, args.threads), timeout=args.timeout)
    results = json.loads((output_dir / "eval_results.json").read_text())
    return {
        "option": option, "seed": seed, "budget": budget, "argv": argv, "output_dir": str(output_dir),
        "steps": results["step"], "wall_s": run["wall_s"], "s_per_step": median_step_seconds(run["progress"]),
        "peak_rss_mib": mib(run["peak_rss_bytes"]) if run["peak_rss_bytes"] else None,
        "training_rss_growth_mib": (
            mib(run["training_rss_growth_bytes"]) if run["training_rss_growth_bytes"] is not None else None
        ),
        **{key: results[key] for key in QUALITY_KEYS},
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip


def evaluate_prompts(model_dir: str, seed: int, templates: str | None) -> dict:
    """run_clip's own evaluation of the saved model `model_dir` on the demo's held-out split of `seed`, with the one
    template (`templates` None) or `--zero_shot_templates templates`."""
    from accelerate import Accelerator

    import run_clip
    from modeling_ndclip import NdClipModel
    from ndclip.evaluation import evaluate
    from processing_ndclip import NdClipProcessor

    # The evaluation writes nothing: --output_dir is only required by the parser.
    argv = ["--preset", "demo", "--seed", str(seed), "--output_dir", model_dir, "--dataloader_num_workers", "0"]
    args = run_clip.parse_args(argv + (["--zero_shot_templates", templates] if templates else []))
    accelerator = Accelerator()
    run_clip.set_loader_defaults(args, accelerator)
    validation = run_clip.read_data(args)[args.eval_split]
    model = NdClipModel.from_pretrained(model_dir)
    processor = NdClipProcessor.from_pretrained(model_dir)
    _, eval_collator = run_clip.build_collators(args, processor)
    loaders = run_clip.build_eval_loaders(validation, eval_collator, args)
    loaders = {name: accelerator.prepare(loader) for name, loader in loaders.items()}
    model = accelerator.prepare(model)
    names = validation.features["label"].names
    return evaluate(model, loaders, processor, accelerator, args, class_names=names)


def prompt_record(seed: int, budget: int, default: dict, templates: str) -> dict:
    """Zero-shot accuracy of the default run's model with one template and with the ensemble `templates`. The
    one-template number is checked against the training run's own final evaluation (`matches_training_eval`)."""
    single = evaluate_prompts(default["output_dir"], seed, None)
    ensemble = evaluate_prompts(default["output_dir"], seed, templates)
    matches = abs(single["zero_shot_accuracy"] - default["zero_shot_accuracy"]) < 1e-9
    if not matches:
        print(
            f"[bench_training_options] WARNING: the one-template re-evaluation of {default['output_dir']} gives "
            f"{single['zero_shot_accuracy']}, its training run {default['zero_shot_accuracy']}",
            flush=True,
        )
    return {
        "option": PROMPT_OPTION, "seed": seed, "budget": budget, "model": default["output_dir"],
        "one_template": single["zero_shot_templates"], "ensemble": templates,
        "ensemble_templates": len(ensemble["zero_shot_templates"]),
        "zero_shot_accuracy_one_template": single["zero_shot_accuracy"],
        "zero_shot_accuracy": ensemble["zero_shot_accuracy"], "matches_training_eval": matches,
    }  # fmt: skip


def plan(options: list[str]) -> list[str]:
    """The options to run, each after what it needs."""
    ordered = []
    for option in options:
        for needed in (*NEEDS.get(option, ()), option):
            if needed not in ordered:
                ordered.append(needed)
    return ordered


def run_all(args) -> list[dict]:
    results_path = Path(args.results)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_training_options_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    budget = args.max_train_steps or demo_steps()
    for seed in args.seeds:
        for option in plan(args.only):
            records = read_results(results_path)
            ensemble = args.ensemble if option == PROMPT_OPTION else None
            if find(records, option, seed, budget, ensemble) and not (args.rerun and option in args.only):
                continue
            print(f"[bench_training_options] {option}, seed {seed}", flush=True)
            if option == PROMPT_OPTION:
                record = prompt_record(seed, budget, find(records, "default", seed, budget), args.ensemble)
            else:
                steps = budget
                if option == "captions5_equal_time":
                    default, captions5 = (find(records, name, seed, budget) for name in NEEDS[option])
                    steps = equal_time_steps(budget, default, captions5)
                record = train_option(option, seed, steps, budget, work_dir, args)
            record["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
            record["cpu"] = cpu_model()
            append_result(results_path, record)
    return read_results(results_path)


# ----- the table ------------------------------------------------------------------------------------------------


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(records: list[dict], budget: int | None = None) -> str:
    """The markdown table: per option, the mean over its seeds (the seeds in the last column); time per step and
    memory also as ratios to the default of the same seed. The latest record of each run counts."""
    if budget is None and records:
        budget = records[-1]["budget"]
    latest = {}
    for record in records:
        if record["budget"] == budget:
            latest[(record["option"], record.get("ensemble"), record["seed"])] = record
    default = {seed: r for (option, _, seed), r in latest.items() if option == "default"}
    header = ["option", "steps", "i→t R@1", "i→t R@5", "t→i R@1", "t→i R@5", "zero-shot", "s / step",
              "step time ÷ default", "peak RSS MiB", "training RSS growth MiB", "growth ÷ default",
              "seeds"]  # fmt: skip
    rows = []
    for option in TRAINING_OPTIONS:
        runs = [r for (name, _, _), r in sorted(latest.items()) if name == option]
        if runs:
            rows.append(training_row(option, runs, default))
    ensembles = {}  # ensemble -> its runs (by seed), in the order of the results file
    for (name, ensemble, _), r in sorted(latest.items(), key=lambda item: item[0][2]):
        if name == PROMPT_OPTION:
            ensembles.setdefault(ensemble, []).append(r)
    for number, (ensemble, runs) in enumerate(ensembles.items()):
        if number == 0:  # the one template, on the same models
            rows.append(prompt_row("one template", [r["zero_shot_accuracy_one_template"] for r in runs], runs))
        label = f"{ensemble} ({runs[0]['ensemble_templates']} templates)"
        rows.append(prompt_row(label, [r["zero_shot_accuracy"] for r in runs], runs))
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def training_row(option: str, runs: list[dict], default: dict) -> list[str]:
    def ratio(key: str, r: dict) -> float | None:
        base = default.get(r["seed"], {}).get(key)
        return r[key] / base if r.get(key) and base else None

    row = [option, cell(mean([r["steps"] for r in runs]), 0)]
    row += [cell(mean([r[key] for r in runs])) for key in QUALITY_KEYS]
    row += [cell(mean([r["s_per_step"] for r in runs]), 4), cell(mean([ratio("s_per_step", r) for r in runs]), 2)]
    row += [cell(mean([r["peak_rss_mib"] for r in runs]), 0)]
    row += [cell(mean([r.get("training_rss_growth_mib") for r in runs]), 1)]
    row += [cell(mean([ratio("training_rss_growth_mib", r) for r in runs]), 2)]
    return row + [", ".join(str(r["seed"]) for r in runs)]


def prompt_row(label: str, accuracies: list[float], runs: list[dict]) -> list[str]:
    """A zero-shot-only row: the default runs' models, evaluated with other prompts."""
    seeds = ", ".join(str(r["seed"]) for r in runs)
    return [f"{PROMPT_OPTION}: {label}", "= default", "", "", "", "", cell(mean(accuracies)), *[""] * 5, seeds]


def main(argv=None) -> None:
    args = parse_args(argv)
    records = read_results(Path(args.results)) if args.table_only else run_all(args)
    print(table(records, args.max_train_steps or demo_steps()))


if __name__ == "__main__":
    main()
