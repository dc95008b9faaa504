#!/usr/bin/env python
"""Contrastive training of NdCLIP with accelerate.

    accelerate launch run_clip.py --preset demo --output_dir outputs/demo              # offline, minutes on a CPU
    accelerate launch run_clip.py --output_dir outputs/flickr8k                        # ViT-B/16 + DistilBERT, Hub
    accelerate launch run_clip.py --data_dir ~/data/Flickr8k --output_dir outputs/f8k  # a local Flickr8k download

The same command trains on one CPU, one GPU, or many GPUs/nodes: the number of processes, mixed precision and
FSDP/DeepSpeed come from `accelerate config` / `accelerate launch` flags. The script reads top to bottom: the
arguments, then `main`, a list of steps (accelerator, output folder and checkpoint, data, model, loaders, optimizer
and schedule, resume, training loop with evaluations and checkpoints, final save and push), then each step in that
order. The pieces they rely on live in the `ndclip` package: data and transforms, the feature cache, evaluation,
`ndclip.losses` (the loss over the global batch) and `ndclip.training` (the run's state, checkpoints and resume, the
output folder, the guards, the metrics history).
"""

import argparse
import itertools
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    TorchDynamoPlugin,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, SchedulerType, get_scheduler

from modeling_ndclip import NdClipModel
from ndclip.data import (
    DatasetDownloadError,
    add_source_arguments,
    flatten_captions,
    load_image_caption_dataset,
    without_image_decoding,
)
from ndclip.endpoint import write_endpoint_files
from ndclip.evaluation import evaluate, load_zero_shot_dataset
from ndclip.feature_cache import (
    CachedCaptionCollator,
    CachedTowerCollator,
    caption_offsets,
    compute_caption_features,
    compute_image_features,
)
from ndclip.gradient_cache import backward_through_cache, embed_without_gradients, split_batch
from ndclip.hub import push_folder, write_card
from ndclip.losses import global_loss
from ndclip.prompts import BUILTIN, DEFAULT_TEMPLATE, describe_templates, template_argument, templates_argument
from ndclip.training import (
    SAVE_ERRORS,
    MetricsHistory,
    ResumableStream,
    StreamLoader,
    TrainingRun,
    TrainingStream,
    batches_of_every_process,
    check_distributed_mode,
    check_resumable_data,
    distributed_mode,
    intact_checkpoint_note,
    plot_history,
    prepare_output_dir,
    requested_sharded_modes,
    resolve_checkpoint,
    resume,
    run_settings,
    save_checkpoint,
    sharded_mode_unavailable,
    stop_if_loss_not_finite,
    stop_if_parameters_not_finite,
    stream_position,
    training_state,
    write_text_atomically,
)
from ndclip.transforms import CaptionCollator, TextCollator, eval_image_transform, train_image_transform
from processing_ndclip import NdClipProcessor

logger = get_logger(__name__)

MAX_DEFAULT_DATALOADER_WORKERS = 8
# torch.compile backends that accelerate's TorchDynamoPlugin takes and that need nothing beyond torch.
COMPILE_BACKENDS = ["inductor", "aot_eager", "eager", "cudagraphs"]


