"""run_clip.py --streaming: training from webdataset shards (written by `ndclip shards`' writer), evaluated on
map-style data; exact resume of the stream position; the FSDP/DeepSpeed guard.

In-process runs (`run_clip.main`) cover one process with DataLoader workers: an epoch reads every sample once, and a
run resumed from a mid-epoch checkpoint ends as the uninterrupted one. One test launches real two-process runs
(`accelerate launch`, gloo on the CPU, two workers per process): every sample once per epoch across processes and
workers, kill -9 after a checkpoint then resume to the same weights, and streams of unequal length ending their
epochs together. Those launches run this file as their script (`__main__` below): it wraps run_clip's training step to
record the image_ids each process trained on, and can SIGKILL every process (with its DataLoader workers) right after
a checkpoint, so that the kill falls mid-epoch at a known step, without any hook in run_clip.py itself.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_clip

RECORD_DIR = "NDCLIP_TEST_RECORD_DIR"  # where the launched script writes the image_ids each process trained on
KILL_AFTER_STEP = "NDCLIP_TEST_KILL_AFTER_STEP"  # the launched processes kill themselves after this checkpoint
SAMPLES, SHARDS, BATCH = 32, 8, 4
# Two processes x two workers: each worker reads 2 shards of 4 samples, 2 batches of 4, so an epoch is 4 steps of a
# global batch of 8 and every sample is trained once per epoch. One process with two workers (in-process): each
# worker reads 4 shards, 4 batches, so an epoch is 8 steps of 4.
STREAM_RUN = ["--streaming", "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", "4",
              "--logging_steps", "1", "--shuffle_buffer_size", "6", "--learning_rate", "1e-3"]  # fmt: skip


# ----- the launched script ------------------------------------------------------------------------------------------


def record_trained_image_ids(folder: Path) -> None:
    """Wrap run_clip's training step: after each step, append the image_ids this process trained on to its file."""
    train_step = run_clip.training_step

    def step(run, batch):
        result = train_step(run, batch)
        record = {"run": Path(run.args.output_dir).name, "step": run.completed_steps + 1, "epoch": run.epoch,
                  "ids": batch["image_ids"].tolist()}  # fmt: skip
        with open(folder / f"process_{run.accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    run_clip.training_step = step


def kill_after_checkpoint(step: int) -> None:
    """Wrap run_clip's checkpoint save: once the checkpoint of `step` is complete on every process, each process
    sends SIGKILL to itself and its DataLoader workers (its process group), as a crash or a preemption would."""
    save = run_clip.save_training_checkpoint

    def save_then_kill(run):
        save(run)
        if run.completed_steps == step:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    run_clip.save_training_checkpoint = save_then_kill


def launched_main(argv: list[str]) -> None:
    """`argv` is one run's arguments, or several separated by `--then`, run one after the other in these processes
    (a second launch would cost the imports again)."""
    if os.environ.get(RECORD_DIR):
        record_trained_image_ids(Path(os.environ[RECORD_DIR]))
    if os.environ.get(KILL_AFTER_STEP):
        kill_after_checkpoint(int(os.environ[KILL_AFTER_STEP]))
    runs = [[]]
    for arg in argv:
        runs.append([]) if arg == "--then" else runs[-1].append(arg)
    for run_argv in runs:
        run_clip.main(run_argv)


if __name__ == "__main__":
    launched_main(sys.argv[1:])
    sys.exit(0)


# ----- data ---------------------------------------------------------------------------------------------------------

# Imported here so that the launched script (above) starts without them.
from datasets import Dataset, Features, Image, List, Value  # noqa: E402
from test_run_clip import REPO_ROOT, RUN_CLIP, history, launch_command, save_tiny_ndclip, write_format  # noqa: E402

from ndclip.layouts import captions_of, encoded, picture  # noqa: E402
from ndclip.shards import write_shards  # noqa: E402
from ndclip.streaming import stable_image_id  # noqa: E402


def write_stream(folder: Path, corrupt: int | None = None) -> set[int]:
    """SAMPLES JPEG images with their captions as SHARDS webdataset shards; sample `corrupt` cut after its header (a
    bad sample the stream skips and counts). Returns the image_ids a stream gives its usable samples."""
    images = [encoded(picture(n), "JPEG") for n in range(SAMPLES)]
    if corrupt is not None:
        images[corrupt] = images[corrupt][: len(images[corrupt]) * 3 // 4]
    features = Features({"image": Image(decode=False), "captions": List(Value("string")), "image_id": Value("int64")})
    rows = {"image": [{"bytes": data, "path": None} for data in images],
            "captions": [captions_of(n) for n in range(SAMPLES)], "image_id": list(range(SAMPLES))}  # fmt: skip
    write_shards(Dataset.from_dict(rows, features=features), folder, num_shards=SHARDS)
    return {stable_image_id({"bytes": data}) for n, data in enumerate(images) if n != corrupt}


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory) -> tuple[list[str], list[str], set[int]]:
    """(the arguments of a streaming run on the shards, those of its evaluation on Kaggle-layout data, the stream's
    image_ids)."""
    root = tmp_path_factory.mktemp("stream_data")
    ids = write_stream(root / "shards")
    args = ["--model_name_or_path", str(save_tiny_ndclip(root / "model")), "--train_shards", str(root / "shards/*.tar"),
            *STREAM_RUN]  # fmt: skip
    return args, [*write_format("kaggle", root / "eval"), "--validation_fraction", "0.5"], ids


def trained_ids(folder: Path, processes: int = 1, run: str | None = None) -> list[dict]:
    """The records of every process (of the run whose --output_dir is named `run`), in step order (process order
    within a step)."""
    records = [json.loads(line) for p in range(processes) for line in (folder / f"process_{p}.jsonl").open()]
    return sorted((r for r in records if run in (None, r["run"])), key=lambda record: record["step"])


def steps_of(records) -> list[tuple]:
    """(step, epoch, image_ids) of each record, whichever run wrote it."""
    return [(r["step"], r["epoch"], r["ids"]) for r in records]


def ids_of_epoch(records: list[dict], epoch: int) -> list[int]:
    return [i for record in records if record["epoch"] == epoch for i in record["ids"]]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_weights(resumed: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


# ----- one process, in this process ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_run(stream_data, tmp_path_factory) -> tuple[list[str], Path, list[dict]]:
    """An uninterrupted run of 10 steps (one epoch is 8), 2 workers, checkpoints every 3 steps: (its arguments without
    --output_dir, its folder, the image_ids of each step)."""
    args, evaluation, _ = stream_data
    args = [*args, *evaluation, "--dataloader_num_workers", "2", "--max_train_steps", "10",
            "--checkpointing_steps", "3"]  # fmt: skip
    out = tmp_path_factory.mktemp("one_process") / "out"
    record = out.parent / "record"
    record.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_clip, "training_step", run_clip.training_step)  # restored after the wrap below
        record_trained_image_ids(record)
        run_clip.main([*args, "--output_dir", str(out)])
    return args, out, trained_ids(record)


def test_an_epoch_of_the_stream_trains_every_sample_once(stream_data, one_process_run):
    *_, ids = stream_data
    _, out, records = one_process_run
    epoch = ids_of_epoch(records, 0)
    assert sorted(epoch) == sorted(ids), "each of the 32 samples once, none twice"
    assert epoch != sorted(epoch), "shuffled"
    assert ids_of_epoch(records, 1) != epoch[:8], "shuffled again in the next epoch"
    assert [r["step"] for r in history(out) if "loss" in r] == list(range(1, 11))
    assert [r["epoch"] for r in history(out) if "loss" in r] == [0] * 8 + [1] * 2
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 10 and 0 <= results["image_to_text_recall@1"] <= 1


def test_resuming_mid_epoch_sees_the_same_samples_and_ends_with_the_same_weights(one_process_run, tmp_path):
    """Resumed from a checkpoint mid-epoch (step 6 of 8, with samples in the shuffle buffers), the run trains the
    samples the uninterrupted one trained after it, in the same order, across the next epoch too, and ends with the
    same weights, bit for bit, and the same log."""
    args, reference, records = one_process_run
    step = 6
    out = Path(shutil.copytree(reference, tmp_path / "run"))
    for later in ("model.safetensors", "eval_results.json"):
        (out / later).unlink()
    position = json.loads((out / f"checkpoints/step_{step}/stream_position_0.json").read_text())
    worker_states = position["_snapshot"]["_worker_snapshots"].values()
    assert sum(w["dataset_state"]["samples_yielded"] for w in worker_states) == (step % 8) * BATCH

    record = tmp_path / "record"
    record.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_clip, "training_step", run_clip.training_step)
        record_trained_image_ids(record)
        checkpoint = out / f"checkpoints/step_{step}"
        run_clip.main([*args, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)])

    assert steps_of(trained_ids(record)) == steps_of(r for r in records if r["step"] > step)
    assert_same_weights(weights(out), weights(reference))
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_resuming_with_another_number_of_workers_is_refused(one_process_run, tmp_path):
    args, reference, _ = one_process_run
    out = Path(shutil.copytree(reference, tmp_path / "run"))
    with pytest.raises(SystemExit, match="Resume with --dataloader_num_workers 2"):
        run_clip.main([*args, "--dataloader_num_workers", "1", "--output_dir", str(out), "--resume_from_checkpoint",
                       str(out / "checkpoints/step_6")])  # fmt: skip


