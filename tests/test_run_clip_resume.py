"""run_clip.py's runs, checkpoints and output folders: a resumed run ends exactly as the uninterrupted one, a damaged
checkpoint is skipped (`latest`) or named (a path), an output folder holds one run, a resume that would re-train or skip
samples is refused, and a failed save says so and leaves no results beside other weights. In-process runs
(`run_clip.main`) on the tiny Kaggle-layout data of test_run_clip.py, most of them on copies of one finished run."""

import json
import resource
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run_clip import history, save_tiny_ndclip, write_format

import run_clip
from ndclip.layouts import write_kaggle_flickr8k
from ndclip.training import SETTINGS_ADDED_LATER, checkpoint_dirs, save_checkpoint

# 16 images: 14 train (3 batches of 4 per epoch), 2 evaluation.
SMALL_RUN = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
             "--dataloader_num_workers", "0"]  # fmt: skip
# The uninterrupted run the resumed ones must reproduce: 4 steps (3 in epoch 0, 1 in epoch 1), checkpoints at 2 and 4.
FOUR_STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def common_args(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("resume_data")
    return ["--model_name_or_path", str(save_tiny_ndclip(root / "model")), *write_format("kaggle", root / "data"),
            *SMALL_RUN]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, common_args) -> tuple[list[str], Path]:
    """(the run's arguments without --output_dir, its folder); tests resume or damage copies of the folder."""
    out = tmp_path_factory.mktemp("finished") / "out"
    args = [*common_args, *FOUR_STEPS]
    run_clip.main([*args, "--output_dir", str(out)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    return args, out


def copy_run(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "run"))


def snapshot(folder: Path) -> dict:
    """What an uninterrupted run leaves: its weights, eval_results.json and metrics.jsonl."""
    return {
        "weights": load_file(folder / "model.safetensors"),
        "eval_results": (folder / "eval_results.json").read_text(),
        "metrics": (folder / "metrics.jsonl").read_text(),
    }


def assert_same_run(resumed: dict, expected: dict) -> None:
    assert resumed["metrics"] == expected["metrics"], "every step and evaluation logged once, with the same values"
    assert resumed["eval_results"] == expected["eval_results"]
    for name, tensor in expected["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], tensor, rtol=0, atol=0, msg=name)


# ----- resuming a run that ended ------------------------------------------------------------------------------------


def test_resuming_from_the_last_step_trains_no_extra_step(finished_run, tmp_path):
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert_same_run(snapshot(out), snapshot(reference))
    assert [r["step"] for r in history(out) if "loss" in r] == [1, 2, 3, 4]


def test_resuming_a_run_finished_with_epoch_checkpoints(common_args, tmp_path):
    """An epoch of one step (4 training images), checkpointed at its end."""
    args = [*common_args, "--max_train_samples", "4", "--num_train_epochs", "1", "--checkpointing_steps", "epoch",
            "--output_dir", str(tmp_path)]  # fmt: skip
    run_clip.main(args)
    finished = snapshot(tmp_path)
    run_clip.main([*args, "--resume_from_checkpoint", "latest"])
    assert_same_run(snapshot(tmp_path), finished)


def test_zero_training_steps_evaluate_the_initial_model(common_args, tmp_path):
    run_clip.main([*common_args, "--max_train_steps", "0", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "eval_results.json").read_text())["step"] == 0
    initial = load_file(Path(common_args[1]) / "model.safetensors")
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(tensor, initial[name]), name


# ----- damaged checkpoints ------------------------------------------------------------------------------------------


def truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


DAMAGES = {
    "truncated weights": (truncate_weights, r"model\.safetensors.*(truncated|bytes)"),
    "missing optimizer": (lambda c: (c / "optimizer.bin").unlink(), r"optimizer\.bin.*missing"),
    "garbled state": (lambda c: (c / "training_state.json").write_text('{"completed_steps": 4, "ep'),
                      r"training_state\.json.*unreadable"),
    "state without keys": (lambda c: (c / "training_state.json").write_text('{"completed_steps": 4}'),
                           r"training_state\.json.*(lacks|missing).*epoch"),
    "missing state": (lambda c: (c / "training_state.json").unlink(), r"training_state\.json.*missing"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_resuming_from_a_damaged_checkpoint_names_the_damage(damage, finished_run, tmp_path):
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    damage_checkpoint, message = DAMAGES[damage]
    checkpoint = out / "checkpoints" / "step_4"
    damage_checkpoint(checkpoint)
    with pytest.raises(SystemExit, match=message):
        run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)])


def test_latest_skips_a_damaged_checkpoint_and_a_half_written_metrics_line(finished_run, tmp_path, caplog):
    """A newest checkpoint whose weights were cut short, and a run killed while writing a line of metrics.jsonl."""
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    truncate_weights(out / "checkpoints" / "step_4")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 1, "lo')
    run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step_4" in w and "model.safetensors" in w for w in warnings), warnings
    assert any("half-written" in w for w in warnings), warnings
    assert_same_run(snapshot(out), snapshot(reference))  # trained again from step_2


# ----- one run per output folder ------------------------------------------------------------------------------------


def test_an_output_folder_with_another_run_or_other_files_is_refused(finished_run, tmp_path):
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(SystemExit, match=r"(?s)not empty.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        run_clip.main([*args, "--output_dir", str(out)])  # a plain re-run
    with pytest.raises(SystemExit, match=r"(?s)other settings.*learning_rate: 5e-05 → 0.001"):
        run_clip.main([*args, "--learning_rate", "1e-3", "--output_dir", str(out),
                       "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before, "nothing written or deleted"

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run")
    with pytest.raises(SystemExit, match=r"no run of run_clip\.py"):
        run_clip.main([*args, "--output_dir", str(tmp_path / "notes"), "--resume_from_checkpoint", "latest"])


def test_overwrite_output_dir_starts_afresh(finished_run, tmp_path):
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    (out / "notes.txt").write_text("kept: not a run artifact")
    run_clip.main([*args[: -len(FOUR_STEPS)], "--max_train_steps", "1", "--output_dir", str(out),
                   "--overwrite_output_dir"])  # fmt: skip
    assert not (out / "checkpoints").exists(), "the previous run's checkpoints are gone"
    assert [r["step"] for r in history(out)] == [1, 1], "one training step and one evaluation, nothing of the old run"
    assert json.loads((out / "eval_results.json").read_text())["step"] == 1
    assert (out / "notes.txt").read_text() == "kept: not a run artifact"
    with pytest.raises(SystemExit, match="--overwrite_output_dir.*--resume_from_checkpoint latest"):
        run_clip.main([*args, "--output_dir", str(out), "--overwrite_output_dir", "--resume_from_checkpoint", "latest"])


# ----- resuming with another batch layout or data -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (["--per_device_train_batch_size", "2"], r"(?s)per_device_train_batch_size: 4 → 2.*re-train"),
        (["--gradient_accumulation_steps", "2"], r"(?s)gradient_accumulation_steps: 1 → 2.*schedule"),
        (["--seed", "7"], r"(?s)seed: 42 → 7.*order"),
    ],
)
def test_resuming_with_another_batch_layout_is_refused(change, message, finished_run, tmp_path):
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_4")
    with pytest.raises(SystemExit, match=message):
        run_clip.main([*args, *change, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def record_other_settings(out: Path, **changes) -> None:
    """Make the run in `out` one that was trained with `changes` to its settings, as its training_run.json and
    checkpoints record them (cheaper than training that run)."""
    for path in [out / "training_run.json", *(out / "checkpoints").glob("step_*/training_state.json")]:
        record = json.loads(path.read_text())
        record["settings"].update(changes)
        path.write_text(json.dumps(record))


def test_resuming_with_another_number_of_processes_is_refused(finished_run, tmp_path):
    """The folder of a 2-process run (a 2-process launch takes far longer)."""
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    record_other_settings(out, num_processes=2)
    with pytest.raises(SystemExit, match=r"(?s)num_processes: 2 → 1.*skip"):
        run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def record_without_settings(out: Path, names) -> None:
    """Rewrite the run's records as a run made before the settings `names` existed wrote them."""
    for path in [out / "training_run.json", *(out / "checkpoints").glob("step_*/training_state.json")]:
        record = json.loads(path.read_text())
        record["settings"] = {k: v for k, v in record["settings"].items() if k not in names}
        path.write_text(json.dumps(record))


def test_a_run_recorded_before_newer_settings_existed_resumes_unless_they_change(finished_run, tmp_path):
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    record_without_settings(out, SETTINGS_ADDED_LATER)
    with pytest.raises(SystemExit, match=r"captions_per_image: 1 → 2"):
        run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--captions_per_image=2"])
    run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoints" / "step_2")])
    assert snapshot(out)["weights"].keys() == snapshot(reference)["weights"].keys()
    assert all(torch.equal(v, snapshot(reference)["weights"][k]) for k, v in snapshot(out)["weights"].items())


def test_resuming_after_the_training_data_changed_is_refused(finished_run, tmp_path):
    """The run trained on the 16 images of a data folder which now holds 24."""
    args, reference = finished_run
    out = copy_run(reference, tmp_path)
    data = tmp_path / "data"
    write_kaggle_flickr8k(data, 24)
    record_other_settings(out, data_dir=str(data))
    args = [*args]
    args[args.index("--data_dir") + 1] = str(data)
    with pytest.raises(SystemExit, match=r"trained on 14 images of the training split, which now has 21"):
        run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def test_an_unwritable_output_folder_fails_before_loading_anything(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    with pytest.raises(SystemExit, match=f"--output_dir {out}"):  # not the missing data folder's error
        run_clip.main(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(out)])


# ----- saves that fail ----------------------------------------------------------------------------------------------


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = torch.nn.Linear(2, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    for limit in (-1, 1):
        output_dir = str(tmp_path / str(limit))
        for step in (1, 2, 3):
            saved = save_checkpoint(accelerator, output_dir, {"completed_steps": step}, total_limit=limit)
            assert saved.is_dir(), f"--checkpoints_total_limit {limit}: step_{step} deleted right after its save"
        assert [p.name for p in checkpoint_dirs(output_dir)] == ["step_3"]


# A write past this size fails with EFBIG, as on a full disk: above every file of the data cache and the logs, below
# the tiny model's weights.
FILE_SIZE_LIMIT = 150_000


@contextmanager
def full_disk():
    """Writes past `FILE_SIZE_LIMIT` fail with EFBIG in this process (SIGXFSZ ignored, so that the write fails
    instead of killing it), as on a full disk; the limit is lifted afterwards (a soft limit: raising it back to the
    hard limit needs no privilege)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_during_saves_is_named_and_leaves_no_mismatched_results(finished_run, tmp_path):
    args, reference = finished_run
    assert (reference / "model.safetensors").stat().st_size > FILE_SIZE_LIMIT
    killed = copy_run(reference, tmp_path)  # as a run killed after its step_2 checkpoint left it
    shutil.rmtree(killed / "checkpoints" / "step_4")
    for name in ("model.safetensors", "eval_results.json", "README.md"):
        (killed / name).unlink()
    finished = Path(shutil.copytree(reference, tmp_path / "finished"))  # resumed at its end: only the final save left

    with full_disk():
        with pytest.raises(SystemExit) as checkpoint_error:
            run_clip.main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
        with pytest.raises(SystemExit) as final_error:
            run_clip.main([*args, "--output_dir", str(finished), "--resume_from_checkpoint", "latest"])

    checkpoint_error, final_error = str(checkpoint_error.value), str(final_error.value)
    assert "step_4" in checkpoint_error and "File too large" in checkpoint_error, checkpoint_error
    assert "step_2" in checkpoint_error and "intact" in checkpoint_error, checkpoint_error
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_2"], "the partial save is removed"
    assert not (killed / "eval_results.json").exists()

    assert "final model" in final_error and "File too large" in final_error, final_error
    assert not (finished / "eval_results.json").exists(), "results are written only beside the weights they describe"