# ----- arguments ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="Continue from a saved NdCLIP (folder or Hub id).")
    model.add_argument("--vision_model_name_or_path", default="google/vit-base-patch16-224")
    model.add_argument("--text_model_name_or_path", default="distilbert-base-uncased")
    model.add_argument("--tokenizer_name", help="Default: the text tower's tokenizer.")
    model.add_argument("--image_processor_name", help="Default: the vision tower's image processor.")
    model.add_argument("--projection_dim", type=int, default=256)
    model.add_argument("--projection_type", choices=["ndlinear", "linear"], default="ndlinear")
    model.add_argument("--vision_pooling", choices=["cls", "mean"], default="cls")
    model.add_argument("--text_pooling", choices=["cls", "mean"], default="mean")
    model.add_argument("--freeze_vision_model", action="store_true")
    model.add_argument("--freeze_text_model", action="store_true")
    model.add_argument("--disable_feature_cache", action="store_true", help="Run frozen towers at every step.")
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--torch_compile", action="store_true", help="Compile the model with torch.compile.")
    model.add_argument(
        "--torch_compile_backend", default="inductor", choices=COMPILE_BACKENDS,
        help="Backend for --torch_compile (`aot_eager` traces the model without generating kernels: a quick check).",
    )

    data = parser.add_argument_group("data")
    add_source_arguments(data, default_dataset_name="jxie/flickr8k")
    data.add_argument("--max_seq_length", type=int, default=64)
    data.add_argument("--max_train_samples", type=int, help="Keep the first N training images (for quick runs).")
    data.add_argument("--max_eval_samples", type=int, help="Keep the first N evaluation images.")
    data.add_argument("--eval_split", default="validation", help="`validation` or `test`.")
    data.add_argument("--validation_fraction", type=float, default=0.1, help="Held out by image when no split exists.")
    data.add_argument("--preprocessing_num_workers", type=int)
    data.add_argument(
        "--dataloader_num_workers", type=int,
        help="DataLoader worker processes per training process. Default: this process's share of the CPU cores less "
        "one (the one that drives the model), at most 8; 0 loads in the training process.",
    )
    # ----- streaming (issue 12): the training samples read as a stream of shards (ndclip.streaming, README)
    data.add_argument(
        "--streaming", action="store_true",
        help="Read the training samples as a stream (a datasets IterableDataset): the shards of --train_shards, or "
        "--dataset_name in streaming mode. Needs --max_train_steps (a stream has no length). Evaluation stays "
        "map-style: the --eval_split of --data_dir, --train_file/--validation_file or --preset demo; without one, "
        "the run trains without evaluating.",
    )
    data.add_argument(
        "--train_shards", nargs="+",
        help="With --streaming: globs or paths of webdataset .tar shards (`KEY.jpg` + `KEY.txt` + `KEY.json`, as "
        "`ndclip shards` and img2dataset write them) or .parquet shards, or a folder of them. Whole shards go to each "
        "process and DataLoader worker: a multiple of processes x workers shards keeps them all busy.",
    )
    data.add_argument(
        "--shuffle_buffer_size", type=int, default=1000,
        help="With --streaming: samples in each reader's shuffle buffer (seeded by --seed; the shard order is drawn "
        "again every epoch). 0 reads the shards in order. The buffer holds encoded images: memory grows with it.",
    )
    data.add_argument(
        "--allow_example_split", action="store_true",
        help="With --streaming, when the shard count is not a multiple of the processes: every process reads every "
        "shard and keeps one sample in N (complete, at N times the reading) instead of stopping.",
    )
    # ----- end of streaming
    data.add_argument("--zero_shot_dataset", help="An image-classification dataset (Hub id or folder) for zero-shot.")
    data.add_argument("--zero_shot_split", default="test")
    # ----- zero-shot prompts (issue 11, part 4): one template, or an ensemble averaged per class (ndclip.prompts)
    data.add_argument(
        "--zero_shot_template", type=template_argument, default=DEFAULT_TEMPLATE,
        help="The zero-shot prompt: each class name goes at its one '{}'.",
    )
    data.add_argument(
        "--zero_shot_templates", type=templates_argument,
        help=f"A prompt ensemble for zero-shot accuracy, overriding --zero_shot_template: a text file with one "
        f"template per line (blank lines and '#' comments skipped), or `{BUILTIN}` for the built-in set. Each class's "
        "normalised text embeddings are averaged over the templates; the results list the templates.",
    )
    # ----- end of zero-shot prompts

    train = parser.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--learning_rate", type=float, default=5e-5)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--num_train_epochs", type=int, default=3)
    train.add_argument("--max_train_steps", type=int, help="Overrides the number of epochs.")
    train.add_argument(
        "--gradient_accumulation_steps", type=int, default=1,
        help="Optimizer step every k batches of --per_device_train_batch_size. Plain accumulation computes each "
        "batch's contrastive loss with that batch's negatives only: it is not a contrastive batch of k x b (see "
        "--contrastive_accumulation).",
    )
    # --- exact contrastive accumulation (issue 11, part 1: ndclip/gradient_cache.py) ---
    train.add_argument(
        "--contrastive_accumulation", action="store_true",
        help="Make --gradient_accumulation_steps k exact for the contrastive loss (the gradient-cache method): each "
        "step loads k x --per_device_train_batch_size pairs, embeds them in k micro-batches without gradients, "
        "computes the loss over all of them (of every process), then re-runs each micro-batch with gradients (same "
        "dropout). Same loss and weights as a batch of k x b, in about the memory of b, for about one more forward.",
    )
    # --- end of the contrastive accumulation block ---
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine", choices=list(SchedulerType))
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--seed", type=int, default=42)
    # --- the contrastive loss (issue 11: SigLIP, several captions per image) ---
    train.add_argument(
        "--loss", choices=["softmax", "sigmoid"],
        help="`softmax`: CLIP's symmetric cross-entropy; `sigmoid`: SigLIP's pairwise sigmoid loss, with a learned "
        "bias (a new model is built with it; see README). Both over the global batch of all processes. Stored in the "
        "model's config (`contrastive_loss`). Default: softmax for a new model, the saved model's own loss with "
        "--model_name_or_path (another one is refused).",
    )
    train.add_argument(
        "--captions_per_image", type=captions_per_image_arg, default=1,
        help="Captions of each image in a training batch (1, 2, ..., or `all`: the most captions any training image "
        "has), each a positive of its image in the loss. An image with fewer captions repeats its own to fill N. "
        "Default 1: one caption drawn per image and epoch.",
    )
    # --- end of the contrastive loss block ---
    train.add_argument("--preset", choices=["demo"], help="`demo`: offline generated data and tiny towers.")

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Train afresh in an output folder that holds a previous run: its checkpoints, logs, metrics, weights and "
        "card are deleted first (other files are left alone).",
    )
    out.add_argument("--checkpointing_steps", help="Save the training state every N steps, or `epoch`.")
    out.add_argument("--checkpoints_total_limit", type=int, help="Keep at most this many checkpoints.")
    out.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or `latest` (in output_dir).")
    out.add_argument("--eval_steps", type=int, help="Evaluate every N steps (default: at the end of every epoch).")
    out.add_argument("--logging_steps", type=int, default=10)
    out.add_argument("--with_tracking", action="store_true", help="Log through accelerate's trackers.")
    out.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, ..., or `all`.")
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", help="`user/name` of the Hub repository.")
    out.add_argument("--hub_token")
    out.add_argument("--hub_private_repo", action="store_true")
    out.add_argument("--push_checkpoints", action="store_true", help="Also push the model at every checkpoint.")

    args = parser.parse_args(argv)
    if args.preset == "demo":
        apply_demo_preset(args, parser)
    validate_args(args)
    return args


def captions_per_image_arg(value: str) -> int | str:
    """`--captions_per_image`: a positive integer, or `all` (counted on the training split by
    `resolve_captions_per_image`)."""
    if value == "all":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"must be a positive integer or `all`, got {value!r}")


def apply_demo_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The demo's training settings, for every option left at its default on the command line."""
    from ndclip.demo import DEMO_TRAINING_DEFAULTS

    for key, value in DEMO_TRAINING_DEFAULTS.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)


# Numeric flags and the least value each takes (None: unset, allowed). Checked before anything is loaded: out of range,
# they would fail late (a division by zero at the first log, an empty loader) or silently (a negative
# --checkpoints_total_limit deleted every checkpoint, a 0 sample limit meant no limit).
AT_LEAST = {
    "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "num_train_epochs": 1,
    "max_train_steps": 0,  # 0: evaluate and save the starting model
    "gradient_accumulation_steps": 1, "num_warmup_steps": 0, "eval_steps": 1, "logging_steps": 1,
    "checkpoints_total_limit": 1, "max_seq_length": 1, "max_train_samples": 1, "max_eval_samples": 1,
    "dataloader_num_workers": 0, "preprocessing_num_workers": 1, "projection_dim": 1, "seed": 0,
    "shuffle_buffer_size": 0,
    "weight_decay": 0.0, "max_grad_norm": 0.0,  # 0: no gradient clipping
}  # fmt: skip
MAX_SEED = 2**32 - 1  # numpy's seeds, which accelerate's set_seed sets too


