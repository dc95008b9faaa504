"""What `run_clip.py`'s training loop relies on, one home each: the state of a run (`TrainingRun`), the guards
that stop a run whose loss or weights are no longer finite, checkpoints that survive a crash and are validated before
a resume, the output folder that holds one run, and the metrics history with its plots (the loss over the global
batch is `ndclip.losses`).

A checkpoint is accelerate's `save_state` folder plus `training_state.json` (`training_state`): the position in the
data, the latest evaluation, the length of `metrics.jsonl` and the run's settings, so that a resumed run neither
repeats nor skips a sample, a step or a logged record, and ends exactly as the uninterrupted run. A `--streaming` run
(`TrainingStream`) also saves each process's position in its stream (`stream_position_N.json`, `ResumableStream`).
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, parse_flag_from_env, send_to_device
from safetensors import SafetensorError, safe_open
from torchdata.stateful_dataloader import StatefulDataLoader

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TRAINING_STATE_FILE = "training_state.json"
STREAM_POSITION_FILE = "stream_position_{process}.json"  # one per process, in the checkpoints of a streaming run
# What a checkpoint's training_state.json holds beside accelerate's state (`training_state`, `save_checkpoint`).
TRAINING_STATE_KEYS = (
    "completed_steps", "epoch", "batches_in_epoch", "metrics_records", "eval_results", "settings", "train_samples",
    "files",
)  # fmt: skip
# What a failed write raises: OSError (ENOSPC, EFBIG, ...), torch's `unexpected pos ... vs ...` RuntimeError, and
# safetensors' own error type.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


# ----- the state of a run -------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """One training run of `run_clip.py`: what its steps build, and where it stands.

    `args` are run_clip.py's parsed arguments. The model, optimizer, scheduler and loaders are the prepared
    (`accelerator.prepare`) ones. The position -- `completed_steps` optimizer steps done, `batches_in_epoch` batches
    of epoch `epoch` trained -- is what a checkpoint records and a resume restores; `eval_results` is the latest
    evaluation (None before the first)."""

    accelerator: Accelerator
    args: Any
    model: torch.nn.Module
    processor: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_loader: Any
    train_collator: Any  # reseeded every epoch (`set_epoch`): its crops and caption choices follow the epoch
    eval_loaders: dict | None  # "images" (images with their first caption) and "captions" (every caption)
    history: "MetricsHistory"
    settings: dict  # `run_settings`: what makes this run this run
    train_samples: int | None  # the training split's size, which a checkpoint's place in its epoch depends on
    class_names: list[str] | None = None  # the evaluation split's labels, for zero-shot accuracy
    zero_shot: tuple | None = None  # (loader, class names) of `--zero_shot_dataset`
    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    eval_results: dict | None = None
    stream: "TrainingStream | None" = None  # a --streaming run's training data (then `train_samples` is None)


def training_state(run: TrainingRun) -> dict:
    """What a checkpoint records beside accelerate's state (`TRAINING_STATE_KEYS`, less the file list that
    `save_checkpoint` adds): the position in the data, the latest evaluation and the length of metrics.jsonl (so that
    a resumed run neither repeats nor loses any), and the run it belongs to."""
    return {
        "completed_steps": run.completed_steps, "epoch": run.epoch, "batches_in_epoch": run.batches_in_epoch,
        "metrics_records": run.history.records, "eval_results": run.eval_results, "settings": run.settings,
        "train_samples": run.train_samples, "stream": run.stream.description() if run.stream else None,
    }  # fmt: skip


def resume(run: TrainingRun, checkpoint: Path | None) -> None:
    """Continue `run` from `checkpoint` (validated by `resolve_checkpoint`): weights, optimizer, schedule and random
    states from accelerate's state, the position in the data and the latest evaluation from training_state.json, and
    metrics.jsonl cut back to what had been logged when it was saved. Without a checkpoint, a fresh history."""
    if checkpoint is None:
        run.history.keep_first(0)
        return
    state = read_training_state(checkpoint)
    run.accelerator.load_state(str(checkpoint))
    run.completed_steps, run.epoch = state["completed_steps"], state["epoch"]
    run.batches_in_epoch, run.eval_results = state["batches_in_epoch"], state["eval_results"]
    if run.stream is not None and run.batches_in_epoch:  # mid-epoch: where this process's stream had got to
        run.train_loader.load_state_dict(read_stream_position(checkpoint, run.accelerator.process_index))
    run.history.keep_first(state["metrics_records"])
    position = f"step {run.completed_steps} (epoch {run.epoch}, batch {run.batches_in_epoch})"
    logger.info(f"resumed from {checkpoint} at {position}")


# ----- stopping a run whose loss or weights are no longer finite ----------------------------------------------------


def stop_if_loss_not_finite(run: TrainingRun, loss: torch.Tensor, outputs, image_ids: torch.Tensor) -> None:
    """Stop every process at the first NaN or infinite training loss of the step being trained, before its backward
    pass and optimizer step carry it into the weights.

    Every process computes the same global loss, but one that stopped alone would leave the others waiting forever in
    their next collective: the verdict is reduced across processes, so it is the same everywhere by construction. The
    embeddings of each sample then tell weights that diverged (every sample non-finite) from a few samples that reach
    a bad weight or overflow."""
    accelerator = run.accelerator
    if not accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum").item():
        return
    images = len(outputs.image_embeds)  # each with its captions (`--captions_per_image`), rows image-major
    finite_captions = torch.isfinite(outputs.text_embeds).all(-1).reshape(images, -1).all(-1)
    finite_rows = torch.isfinite(outputs.image_embeds).all(-1) & finite_captions
    finite_rows, image_ids = accelerator.gather((finite_rows.long(), image_ids))
    bad = image_ids[finite_rows == 0].tolist()
    if len(bad) == len(image_ids):
        where = "the embeddings of every sample in the batch are non-finite: the weights diverged"
    elif bad:
        where = (
            f"the embeddings of {len(bad)} of {len(image_ids)} samples in the batch are non-finite (training split "
            f"image_id {', '.join(map(str, bad[:10]))})"
        )
    else:
        where = "the embeddings are finite, the logits (logit_scale x cosine similarity) are not"
    value = loss.item() if not torch.isfinite(loss) else "non-finite on another process"
    step = run.completed_steps + 1
    raise stop_training(run, step, f"the training loss is {value} at step {step} (epoch {run.epoch}); {where}")


def stop_if_parameters_not_finite(run: TrainingRun) -> None:
    """Refuse to save or push weights that hold NaN or infinity: a non-finite gradient makes them so although the loss
    of its step was finite. Each process checks its own parameters (its shards under FSDP; under DeepSpeed ZeRO-3 its
    partition, kept in `ds_tensor`), and the count is reduced, so that every process stops together."""
    accelerator = run.accelerator
    params = list(accelerator.unwrap_model(run.model, keep_torch_compile=False).named_parameters())
    finite = torch.stack([torch.isfinite(getattr(param, "ds_tensor", param)).all() for _, param in params]).tolist()
    bad = [name for (name, _), ok in zip(params, finite) if not ok]
    if accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), reduction="sum").item():
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") or "another process's shard"
        problem = f"the weights after step {run.completed_steps} hold NaN or infinity, in {names}"
        raise stop_training(run, run.completed_steps, problem)


def stop_training(run: TrainingRun, step: int, problem: str) -> SystemExit:
    """Record why the run stopped (metrics.jsonl, trackers) and return the exit that says so and what to try."""
    args = run.args
    run.history.log({"step": step, "stopped": problem})
    if args.with_tracking:
        run.accelerator.end_training()
    saved = checkpoint_dirs(args.output_dir)
    kept = f"the checkpoints saved before are untouched, the newest {saved[-1]}" if saved else "no checkpoint was saved"
    return SystemExit(
        f"run_clip.py: {problem}. Training stopped: these weights are neither saved nor pushed ({kept}). Try a "
        f"lower --learning_rate (this run: {args.learning_rate:g}), warmup (--num_warmup_steps), gradient clipping "
        f"(--max_grad_norm, this run: {args.max_grad_norm:g}), bf16 rather than fp16 mixed precision; where only some "
        "samples are non-finite, check those samples and the weights they reach."
    )


# ----- checkpoints that survive a crash -----------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first. A save in progress lives in a `.tmp` folder and is never listed."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, state: dict, total_limit: int | None = None,
    stream_position: dict | None = None,
) -> Path:
    """Save the full training state atomically: write into a temporary folder, then rename it into place; then keep
    at most `total_limit` checkpoints. `stream_position` is this process's position in its training stream
    (`stream_position`), saved by every process in its own file.

    accelerate's own `total_limit` deletes old checkpoints *before* writing the new one; here the old ones are only
    pruned once the new one is complete, so a crash during a save never loses the last good checkpoint. The state
    lists every file with its size, so that a checkpoint damaged afterwards is recognised (`checkpoint_problem`).
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state['completed_steps']}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if stream_position is not None:
            # Each process its own file: accelerate 1.15's save_state writes a stateful loader's state from every
            # process to one `dl_state_dict.bin`, so the processes' different stream positions would overwrite each
            # other (huggingface/accelerate#4164).
            tmp.mkdir(parents=True, exist_ok=True)
            position_file = tmp / STREAM_POSITION_FILE.format(process=accelerator.process_index)
            position_file.write_text(json.dumps(stream_position))
        accelerator.wait_for_everyone()  # every process's random state is in the folder before it is listed
        if accelerator.is_main_process:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / TRAINING_STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except SAVE_ERRORS as error:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(
            f"could not save checkpoint {final.name} in {root}: {error}. The disk is probably full (or the folder not "
            f"writable); the partial save was removed. {intact_checkpoint_note(output_dir, exclude=final)}"
        ) from error
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def intact_checkpoint_note(output_dir: str, exclude: Path | None = None) -> str:
    """Where a run whose save failed can continue from."""
    intact = [p for p in checkpoint_dirs(output_dir) if p != exclude and checkpoint_problem(p) is None]
    if not intact:
        return "There is no checkpoint to resume from."
    return (
        f"The previous checkpoint {intact[-1]} is intact: free some space, then continue the run with "
        "--resume_from_checkpoint latest."
    )