# ----- two processes, launched --------------------------------------------------------------------------------------


def launch_streaming(args: list[str], record: Path | None = None, kill_after: int | None = None):
    """`accelerate launch` of this file with two processes, in its own process group (what `kill_after` kills)."""
    cmd, env = launch_command(args, num_processes=2)
    cmd[cmd.index(RUN_CLIP)] = __file__
    if record is not None:
        record.mkdir()
        env[RECORD_DIR] = str(record)
    if kill_after is not None:
        env[KILL_AFTER_STEP] = str(kill_after)
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          start_new_session=True)  # fmt: skip


def test_two_processes_with_workers_train_each_sample_once_resume_after_kill_9_and_end_uneven_epochs_together(
    stream_data, tmp_path
):
    """Two launches of two processes with two DataLoader workers each, without evaluation data (the in-process runs
    evaluate). The first is killed (SIGKILL, every process with its workers) right after its checkpoint at step 6,
    mid-epoch. The second runs three runs in turn in its processes: the killed run resumed; the same run
    uninterrupted, whose epochs of 4 global batches train every sample exactly once across processes and workers, and
    which the resumed run matches sample for sample and weight for weight; and a stream with a corrupt sample, where
    one process's stream ends a batch earlier (7 usable samples in one worker): every epoch ends on both processes at
    3 steps, instead of one waiting for ever in the other's next all-gather, and the bad sample is counted."""
    args, _, ids = stream_data
    args = [*args, "--dataloader_num_workers", "2", "--max_train_steps", "8", "--checkpointing_steps", "3"]
    killed, reference, uneven = tmp_path / "killed", tmp_path / "reference", tmp_path / "uneven"

    crashed = launch_streaming([*args, "--output_dir", str(killed)], record=tmp_path / "killed_ids", kill_after=6)
    assert crashed.returncode != 0 and "Signal 9 (SIGKILL)" in crashed.stderr, crashed.stderr[-3000:]
    assert (killed / "checkpoints/step_6").is_dir() and not (killed / "model.safetensors").exists()
    for process in (0, 1):
        position = json.loads((killed / f"checkpoints/step_6/stream_position_{process}.json").read_text())
        workers = position["_snapshot"]["_worker_snapshots"].values()
        assert [w["dataset_state"] for w in workers] == [{"epoch": 1, "samples_yielded": 4}] * 2

    usable = write_stream(tmp_path / "bad_shards", corrupt=5)
    bad_args = [*args[: args.index("--max_train_steps")], "--max_train_steps", "8"]
    bad_args[bad_args.index("--train_shards") + 1] = str(tmp_path / "bad_shards/*.tar")
    done = launch_streaming(
        [*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest",
         "--then", *args, "--output_dir", str(reference), "--then", *bad_args, "--output_dir", str(uneven)],
        record=tmp_path / "ids",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    assert "distributed mode MULTI_CPU, 2 processes on cpu" in done.stderr
    assert "no evaluation data" in done.stderr and not (reference / "eval_results.json").exists()

    records = trained_ids(tmp_path / "ids", processes=2, run="reference")
    for epoch in (0, 1):
        assert sorted(ids_of_epoch(records, epoch)) == sorted(ids), f"epoch {epoch}: every sample once"
    assert [r["epoch"] for r in history(reference) if "loss" in r] == [0] * 4 + [1] * 4
    before_kill = [r for r in trained_ids(tmp_path / "killed_ids", processes=2) if r["step"] <= 6]
    after_resume = trained_ids(tmp_path / "ids", processes=2, run="killed")
    assert steps_of(before_kill + after_resume) == steps_of(records), "the same samples, in the same order"
    assert_same_weights(weights(killed), weights(reference))
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()

    assert [r["epoch"] for r in history(uneven) if "loss" in r] == [0] * 3 + [1] * 3 + [2] * 2
    trained = [i for r in trained_ids(tmp_path / "ids", processes=2, run="uneven") for i in r["ids"]]
    assert set(trained) <= usable and len(usable) == SAMPLES - 1
    for epoch in (0, 1):  # epoch 2 stops at step 8, before its end
        assert f"skipped unusable samples in epoch {epoch} of the stream: {{'corrupt_image': 1}}" in done.stderr
    assert (uneven / "model.safetensors").is_file()


# ----- arguments and the distributed mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--streaming", "--train_shards", "x/*.tar"], "--streaming needs --max_train_steps"),
        (["--train_shards", "x/*.tar", "--max_train_steps", "2"], "add --streaming"),
        (["--streaming", "--max_train_steps", "2", "--max_train_samples", "8"], "--max_train_samples does not work"),
        (["--streaming", "--max_train_steps", "2", "--shuffle_buffer_size", "-1"], "--shuffle_buffer_size must be"),
        (["--streaming", "--max_train_steps", "2", "--zero_shot_dataset", "x"], "--zero_shot_dataset is evaluated"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_before_loading(argv, message):
    with pytest.raises(SystemExit, match=message):
        run_clip.parse_args([*argv, "--output_dir", "unused"])


def test_shards_that_match_nothing_are_named(stream_data, tmp_path):
    args, _, _ = stream_data
    args = [*args, "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]
    args[args.index("--train_shards") + 1] = str(tmp_path / "nowhere/*.tar")
    with pytest.raises(SystemExit, match="nowhere/\\*.tar' matches no .tar or .parquet file"):
        run_clip.main(args)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        # What `accelerate launch --use_fsdp` sets; one CPU process: accelerate builds a plain run, silently.
        ("ACCELERATE_USE_FSDP", "true", "FSDP was asked for \\(ACCELERATE_USE_FSDP=true\\) but this run would "
         "train in accelerate's NO mode"),
        # accelerate reads only `true`: `1` is ignored as silently.
        ("ACCELERATE_USE_FSDP", "1", "FSDP was asked for \\(ACCELERATE_USE_FSDP=1\\) but this run would train in "
         "accelerate's NO mode"),
        # What `accelerate launch --use_deepspeed` sets: accelerate cannot build its plugin.
        ("ACCELERATE_USE_DEEPSPEED", "true", "DeepSpeed was asked for .* ImportError: DeepSpeed is not installed"),
    ],
)  # fmt: skip
def test_fsdp_or_deepspeed_asked_for_but_not_active_stops_the_run(
    stream_data, tmp_path, monkeypatch, variable, value, message
):
    """The variables are those `accelerate launch` sets for its --use_fsdp / --use_deepspeed flags (and for an
    `accelerate config` that chose them): the run stops before loading anything, instead of training as DDP."""
    args, _, _ = stream_data
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match=message):
        run_clip.main([*args, "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