def validate_args(args: argparse.Namespace) -> None:
    for name, least in AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= least):
            raise SystemExit(f"--{name} must be at least {least}, got {value}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise SystemExit(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if not 0 < args.validation_fraction < 1:
        raise SystemExit(f"--validation_fraction must be between 0 and 1 (exclusive), got {args.validation_fraction}")
    if args.seed > MAX_SEED:
        raise SystemExit(f"--seed must be at most {MAX_SEED}, got {args.seed}")
    steps = args.checkpointing_steps
    if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) > 0):
        raise SystemExit(f"--checkpointing_steps must be a positive integer or `epoch`, got {steps!r}")
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id (e.g. `your-name/ndclip-flickr8k`)")
    if args.eval_split not in ("validation", "test"):
        raise SystemExit(f"--eval_split must be `validation` or `test`, got {args.eval_split!r}")
    validate_streaming_args(args)
    if args.contrastive_accumulation and args.gradient_accumulation_steps < 2:
        raise SystemExit(
            "--contrastive_accumulation splits each batch into --gradient_accumulation_steps micro-batches: set "
            f"--gradient_accumulation_steps to 2 or more (got {args.gradient_accumulation_steps})"
        )


def validate_streaming_args(args: argparse.Namespace) -> None:
    """--streaming's flags (issue 12): what a stream cannot do is refused before anything is loaded."""
    if not args.streaming:
        if args.train_shards:
            raise SystemExit("--train_shards are read as a stream: add --streaming")
        return
    if args.max_train_steps is None:
        raise SystemExit(
            "--streaming needs --max_train_steps: a stream has no length, so the schedule cannot be sized from "
            "epochs. One epoch is about (samples in the shards) / (--per_device_train_batch_size x processes x "
            "--gradient_accumulation_steps) steps; `ndclip shards` writes the sample count in index.json"
        )
    if args.max_train_samples is not None:
        raise SystemExit(
            "--max_train_samples does not work with --streaming: a stream is not cut to its first samples; bound the "
            "run with --max_train_steps"
        )
    if args.zero_shot_dataset and not has_evaluation_source(args):
        raise SystemExit(
            "--zero_shot_dataset is evaluated with the retrieval metrics, and a --streaming run evaluates only with "
            "map-style evaluation data: add --data_dir, --train_file (and --validation_file) or --preset demo"
        )


def has_evaluation_source(args: argparse.Namespace) -> bool:
    """Whether a --streaming run has map-style data to evaluate on (its `--eval_split`)."""
    return bool(args.data_dir or args.train_file or args.preset == "demo")


def validate_args_for_model(args: argparse.Namespace, model: NdClipModel) -> None:
    """The flags whose range the model sets: a caption longer than the text tower's position embeddings would crash
    the step that draws it, mid-epoch."""
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if positions is not None and args.max_seq_length > positions:
        raise SystemExit(
            f"--max_seq_length {args.max_seq_length} is longer than the text tower, which has {positions} positions"
        )


# ----- main: the run, step by step ----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Train, evaluate and save one run; returns its final evaluation."""
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    logger.info(distributed_mode(accelerator))  # what runs, whatever was asked for
    set_seed(args.seed)
    settings = run_settings(args, accelerator.num_processes)  # the arguments as given, before defaults are filled in
    set_loader_defaults(args, accelerator)
    # Output folder and checkpoint: checked before anything is loaded, so that a mistake there fails fast.
    prepare_output_dir(args, settings, accelerator)
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint, settings)
    raw = load_data(args, accelerator)
    train_split, eval_split = select_splits(args, raw)
    if args.streaming:  # the training samples come from a stream; `raw`, if any, is only evaluated on
        train_split = open_training_stream(args, accelerator)
    if checkpoint is not None:
        check_resumable_data(checkpoint, train_split)
    resolve_captions_per_image(args, train_split)
    model, processor = build_model(args, demo_dataset=raw if args.preset == "demo" else None)
    run = prepare_training(args, accelerator, settings, model, processor, train_split, eval_split)
    resume(run, checkpoint)
    train(run)
    save_final_model(run)
    return run.eval_results


# ----- accelerate ---------------------------------------------------------------------------------------------------


def make_accelerator(args) -> Accelerator:
    """Processes, devices and mixed precision come from `accelerate launch`. A seedable sampler makes the shuffling a
    function of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one. FSDP or DeepSpeed asked
    for but not what accelerate would run is an error (`check_distributed_mode`), not a silent plain-DDP run."""
    sharded = requested_sharded_modes()
    try:
        accelerator = build_accelerator(args)
    except (RuntimeError, ImportError, ValueError) as error:
        if not sharded:
            raise
        raise sharded_mode_unavailable(sharded, error) from None
    check_distributed_mode(accelerator, sharded)
    if args.contrastive_accumulation and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise SystemExit(
            "--contrastive_accumulation needs to run the micro-batches' backward passes itself, which DeepSpeed's "
            "engine does not let it: use DDP or FSDP, or plain --gradient_accumulation_steps"
        )
    return accelerator


def build_accelerator(args) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=loader_batches_per_step(args),
        # The schedule advances once per optimizer step (run_clip steps it on synchronised steps only), whatever
        # the number of processes: `num_training_steps` is then simply `max_train_steps`.
        step_scheduler_with_optimizer=False,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Captions are padded per batch, so sequence lengths vary: compile for dynamic shapes, not one per length.
        dynamo_plugin=(
            TorchDynamoPlugin(backend=args.torch_compile_backend, dynamic=True) if args.torch_compile else None
        ),
    )