def prune_checkpoints(output_dir: str, limit: int | None, keep: Path) -> None:
    """Delete the oldest checkpoints beyond `limit`, but never `keep`, the one just saved."""
    if limit is None:
        return
    older = [p for p in checkpoint_dirs(output_dir) if p != keep]
    for old in older[: max(0, len(older) + 1 - limit)]:
        shutil.rmtree(old)


def read_training_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINING_STATE_FILE).read_text())


def checkpoint_problem(path: Path, settings: dict | None = None) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed, or None. Its training_state.json must parse and hold every
    key; each file it lists must be there, with the size it was saved with (a safetensors header must parse); and,
    given `settings`, it must be a checkpoint of a run with these settings."""
    if not path.is_dir():
        return "no such folder"
    try:
        state = read_training_state(path)
    except FileNotFoundError:
        return f"{TRAINING_STATE_FILE} is missing (not a checkpoint, or a damaged one)"
    except (OSError, ValueError) as error:
        return f"{TRAINING_STATE_FILE} is unreadable ({error})"
    missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        return f"{TRAINING_STATE_FILE} lacks {', '.join(missing)} (written by another version of run_clip.py?)"
    for name, size in state["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was saved (truncated or damaged)"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (OSError, SafetensorError) as error:
                return f"{name} is unreadable ({error})"
    if settings is not None and (changes := settings_changes(state["settings"], settings)):
        return "it is a checkpoint of another run: " + "; ".join(changes)
    return None


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | None, settings: dict) -> Path | None:
    """The checkpoint to resume from (`--resume_from_checkpoint`), validated. `latest` is this run's newest complete
    checkpoint in `output_dir`: a damaged newer one is skipped with a warning that names it. An explicit folder that
    cannot be resumed is an error."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        for path in reversed(checkpoint_dirs(output_dir)):
            problem = checkpoint_problem(path, settings)
            if problem is None:
                return path
            logger.warning(f"skipping checkpoint {path}: {problem}")
        logger.info(f"no complete checkpoint of this run in {output_dir}: training from the start")
        return None
    path = Path(resume_from_checkpoint)
    problem = checkpoint_problem(path, settings)
    if problem is not None:
        raise SystemExit(f"--resume_from_checkpoint {path}: cannot resume: {problem}")
    return path


def check_resumable_data(checkpoint: Path, train_data) -> None:
    """The checkpoint's place in its epoch is a number of batches (or a position in each worker's stream): it means
    the same samples only on the same data. `train_data` is the training split, or a `TrainingStream`."""
    state = read_training_state(checkpoint)
    if isinstance(train_data, TrainingStream) or state.get("stream") is not None:
        check_resumable_stream(checkpoint, state.get("stream"), train_data)
        return
    train_samples = len(train_data)
    if state["train_samples"] != train_samples:
        raise SystemExit(
            f"cannot resume {checkpoint}: its run trained on {state['train_samples']} images of the training split, "
            f"which now has {train_samples} usable images. The data changed, so the batches of its epoch would differ "
            "from those already trained (samples trained twice or skipped). Train a new run in another --output_dir."
        )


def check_resumable_stream(checkpoint: Path, saved: dict | None, stream: "TrainingStream | None") -> None:
    """A streaming run resumes only on the stream it was reading, dealt to as many DataLoader workers: each worker's
    position counts the samples of its own shards (`ResumableStream`)."""
    now = stream.description() if isinstance(stream, TrainingStream) else None
    if saved == now:
        return
    if saved is None or now is None:
        was, is_ = ("a map-style split", "a stream") if saved is None else ("a stream", "a map-style split")
        problem = f"its run trained on {was}, this run on {is_}"
    elif saved["source"] != now["source"]:
        problem = f"its run streamed {describe_source(saved['source'])}, this run {describe_source(now['source'])}"
    else:
        problem = (
            f"its run read each process's shards with {saved['dataloader_num_workers']} DataLoader workers, this run "
            f"with {now['dataloader_num_workers']}: the shards would be dealt to the workers otherwise and the batches "
            f"of the epoch would change. Resume with --dataloader_num_workers {saved['dataloader_num_workers']}"
        )
    raise SystemExit(
        f"cannot resume {checkpoint}: {problem}. Its position in the epoch would then mean other samples (samples "
        "trained twice or skipped); otherwise train a new run in another --output_dir."
    )