# --- exact contrastive accumulation: the loader's batch and accelerate's accumulation (ndclip/gradient_cache.py) ---
# With --contrastive_accumulation the loader yields the whole step's k x b pairs per process, which the training step
# splits into k micro-batches: the data order, the resume position (batches of the epoch), the schedule and the logs
# are those of a plain batch of k x b, and accelerate accumulates nothing (one loader batch = one optimizer step).


def train_loader_batch_size(args) -> int:
    """Pairs per loader batch and process: one micro-batch, or with --contrastive_accumulation the step's k of them."""
    return args.per_device_train_batch_size * (args.gradient_accumulation_steps if args.contrastive_accumulation else 1)


def loader_batches_per_step(args) -> int:
    """Loader batches per optimizer step: accelerate's gradient accumulation steps."""
    return 1 if args.contrastive_accumulation else args.gradient_accumulation_steps


# --- end of the contrastive accumulation block ---


def configure_logging(accelerator: Accelerator) -> None:
    """Our progress messages on every process; library warnings on the local main process only."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown ours
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def set_loader_defaults(args, accelerator: Accelerator) -> None:
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_dataloader_workers()
    args.dataloader_pin_memory = accelerator.device.type == "cuda"  # page-locked batches copy to the GPU async


def default_dataloader_workers() -> int:
    """Worker processes that fit beside the training process on this process's share of the CPU cores: decoding and
    cropping the photos in workers overlaps it with the model's step (benchmarks/bench_end_to_end.py), but each
    worker takes a core, and the training process needs one to drive the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun, which accelerate launch runs
    return max(0, min(MAX_DEFAULT_DATALOADER_WORKERS, cores // local_processes - 1))


# ----- data ---------------------------------------------------------------------------------------------------------


def load_data(args, accelerator: Accelerator) -> datasets.DatasetDict | None:
    """Loaded and validated once (the main process first, the others then read datasets' cache); unusable samples
    are skipped, and counted in a warning. A --streaming run loads only its evaluation source, if it has one."""
    if args.streaming and not has_evaluation_source(args):
        logger.warning(
            "--streaming without --data_dir, --train_file or --preset demo: no evaluation data, so this run trains "
            "and saves without evaluating (no eval_results.json)"
        )
        return None
    with accelerator.main_process_first():
        raw = read_data(args)
    for split, reasons in getattr(raw, "dropped_samples", {}).items():
        if reasons:
            logger.warning(f"skipped unusable samples in `{split}`: {dict(reasons)}")
    if args.eval_split not in raw:
        raise SystemExit(f"--eval_split {args.eval_split!r} is not in the data set (splits: {', '.join(raw)})")
    return raw


def read_data(args) -> datasets.DatasetDict:
    if args.preset == "demo" and not (args.data_dir or args.train_file):
        from ndclip.demo import make_demo_dataset

        return make_demo_dataset(seed=args.seed)
    use_hub = not (args.data_dir or args.train_file)
    return load_image_caption_dataset(
        dataset_name=args.dataset_name if use_hub else None,
        dataset_config_name=args.dataset_config_name,
        data_dir=args.data_dir,
        train_file=args.train_file,
        validation_file=args.validation_file,
        image_column=args.image_column,
        caption_column=args.caption_column,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        num_proc=args.preprocessing_num_workers,
    )


def select_splits(args, raw: datasets.DatasetDict | None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training split and the evaluation split (`--eval_split`), cut to `--max_*_samples`. Training images stay
    encoded until the training transform decodes them, a JPEG straight into a uint8 tensor (`DecodeImage`), in the
    DataLoader's workers. A --streaming run has no training split here (None), nor an evaluation split
    without an evaluation source."""
    if args.streaming:
        return None, truncate(raw[args.eval_split], args.max_eval_samples) if raw is not None else None
    train_split = without_image_decoding(truncate(raw["train"], args.max_train_samples))
    return train_split, truncate(raw[args.eval_split], args.max_eval_samples)


def truncate(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


# ----- streaming (issue 12): this process's share of the stream, and its loader -----------------------------------


def open_training_stream(args, accelerator: Accelerator) -> TrainingStream:
    """This process's share of the `--train_shards` (or `--dataset_name`) stream, shuffled and checked sample by
    sample (ndclip.streaming). The DataLoader workers that read it are at most its shards: each reads whole shards."""
    from ndclip.shards import indexed_sample_count
    from ndclip.streaming import resolve_train_shards, training_stream

    source = args.train_shards or args.dataset_name
    try:
        kind, resolved = resolve_train_shards(source)
        stream, dropped = training_stream(
            source, seed=args.seed, shuffle_buffer_size=args.shuffle_buffer_size, rank=accelerator.process_index,
            world_size=accelerator.num_processes, num_workers=args.dataloader_num_workers,
            allow_example_split=args.allow_example_split, image_column=args.image_column,
            caption_column=args.caption_column, dataset_config_name=args.dataset_config_name,
        )  # fmt: skip
    except ValueError as error:  # no shard matched, uneven shards, no image or caption column: named in the message
        raise SystemExit(f"run_clip.py: {error}") from None
    workers = min(args.dataloader_num_workers, stream.num_shards)
    samples = indexed_sample_count(resolved) if kind != "dataset" else None
    return TrainingStream(ResumableStream(stream), dropped, resolved, workers, samples)


def make_stream_loader(stream: TrainingStream, collator, args) -> StreamLoader:
    """The stream's loader: whole per-process batches (each worker drops its last partial one), worker seeds from
    its own generator (as `make_loader`), its position in `state_dict()` for the checkpoints."""
    with warnings.catch_warnings():  # torchdata 0.11 calls an API that torch deprecated; nothing to act on here
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StreamLoader(
            stream.dataset, batch_size=train_loader_batch_size(args), collate_fn=collator,
            num_workers=stream.num_workers, drop_last=True, pin_memory=args.dataloader_pin_memory,
            generator=torch.Generator().manual_seed(args.seed),
        )  # fmt: skip


def describe_training_data(train_data) -> str:
    if not isinstance(train_data, TrainingStream):
        return f"{len(train_data)} images"
    shards = "" if isinstance(train_data.source, str) else f"{len(train_data.source)} shards of "
    samples = f"{train_data.samples} samples" if train_data.samples is not None else "samples"
    where = train_data.source if isinstance(train_data.source, str) else os.path.dirname(train_data.source[0])
    return f"a stream of {shards}{samples} ({where})"


def log_stream_epoch(run: TrainingRun) -> None:
    """The end of a stream's epoch: the batches every process trained, and the bad samples the processes skipped
    (summed over them; ndclip.streaming counts them as they are read)."""
    from ndclip.data import UNUSABLE_REASONS

    counts = run.stream.dropped.counts()
    totals = torch.tensor([counts.get(reason, 0) for reason in UNUSABLE_REASONS], device=run.accelerator.device)
    totals = run.accelerator.reduce(totals, reduction="sum").tolist()
    run.stream.dropped.reset()
    logger.info(f"end of epoch {run.epoch} of the stream: {run.batches_in_epoch} batches per process")
    skipped = {reason: count for reason, count in zip(UNUSABLE_REASONS, totals) if count}
    if skipped:
        logger.warning(f"skipped unusable samples in epoch {run.epoch} of the stream: {skipped}")


# ----- end of streaming


def resolve_captions_per_image(args, train_split: datasets.Dataset) -> None:
    """`--captions_per_image all`: the most captions any training image has (5 on Flickr8k)."""
    if args.captions_per_image == "all" and args.streaming:
        raise SystemExit(
            "--captions_per_image all counts the captions of every training image, which a stream (--streaming) "
            "cannot do before training: give the number (5 for Flickr8k)"
        )
    if args.captions_per_image == "all":
        counts = [len(captions) for captions in train_split.select_columns(["captions"])["captions"]]
        args.captions_per_image = max(counts)


# ----- model --------------------------------------------------------------------------------------------------------


def build_model(args, demo_dataset=None) -> tuple[NdClipModel, NdClipProcessor]:
    """The model and processor to train, with the towers frozen and gradient checkpointing as asked."""
    model, processor = load_model_and_processor(args, demo_dataset)
    validate_args_for_model(args, model)
    check_loss(args, model)
    if args.freeze_vision_model:
        model.lock_image_tower()
    if args.freeze_text_model:
        model.lock_text_tower()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, processor


def load_model_and_processor(args, demo_dataset=None) -> tuple[NdClipModel, NdClipProcessor]:
    """The demo's tiny model (`--preset demo`), a saved NdCLIP (`--model_name_or_path`), or a new one from two
    pretrained towers; without network, one message that says what to do instead of a traceback."""
    try:
        if demo_dataset is not None:
            from ndclip.demo import demo_model_and_processor

            loss = args.loss or "softmax"
            return demo_model_and_processor(
                demo_dataset, seed=args.seed, projection_type=args.projection_type, contrastive_loss=loss
            )
        if args.model_name_or_path:
            model = NdClipModel.from_pretrained(args.model_name_or_path)
            return model, NdClipProcessor.from_pretrained(args.model_name_or_path)
        return from_pretrained_towers(args)
    except OSError as error:  # transformers' "couldn't connect / not a local folder" errors are OSErrors
        names = args.model_name_or_path or f"{args.vision_model_name_or_path} / {args.text_model_name_or_path}"
        raise SystemExit(
            f"run_clip.py: could not load the model {names}: {str(error).splitlines()[0]}\n"
            "Without network, train offline with `--preset demo`, or point --model_name_or_path (a saved NdCLIP) or "
            "--vision_model_name_or_path / --text_model_name_or_path at local folders."
        ) from None


def check_loss(args, model: NdClipModel) -> None:
    """`--loss` is the model's own: a saved model continues with the loss it was trained with (its logits mean
    what that loss made them mean: a sigmoid model's have a learned bias, a softmax model's none). Without --loss,
    the model's loss is the run's."""
    own = model.config.contrastive_loss
    if args.loss is not None and args.loss != own:
        raise SystemExit(
            f"--loss {args.loss}: the model {args.model_name_or_path} was trained with the {own} loss (its config's "
            f"`contrastive_loss`), and its logits are calibrated for it. Continue it with --loss {own} (or without "
            f"--loss), or train a new {args.loss} model from towers (--vision_model_name_or_path / "
            "--text_model_name_or_path)."
        )
    args.loss = own


def from_pretrained_towers(args) -> tuple[NdClipModel, NdClipProcessor]:
    model = NdClipModel.from_vision_text_pretrained(
        args.vision_model_name_or_path,
        args.text_model_name_or_path,
        projection_dim=args.projection_dim,
        projection_type=args.projection_type,
        vision_pooling=args.vision_pooling,
        text_pooling=args.text_pooling,
        contrastive_loss=args.loss or "softmax",
    )
    image_processor = AutoImageProcessor.from_pretrained(args.image_processor_name or args.vision_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.text_model_name_or_path)
    return model, NdClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ----- loaders, optimizer, schedule ---------------------------------------------------------------------------------


def prepare_training(args, accelerator, settings, model, processor, train_split, eval_split) -> TrainingRun:
    """Collators, loaders, optimizer and schedule, prepared by accelerate; the trackers; the run at step 0."""
    train_collator, eval_collator = build_collators(args, processor)
    # AdamW with decoupled weight decay; the schedule (below) is sized from the prepared training loader.
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, args.weight_decay), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Frozen towers: their features are computed once for the training and evaluation splits, then read from the
    # cache (ndclip.feature_cache).
    train_data = train_split
    train_samples = None if args.streaming else len(train_split)  # a stream has no length
    if args.streaming:  # a stream has no rows to cache features by: frozen towers run at every step
        eval_loaders = build_eval_loaders(eval_split, eval_collator, args) if eval_split is not None else {}
    elif (args.freeze_vision_model or args.freeze_text_model) and not args.disable_feature_cache:
        train_data, train_collator = build_feature_cache(
            model, train_split, train_collator, eval_collator, accelerator, args
        )
        eval_loaders = build_eval_feature_cache(model, eval_split, eval_collator, accelerator, args)
    else:
        eval_loaders = build_eval_loaders(eval_split, eval_collator, args)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()} or None  # None: nothing to evaluate
    if args.streaming:
        train_loader = make_stream_loader(train_split, train_collator, args)
    else:
        train_loader = accelerator.prepare(
            make_loader(train_data, train_loader_batch_size(args), train_collator, args, train=True)
        )
    batches_per_epoch = None if args.streaming else len(train_loader)
    schedule = build_schedule(args, optimizer, batches_per_epoch, train_samples, accelerator)
    lr_scheduler = accelerator.prepare(schedule)
    zero_shot = build_zero_shot(args, accelerator, eval_collator) if args.zero_shot_dataset else None
    if args.with_tracking:
        config = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()}
        accelerator.init_trackers("ndclip", {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    workers = train_split.num_workers if args.streaming else args.dataloader_num_workers
    evaluating = f"{len(eval_split)} images of `{args.eval_split}`" if eval_split is not None else "nothing"
    logger.info(
        f"training on {describe_training_data(train_split)} ({args.captions_per_image} captions per image, the "
        f"{args.loss} loss; {accelerator.num_processes} processes, global batch "
        f"{total_batch}, {workers} data loader workers per process), evaluating on {evaluating}; "
        f"{args.max_train_steps} optimizer steps"
    )
    return TrainingRun(
        accelerator=accelerator, args=args, model=model, processor=processor, optimizer=optimizer,
        lr_scheduler=lr_scheduler, train_loader=train_loader, train_collator=train_collator, eval_loaders=eval_loaders,
        history=MetricsHistory(args.output_dir, accelerator, tracking=args.with_tracking), settings=settings,
        train_samples=train_samples, zero_shot=zero_shot, stream=train_split if args.streaming else None,
        class_names=eval_split.features["label"].names if eval_split and "label" in eval_split.features else None,
    )  # fmt: skip


def build_collators(args, processor) -> tuple[CaptionCollator, CaptionCollator]:
    """Images are transformed on the fly in the collators: the training crop and caption are functions of
    (seed, epoch, image), the evaluation transform is the image processor's deterministic resize. A frozen vision
    tower sees un-augmented images, so that its output per image is fixed (and can be cached)."""
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    train_transform = (eval_image_transform if args.freeze_vision_model else train_image_transform)(image_processor)
    train_collator = CaptionCollator(
        tokenizer, args.max_seq_length, seed=args.seed, image_transform=train_transform,
        captions_per_image=args.captions_per_image,
    )  # fmt: skip
    eval_collator = CaptionCollator(
        tokenizer, args.max_seq_length, train=False, image_transform=eval_image_transform(image_processor)
    )
    return train_collator, eval_collator


def build_eval_loaders(eval_split, eval_collator, args) -> dict:
    """The evaluation loaders: `images`, each image with its first caption; `captions`, every caption."""
    batch = args.per_device_eval_batch_size
    captions = flatten_captions(eval_split)
    return {
        "images": make_loader(eval_split, batch, eval_collator, args),
        "captions": make_loader(captions, batch * 4, TextCollator(eval_collator.tokenizer, args.max_seq_length), args),
    }


def build_zero_shot(args, accelerator: Accelerator, eval_collator) -> tuple:
    """(prepared loader, class names) of `--zero_shot_dataset`, evaluated beside the retrieval metrics."""
    with accelerator.main_process_first():
        dataset, class_names = load_zero_shot_dataset(args)
    loader = make_loader(dataset, args.per_device_eval_batch_size, eval_collator, args)
    return accelerator.prepare(loader), class_names


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weight matrices only: not on biases, norms, embeddings' scale or `logit_scale`."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name.lower() or name.endswith("logit_scale"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_schedule(args, optimizer, batches_per_epoch: int | None, train_samples: int | None, accelerator: Accelerator):
    """Warmup, then `--lr_scheduler_type`, over the run's optimizer steps. `batches_per_epoch` is the prepared
    loader's length: the number of batches *this* process sees per epoch. Fills in `--max_train_steps` (from the
    epochs) and `--num_train_epochs` (from the steps). A stream (`batches_per_epoch` None) has no length: its
    schedule is `--max_train_steps` as given, and its epochs run until then."""
    if batches_per_epoch is not None:
        updates_per_epoch = math.ceil(batches_per_epoch / loader_batches_per_step(args))
        if updates_per_epoch == 0:
            raise SystemExit(
                f"the training split has {train_samples} usable images, fewer than one global batch of "
                f"{train_loader_batch_size(args)} x {accelerator.num_processes} processes"
            )
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * updates_per_epoch
        args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )


def make_loader(dataset, batch_size: int, collate_fn, args, train: bool = False) -> DataLoader:
    """A DataLoader that never draws from torch's global random generator, which dropout uses: its shuffling comes
    from accelerate's seedable sampler and its worker seeds from its own generator. Evaluations, feature caching and
    resumes then leave the training's random stream exactly where an uninterrupted run has it."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,  # the contrastive loss wants full batches, the same size on every process
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        generator=torch.Generator().manual_seed(args.seed),
    )