def describe_source(source) -> str:
    if isinstance(source, str):
        return f"the data set {source}"
    return f"{len(source)} shards ({source[0]} ... {source[-1]})"


# ----- training from a stream ---------------------------------------------------------------------------------------


class ResumableStream(torch.utils.data.IterableDataset):
    """A training stream (a `datasets.IterableDataset` of `ndclip.streaming`) whose position in an epoch a checkpoint
    holds exactly.

    datasets' own `IterableDataset.state_dict` restarts a shuffle buffer empty (its documented limit): a resumed run
    would skip the samples that were in the buffer and draw another order. Here the position is the number of samples
    this reader -- the process, or each of its DataLoader workers, which read their own shards -- has yielded in the
    epoch; resuming reads the epoch again from its start and drops that many before yielding. The shard order, the
    worker's shards and the buffer are functions of (seed, epoch, worker), so the samples that follow are those an
    uninterrupted run trains next, in its order. The replay only reads: images stay encoded until the collator, so it
    costs reading the epoch's shards up to the checkpoint, without decoding or training. torchdata's
    StatefulDataLoader (`StreamLoader`) takes this state from each worker with every batch (its `Stateful` protocol).
    """

    def __init__(self, stream):
        self.stream = stream
        self.epoch = 0
        self.samples_yielded = 0
        self.resume_from: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)  # datasets draws the shard order and the buffer's randomness from it

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_yielded": self.samples_yielded}

    def load_state_dict(self, state: dict) -> None:
        self.resume_from = state

    def __iter__(self):
        resume, self.resume_from = self.resume_from, None
        skip = resume["samples_yielded"] if resume and resume["epoch"] == self.epoch else 0
        self.samples_yielded = 0
        for sample in self.stream:
            self.samples_yielded += 1
            if self.samples_yielded > skip:
                yield sample


class StreamLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader over a `ResumableStream`: `state_dict()` is where this process's batches have
    got to (each worker's position and whose turn it is), and `set_epoch` is that of accelerate's prepared loaders.

    It is not prepared by accelerate: the stream is already this process's share (`ndclip.streaming`), which
    `Accelerator.prepare` would split again, and accelerate's save_state would keep one process's position for all
    (`save_checkpoint`). Its batches go to the device in `batches_of_every_process`."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


@dataclass
class TrainingStream:
    """The training data of a `--streaming` run in this process: its stream, the bad samples it skipped, and what a
    checkpoint's position in it depends on (`description`)."""

    dataset: ResumableStream
    dropped: Any  # ndclip.streaming.DroppedSamples: bad samples skipped by this process's workers, by reason
    source: list[str] | str  # the shard files, in order, or a data set name
    num_workers: int  # DataLoader workers per process: each reads its own shards
    samples: int | None = None  # the samples of every shard, by their index (`ndclip shards`); None without one

    def description(self) -> dict:
        return {"source": self.source, "dataloader_num_workers": self.num_workers}


def stream_position(run: TrainingRun) -> dict | None:
    """This process's position in its stream, for a checkpoint saved mid-epoch (None otherwise: a checkpoint at the
    end of an epoch resumes at the start of the next one, which reads its stream from the start)."""
    if run.stream is None or not run.batches_in_epoch:
        return None
    return run.train_loader.state_dict()


def read_stream_position(checkpoint: Path, process_index: int) -> dict:
    path = checkpoint / STREAM_POSITION_FILE.format(process=process_index)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot resume {checkpoint}: process {process_index}'s stream position: {error}") from None


def batches_of_every_process(loader, accelerator: Accelerator, group: int = 1):
    """The loader's batches (on the device), `group` at a time (the batches of one optimizer step), for as long as
    every process has a whole group: then the epoch ends on every process at the same batch.

    The processes' streams are not equally long (shards of different sizes, bad samples skipped, each worker's last
    partial batch dropped). A process that ended its epoch alone would leave the others waiting forever in the next
    step's all-gather, and an optimizer step of a partial group would step some processes and not others. So before
    each group the processes agree (one all-reduce of a flag) that each has one; the samples left in the longer
    streams are not trained in this epoch (the next epoch draws another shard order). Every epoch thus ends on a whole
    optimizer step."""
    iterator = iter(loader)
    while True:
        batches = [batch for _, batch in zip(range(group), iterator)]
        whole = torch.tensor(len(batches) == group, device=accelerator.device, dtype=torch.long)
        if accelerator.reduce(whole, reduction="sum").item() < accelerator.num_processes:
            return
        for batch in batches:
            yield send_to_device(batch, accelerator.device)


# ----- the distributed mode: what runs is what was asked for --------------------------------------------------------

# The sharded modes an `accelerate launch` (its --use_fsdp / --use_deepspeed flags, or an `accelerate config` file
# that chose them) asks for through the environment, and the mode accelerate then runs in.
SHARDED_MODES = {"FSDP": ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                 "DeepSpeed": ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)}  # fmt: skip