def build_feature_cache(model, train_split, train_collator, eval_collator, accelerator, args):
    """The training data and collator that feed frozen towers' cached features instead of running them."""
    data, collator, _ = cache_split_features(model, train_split, train_collator, eval_collator, accelerator, args)
    return data, collator


def build_eval_feature_cache(model, eval_split, eval_collator, accelerator, args) -> dict:
    """Evaluation loaders that feed frozen towers' cached features of the evaluation split (computed once, like the
    training split's): every evaluation then runs only what trains, not the frozen towers again."""
    data, collator, caption_features = cache_split_features(
        model, eval_split, eval_collator, eval_collator, accelerator, args
    )
    batch = args.per_device_eval_batch_size
    captions = flatten_captions(eval_split)
    if caption_features is None:
        text_collator = TextCollator(eval_collator.tokenizer, args.max_seq_length)
        caption_loader = make_loader(captions, batch * 4, text_collator, args)
    else:
        captions = captions.add_column("row", list(range(len(captions))))
        caption_loader = make_loader(captions, batch * 4, CachedCaptionCollator(caption_features), args)
    return {"images": make_loader(data, batch, collator, args), "captions": caption_loader}


def cache_split_features(model, split, collator, eval_collator, accelerator, args):
    """(data, collator, caption features) that feed `split` with frozen towers' features computed once."""
    batch_size = args.per_device_eval_batch_size
    image_features = caption_features = offsets = None
    if args.freeze_vision_model:
        loader = accelerator.prepare(make_loader(split, batch_size, eval_collator, args))
        image_features = compute_image_features(model, loader, accelerator, len(split))
    if args.freeze_text_model:
        text_collator = TextCollator(collator.tokenizer, args.max_seq_length)
        loader = accelerator.prepare(make_loader(flatten_captions(split), batch_size, text_collator, args))
        caption_features = compute_caption_features(model, loader, accelerator)
        offsets = caption_offsets([len(captions) for captions in split["captions"]])
    # Without the vision tower the images themselves are not needed: no picture is decoded after the cache is filled.
    columns = ["image_id", "captions"] + (["label"] if "label" in split.column_names else [])
    data = split.select_columns(columns) if image_features is not None else split
    logger.info(f"cached frozen tower features: images {tuple(getattr(image_features, 'shape', ()))}, "
                f"captions {tuple(getattr(caption_features, 'shape', ()))}")
    return data, CachedTowerCollator(collator, image_features, caption_features, offsets), caption_features