def requested_sharded_modes() -> list[str]:
    """The sharded modes this process was launched for (FSDP, DeepSpeed), read from accelerate's variables."""
    return [name for name, (variable, _) in SHARDED_MODES.items() if parse_flag_from_env(variable, default=False)]


def sharded_mode_unavailable(requested: list[str], error: Exception) -> SystemExit:
    """The exit for an Accelerator that could not be built for the sharded mode asked for (accelerate 1.15 on CPUs:
    FSDP's plugin finds no GPU; DeepSpeed is not installed or needs one)."""
    return SystemExit(
        f"run_clip.py: {' and '.join(requested)} was asked for ({sharded_mode_variables(requested)}: "
        f"`accelerate launch --use_fsdp` / `--use_deepspeed` or an `accelerate config` that chose it), but accelerate "
        f"cannot set it up here: {type(error).__name__}: {str(error).rstrip('.')}. FSDP and DeepSpeed shard the model "
        "over GPUs (or "
        "other accelerators); accelerate's CPU mode has neither. To train on CPUs, launch without them: several "
        "processes train as plain data parallel (DDP over gloo)."
    )


def check_distributed_mode(accelerator: Accelerator, requested: list[str]) -> None:
    """Stop when a sharded mode was asked for but the accelerator runs in another one (accelerate builds a plain run
    silently, e.g. for one CPU process, or when the variable is `1` rather than `true`): the run would not be the run
    asked for, and would need the memory of a whole model in every process."""
    for name in requested:
        expected = SHARDED_MODES[name][1]
        if accelerator.distributed_type != expected:
            raise SystemExit(
                f"run_clip.py: {name} was asked for ({sharded_mode_variables([name])}) but this run would train in "
                f"accelerate's {accelerator.distributed_type.value} mode ({distributed_mode(accelerator)}): a "
                f"plain, unsharded model in every process. Stopped rather than train otherwise than asked. FSDP and "
                f"DeepSpeed need GPUs (or other accelerators) and `accelerate launch` without --cpu; to train as "
                f"data parallel instead, launch without --use_fsdp / --use_deepspeed."
            )


def sharded_mode_variables(names: list[str]) -> str:
    return ", ".join(f"{SHARDED_MODES[n][0]}={os.environ.get(SHARDED_MODES[n][0])}" for n in names)


def distributed_mode(accelerator: Accelerator) -> str:
    """What the run actually runs as, for the log: accelerate's distributed type, processes, device, precision."""
    processes = accelerator.num_processes
    return (
        f"distributed mode {accelerator.distributed_type.value}, {processes} process{'es' if processes > 1 else ''} "
        f"on {accelerator.device.type}, mixed precision {accelerator.mixed_precision}"
    )


# ----- one run per output folder ------------------------------------------------------------------------------------