# ----- the training loop --------------------------------------------------------------------------------------------


def train(run: TrainingRun) -> None:
    """Epochs of optimizer steps until `--max_train_steps`, from the run's position (0, or a checkpoint's): an
    evaluation at the end of every epoch (or every `--eval_steps`), a checkpoint every `--checkpointing_steps`, and
    a last evaluation of the final weights if none evaluated them."""
    args = run.args
    progress = tqdm(
        total=args.max_train_steps, initial=run.completed_steps, desc="train",
        disable=not run.accelerator.is_local_main_process,
    )  # fmt: skip
    # A stream's epochs (passes over its shards) have no known length: they run until --max_train_steps.
    epochs = itertools.count(run.epoch) if run.stream is not None else range(run.epoch, args.num_train_epochs)
    with progress:  # closed also when a guard stops the run
        for epoch in epochs:
            if run.completed_steps >= args.max_train_steps:
                break  # resumed from the checkpoint of the last step
            run.epoch = epoch
            train_epoch(run, progress)
            if not args.eval_steps or run.completed_steps % args.eval_steps:
                run_evaluation(run)
            run.epoch, run.batches_in_epoch = epoch + 1, 0
            if args.checkpointing_steps == "epoch":
                save_training_checkpoint(run)
    if run.eval_results is None or run.eval_results["step"] != run.completed_steps:
        run_evaluation(run)  # no step trained, or resumed at the end


def train_epoch(run: TrainingRun, progress) -> None:
    """The rest of epoch `run.epoch`: a resumed run skips the batches its checkpoint had trained (a stream's loader
    starts where its checkpoint had got to, `ndclip.training.resume`)."""
    args, accelerator = run.args, run.accelerator
    set_train_mode(run.model, accelerator, args)
    run.train_loader.set_epoch(run.epoch)
    run.train_collator.set_epoch(run.epoch)
    skip = run.batches_in_epoch
    if run.stream is not None:  # an epoch of a stream ends on every process together
        batches = batches_of_every_process(run.train_loader, accelerator, loader_batches_per_step(args))
    else:
        batches = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    for batch in batches:
        loss, outputs = training_step(run, batch)
        run.batches_in_epoch += 1
        if not accelerator.sync_gradients:
            continue  # accumulating gradients: not an optimizer step yet
        run.completed_steps += 1
        progress.update(1)
        if run.completed_steps % args.logging_steps == 0 or run.completed_steps == args.max_train_steps:
            log_step(run, loss, outputs, progress)
        if args.eval_steps and run.completed_steps % args.eval_steps == 0:
            run_evaluation(run)
        if args.checkpointing_steps not in (None, "epoch") and run.completed_steps % int(args.checkpointing_steps) == 0:
            save_training_checkpoint(run)
        if run.completed_steps >= args.max_train_steps:
            break
    if run.stream is not None:
        end_stream_epoch(run, started_at=skip)


def end_stream_epoch(run: TrainingRun, started_at: int) -> None:
    """A stream's epoch is over (or the run): log it; a whole epoch without one global batch would loop for ever."""
    if started_at == 0 and run.batches_in_epoch == 0 and run.completed_steps < run.args.max_train_steps:
        raise SystemExit(
            f"the stream gave no batch in epoch {run.epoch}: it has fewer usable samples per process and DataLoader "
            f"worker than one batch of {train_loader_batch_size(run.args)} (x --gradient_accumulation_steps); see "
            "the skipped samples above, or use a smaller --per_device_train_batch_size or fewer workers"
        )
    log_stream_epoch(run)


def training_step(run: TrainingRun, batch: dict):
    """Forward, the loss over the global batch, backward; the optimizer and schedule step once every
    `--gradient_accumulation_steps` batches (with --contrastive_accumulation, every batch: it holds the k
    micro-batches). Returns (loss, model outputs)."""
    model, accelerator = run.model, run.accelerator
    inputs = {k: v for k, v in batch.items() if k not in ("image_ids", "labels")}
    with accelerator.accumulate(model):
        if run.args.contrastive_accumulation:
            loss, outputs = contrastive_accumulation_backward(run, inputs, batch["image_ids"])
        else:
            outputs = model(**inputs)
            loss = batch_loss(run, outputs)
            stop_if_loss_not_finite(run, loss, outputs, batch["image_ids"])
            accelerator.backward(loss)
        if accelerator.sync_gradients and run.args.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return loss, outputs