RUN_FILE = "training_run.json"
# Arguments that may change when a run is resumed: they change how it is run, logged or published, not what it trains
# or how it is evaluated. Every other argument, and the number of processes, is a setting of the run.
RESUMABLE_CHANGES = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "logging_steps", "eval_steps", "with_tracking", "report_to", "push_to_hub", "hub_model_id", "hub_token",
    "hub_private_repo", "push_checkpoints", "dataloader_num_workers", "preprocessing_num_workers",
    "disable_feature_cache", "gradient_checkpointing", "torch_compile", "torch_compile_backend",
}  # fmt: skip
_SKIPS_OR_REPEATS = "re-train or skip samples of that epoch"
# What resuming under a changed setting would do (any other change: the run would no longer be the one it started as).
CHANGE_EFFECTS = {
    "per_device_train_batch_size": f"the checkpoint's place in its epoch counts batches of the old size: it would "
    f"{_SKIPS_OR_REPEATS}",
    "num_processes": f"the checkpoint's place in its epoch counts each process's batches: it would {_SKIPS_OR_REPEATS}",
    "gradient_accumulation_steps": "an optimizer step would take another number of batches: the checkpoint's step "
    "count and learning-rate schedule would no longer fit",
    "contrastive_accumulation": "a loader batch would hold another number of pairs (k micro-batches or one): the "
    f"checkpoint's place in its epoch would {_SKIPS_OR_REPEATS}",
    "seed": "the shuffled order of the epoch, the held-out split and the augmentations would change: samples of the "
    "epoch would be trained twice or not at all",
    "max_train_steps": "the learning-rate schedule is sized for the run's number of steps",
    "train_shards": "the stream would hold other samples: the checkpoint's position in each worker's shards would "
    f"{_SKIPS_OR_REPEATS}",
    "shuffle_buffer_size": "the stream's order would change: the checkpoint's position in it would "
    f"{_SKIPS_OR_REPEATS}",
    "num_train_epochs": "the learning-rate schedule is sized for the run's number of steps",
}
# Settings added after runs were recorded, with the value that keeps what those runs did (as given on the command
# line, before defaults are filled in): a checkpoint recorded without them resumes when they are left so.
SETTINGS_ADDED_LATER = {
    "loss": None, "captions_per_image": 1, "contrastive_accumulation": False, "streaming": False, "train_shards": None,
    "shuffle_buffer_size": 1000, "allow_example_split": False, "zero_shot_templates": None,
}  # fmt: skip
# What a run writes into its output folder: `--overwrite_output_dir` deletes these, and only these.
RUN_ARTIFACTS = [
    RUN_FILE, CHECKPOINTS_DIR, "runs", "metrics.jsonl", "eval_results.json", "README.md", "loss.png",
    "retrieval_recall.png", "model*.safetensors", "model.safetensors.index.json",
]  # fmt: skip


def run_settings(args, num_processes: int) -> dict:
    """What makes a run this run: every argument except `RESUMABLE_CHANGES`, as given, and the number of processes
    (as JSON would hold them, so that recorded and current settings compare equal)."""
    settings = {k: getattr(v, "value", v) for k, v in vars(args).items() if k not in RESUMABLE_CHANGES}
    return {**json.loads(json.dumps(settings, default=str)), "num_processes": num_processes}


def settings_changes(saved: dict, now: dict) -> list[str]:
    """Each setting that differs, as `name: saved → now (what resuming would do)`. A run recorded before a setting
    existed ran with that setting's `SETTINGS_ADDED_LATER` value, which is what its absence is compared as."""
    saved = {**{k: v for k, v in SETTINGS_ADDED_LATER.items() if k in now}, **saved}
    return [
        f"{key}: {saved.get(key)} → {now.get(key)} "
        f"({CHANGE_EFFECTS.get(key, 'the run would continue with other settings than it was trained with')})"
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key) != now.get(key)
    ]