def batch_loss(run: TrainingRun, outputs) -> torch.Tensor:
    """The loss of `--loss` over the global batch (ndclip.losses), from the model's outputs (or the embeddings
    cached by --contrastive_accumulation)."""
    return global_loss(
        outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias, run.accelerator,
        kind=run.args.loss, captions_per_image=run.args.captions_per_image,
    )  # fmt: skip


def contrastive_accumulation_backward(run: TrainingRun, inputs: dict, image_ids: torch.Tensor):
    """--contrastive_accumulation (ndclip.gradient_cache): the batch's k micro-batches embedded without gradients, the
    loss over all of them (and every process's), the NaN guard before any backward, then each micro-batch again with
    gradients, from the random state of its first pass; DDP synchronises on the last one. Returns (loss, outputs)."""
    model, accelerator = run.model, run.accelerator
    micro_batches = split_batch(inputs, run.args.gradient_accumulation_steps)
    cache = embed_without_gradients(model, micro_batches, accelerator.device)
    loss = batch_loss(run, cache)
    stop_if_loss_not_finite(run, loss, cache, image_ids)
    backward_through_cache(
        model, micro_batches, cache, loss, backward=accelerator.backward, no_sync=accelerator.no_sync
    )
    return loss, cache


def set_train_mode(model, accelerator: Accelerator, args) -> None:
    """Training mode, except for frozen towers: they stay in eval mode (no dropout), as in LiT, so that their output
    for an input is fixed -- which is also what makes their features cacheable."""
    model.train()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if args.freeze_vision_model:
        unwrapped.vision_model.eval()
    if args.freeze_text_model:
        unwrapped.text_model.eval()


def log_step(run: TrainingRun, loss: torch.Tensor, outputs, progress) -> None:
    record = {
        "step": run.completed_steps,
        "epoch": run.epoch,
        "loss": loss.item(),
        "learning_rate": run.lr_scheduler.get_last_lr()[0],
        "logit_scale": outputs.logit_scale.item(),
    }
    progress.set_postfix(loss=f"{record['loss']:.4f}")
    run.history.log(record)


def run_evaluation(run: TrainingRun) -> None:
    """Evaluate the current weights (ndclip.evaluation), log the results and keep them as the run's latest. A
    --streaming run without an evaluation source evaluates nothing."""
    args = run.args
    if run.eval_loaders is None:
        return
    metrics = evaluate(
        run.model, run.eval_loaders, run.processor, run.accelerator, args,
        class_names=run.class_names, zero_shot=run.zero_shot,
    )  # fmt: skip
    run.eval_results = {**metrics, "split": args.eval_split, "step": run.completed_steps, "epoch": run.epoch}
    run.history.log(run.eval_results)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    logger.info(f"eval at step {run.completed_steps}: {summary}")
    if "zero_shot_accuracy" in metrics:
        logger.info(
            f"zero-shot accuracy {metrics['zero_shot_accuracy']:.3f} (chance level {metrics['zero_shot_chance']:.3f}; "
            f"prompts: {describe_templates(metrics['zero_shot_templates'])})"
        )


# ----- saving -------------------------------------------------------------------------------------------------------


def save_training_checkpoint(run: TrainingRun) -> None:
    """A checkpoint of the run's position (ndclip.training), with `--push_checkpoints` also pushed as a model."""
    args = run.args
    stop_if_parameters_not_finite(run)
    path = save_checkpoint(
        run.accelerator, args.output_dir, training_state(run), args.checkpoints_total_limit, stream_position(run)
    )
    logger.info(f"saved checkpoint {path}")
    if args.push_to_hub and args.push_checkpoints:
        save_hub_folder(run, eval_results=None)
        if run.accelerator.is_main_process:
            push_folder(args, f"checkpoint at step {run.completed_steps}")


def save_final_model(run: TrainingRun) -> None:
    """The Hub-ready folder (safetensors weights, config with auto_map, code files, processor, Inference Endpoints
    handler, card), the plots, and with `--push_to_hub` the push."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    stop_if_parameters_not_finite(run)
    save_hub_folder(run, run.eval_results)
    if accelerator.is_main_process:
        plot_history(args.output_dir)
        if args.push_to_hub:
            push_folder(args, f"NdCLIP trained for {run.completed_steps} steps")
    if args.with_tracking:
        accelerator.end_training()


def save_hub_folder(run: TrainingRun, eval_results: dict | None) -> None:
    """The Hub-ready folder. The results (`eval_results.json`, and the card that reports them) are written only after
    the weights they describe, so that a save that fails midway never leaves results beside other weights."""
    accelerator, args = run.accelerator, run.args
    # From the prepared model, on every process: under FSDP / DeepSpeed ZeRO-3 each holds a shard of the weights, and
    # get_state_dict is the collective that gathers them (the unwrapped model alone would save its own shard).
    state_dict = accelerator.get_state_dict(run.model)
    unwrapped = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        for stale in ("eval_results.json", "README.md"):
            (out / stale).unlink(missing_ok=True)
        try:
            unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
            run.processor.save_pretrained(args.output_dir)
            write_endpoint_files(args.output_dir)  # handler.py + requirements.txt: deployable as an Endpoint
            if eval_results is not None:
                write_text_atomically(out / "eval_results.json", json.dumps(eval_results, indent=2))
            write_card(args, unwrapped, eval_results)
        except SAVE_ERRORS as error:
            what = "final model" if eval_results is not None else "model to push"
            raise SystemExit(
                f"could not save the {what} in {out}: {error}. The disk is probably full (or the folder not "
                "writable); eval_results.json and the model card are written only after the weights, so the folder "
                f"has none. {intact_checkpoint_note(args.output_dir)}"
            ) from error


if __name__ == "__main__":
    try:
        main()
    except DatasetDownloadError as error:  # offline without local data: one clear message, not a traceback
        sys.exit(f"run_clip.py: {error}")