def prepare_output_dir(args, settings: dict, accelerator: Accelerator) -> None:
    """Before anything is loaded: the output folder (`--output_dir`) must be new (or empty), this run's when resuming,
    or cleared with --overwrite_output_dir, and writable. The run's settings are recorded there, to recognise it when
    resuming."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        check_output_dir(args, settings)
        try:
            out.mkdir(parents=True, exist_ok=True)
            if args.overwrite_output_dir:
                delete_run_artifacts(out)
            write_text_atomically(out / RUN_FILE, json.dumps({"settings": settings}, indent=2))
        except OSError as error:
            raise SystemExit(f"--output_dir {out} is not writable: {error}") from None
    accelerator.wait_for_everyone()


def check_output_dir(args, settings: dict) -> None:
    """Refuse an output folder that holds something else than this run (or that `--overwrite_output_dir` would clear
    of the very checkpoint to resume), naming what to do instead."""
    out, resume = Path(args.output_dir), args.resume_from_checkpoint
    if args.overwrite_output_dir and resume and (resume == "latest" or out.resolve() in Path(resume).resolve().parents):
        raise SystemExit(
            f"--overwrite_output_dir would delete the checkpoints that --resume_from_checkpoint {resume} resumes: "
            "pass one or the other"
        )
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries or args.overwrite_output_dir:
        return
    if not resume:
        listing = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise SystemExit(
            f"--output_dir {out} is not empty ({listing}): continue the run it holds with --resume_from_checkpoint "
            "latest, choose another --output_dir, or pass --overwrite_output_dir to delete the previous run's "
            "checkpoints, logs, metrics, weights and card and train afresh"
        )
    try:
        recorded = json.loads((out / RUN_FILE).read_text())["settings"]
    except (OSError, ValueError, TypeError, KeyError):
        raise SystemExit(
            f"--output_dir {out} is not empty and holds no run of run_clip.py (no readable {RUN_FILE}) to resume: "
            "choose another --output_dir, or pass --overwrite_output_dir"
        ) from None
    changes = settings_changes(recorded, settings)
    if changes:
        raise SystemExit(
            f"--output_dir {out} holds a run with other settings, which --resume_from_checkpoint {resume} cannot "
            "continue as the same run: " + "; ".join(changes) + ". Resume it with its own settings, or train this run "
            "in another --output_dir."
        )


def delete_run_artifacts(out: Path) -> None:
    """What a previous run wrote, so that nothing of it mixes with the new run (files of other origin stay)."""
    for pattern in RUN_ARTIFACTS:
        for path in out.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def write_text_atomically(path: Path, text: str) -> None:
    """Write a temporary file, then rename it into place: a process killed meanwhile leaves the old file whole."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----- the metrics history ------------------------------------------------------------------------------------------


class MetricsHistory:
    """`metrics.jsonl` in the output folder: one line per logged training step or evaluation (main process only),
    also sent to accelerate's trackers when `tracking`. `records` counts its lines, so that a checkpoint can record
    how far the history had got."""

    def __init__(self, output_dir: str, accelerator: Accelerator, tracking: bool = False):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.tracking = tracking
        self.records = 0

    def keep_first(self, records: int) -> None:
        """Start the history after `records` lines: on resume, forget what was logged after the checkpoint -- by a
        killed run, perhaps ending in a half-written line, or the evaluation that ended a finished run: the resumed
        run logs those steps again."""
        if self.accelerator.is_main_process and not self.path.exists():
            records = 0  # a fresh run, or resumed from another folder's checkpoint: this folder's history starts here
        elif self.accelerator.is_main_process:
            text = self.path.read_text()
            lines = text.splitlines()
            if text and not text.endswith("\n") and len(lines) > records:
                logger.warning(f"{self.path} ends in a half-written line (the run was killed writing it): dropped")
            if len(lines) < records:
                logger.warning(f"{self.path} has {len(lines)} records, fewer than the {records} of the checkpoint")
            write_text_atomically(self.path, "".join(line + "\n" for line in lines[:records]))
            records = min(records, len(lines))
        self.records = records

    def log(self, record: dict) -> None:
        if self.tracking:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.records += 1


def plot_history(output_dir: str) -> list[Path]:
    """PNG plots of the training loss and of the retrieval recalls, drawn from `metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    paths = [Path(output_dir) / "loss.png", Path(output_dir) / "retrieval_recall.png"]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="contrastive loss", title="NdCLIP training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for direction, style in (("image_to_text", "-"), ("text_to_image", "--")):
        for k in (1, 5, 10):
            key = f"{direction}_recall@{k}"
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], style, marker="o", label=key)
    ax.set(xlabel="optimizer step", ylabel="recall", ylim=(0, 1), title="Retrieval recall on the evaluation split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
