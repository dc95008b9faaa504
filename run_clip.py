#!/usr/bin/env python
"""Contrastive training of NdCLIP with accelerate.

    accelerate launch run_clip.py --preset demo --output_dir outputs/demo           # offline, a few minutes on a CPU
    accelerate launch run_clip.py --output_dir outputs/flickr8k                     # ViT-B/16 + DistilBERT on jxie/flickr8k
    accelerate launch run_clip.py --data_dir ~/data/Flickr8k --output_dir outputs/f8k  # a local Flickr8k download

The same command trains on one CPU, one GPU, or many GPUs/nodes: the number of processes, mixed precision and
FSDP/DeepSpeed come from `accelerate config` / `accelerate launch` flags. The script reads top to bottom:
arguments, data, model, optimizer, training loop (with evaluation and checkpoints), final save.
"""

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import datasets
import torch
import torch.distributed.nn.functional  # all_gather with gradients
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin, set_seed
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, SchedulerType, get_scheduler

from ndclip.data import (
    CaptionCollator,
    DatasetDownloadError,
    TextCollator,
    eval_image_transform,
    flatten_captions,
    load_image_caption_dataset,
    train_image_transform,
    without_image_decoding,
)
from ndclip.feature_cache import (
    CachedCaptionCollator,
    CachedTowerCollator,
    caption_offsets,
    compute_caption_features,
    compute_image_features,
)
from modeling_ndclip import NdClipModel, ndclip_loss
from processing_ndclip import NdClipProcessor
from ndclip.metrics import chunked_contrastive_loss, retrieval_metrics, zero_shot_accuracy

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
TRAINING_STATE_FILE = "training_state.json"
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
    data.add_argument("--dataset_name", default="jxie/flickr8k")
    data.add_argument("--dataset_config_name")
    data.add_argument("--data_dir", help="A local Flickr8k folder (either layout) or an imagefolder.")
    data.add_argument("--train_file", help="csv, json or parquet with an image and caption(s) per row.")
    data.add_argument("--validation_file")
    data.add_argument("--image_column")
    data.add_argument("--caption_column")
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
    data.add_argument("--zero_shot_dataset", help="An image-classification dataset (Hub id or folder) for zero-shot.")
    data.add_argument("--zero_shot_split", default="test")
    data.add_argument("--zero_shot_template", default="a photo of a {}.")

    train = parser.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--learning_rate", type=float, default=5e-5)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--num_train_epochs", type=int, default=3)
    train.add_argument("--max_train_steps", type=int, help="Overrides the number of epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine", choices=list(SchedulerType))
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--seed", type=int, default=42)
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


def validate_args_for_model(args: argparse.Namespace, model: NdClipModel) -> None:
    """The flags whose range the model sets: a caption longer than the text tower's position embeddings would crash
    the step that draws it, mid-epoch."""
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if positions is not None and args.max_seq_length > positions:
        raise SystemExit(
            f"--max_seq_length {args.max_seq_length} is longer than the text tower, which has {positions} positions"
        )


# ----- model and data -----------------------------------------------------------------------------------------------


def build_model_and_processor(args, demo_dataset=None) -> tuple[NdClipModel, NdClipProcessor]:
    try:
        return _build_model_and_processor(args, demo_dataset)
    except OSError as error:  # transformers' "couldn't connect / not a local folder" errors are OSErrors
        names = args.model_name_or_path or f"{args.vision_model_name_or_path} / {args.text_model_name_or_path}"
        raise SystemExit(
            f"run_clip.py: could not load the model {names}: {str(error).splitlines()[0]}\n"
            "Without network, train offline with `--preset demo`, or point --model_name_or_path (a saved NdCLIP) or "
            "--vision_model_name_or_path / --text_model_name_or_path at local folders."
        ) from None


def _build_model_and_processor(args, demo_dataset=None) -> tuple[NdClipModel, NdClipProcessor]:
    if demo_dataset is not None:
        from ndclip.demo import demo_model_and_processor

        return demo_model_and_processor(demo_dataset, seed=args.seed, projection_type=args.projection_type)
    if args.model_name_or_path:
        return NdClipModel.from_pretrained(args.model_name_or_path), NdClipProcessor.from_pretrained(
            args.model_name_or_path
        )
    model = NdClipModel.from_vision_text_pretrained(
        args.vision_model_name_or_path,
        args.text_model_name_or_path,
        projection_dim=args.projection_dim,
        projection_type=args.projection_type,
        vision_pooling=args.vision_pooling,
        text_pooling=args.text_pooling,
    )
    image_processor = AutoImageProcessor.from_pretrained(args.image_processor_name or args.vision_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.text_model_name_or_path)
    return model, NdClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_data(args) -> datasets.DatasetDict:
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


def truncate(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


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


def default_dataloader_workers() -> int:
    """Worker processes that fit beside the training process on this process's share of the CPU cores: decoding and
    cropping the photos in workers overlaps it with the model's step (benchmarks/bench_end_to_end.py), but each
    worker takes a core, and the training process needs one to drive the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun, which accelerate launch runs
    return max(0, min(MAX_DEFAULT_DATALOADER_WORKERS, cores // local_processes - 1))


def set_train_mode(model, accelerator, args) -> None:
    """Training mode, except for frozen towers: they stay in eval mode (no dropout), as in LiT, so that their output
    for an input is fixed -- which is also what makes their features cacheable."""
    model.train()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if args.freeze_vision_model:
        unwrapped.vision_model.eval()
    if args.freeze_text_model:
        unwrapped.text_model.eval()


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
        caption_loader = make_loader(captions, batch * 4, TextCollator(eval_collator.tokenizer, args.max_seq_length), args)
    else:
        captions = captions.add_column("row", list(range(len(captions))))
        caption_loader = make_loader(captions, batch * 4, CachedCaptionCollator(caption_features), args)
    return {"images": make_loader(data, batch, collator, args), "captions": caption_loader}


def cache_split_features(model, split, collator, eval_collator, accelerator, args):
    """(data, collator, caption features) that feed `split` with frozen towers' features computed once."""
    batch_size = args.per_device_eval_batch_size
    image_features = caption_features = offsets = None
    model.eval()
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


# ----- the loss over the global batch -------------------------------------------------------------------------------


def gather_with_grad(tensor: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """All processes' rows, in process order, with gradients flowing back to each process's own rows.

    `torch.distributed.nn.functional.all_gather` sums the gradients of every copy in its backward; each process
    computes the same global loss, so its rows receive `world_size` times their gradient, which DDP's gradient
    averaging divides back out: N processes x batch b train exactly like 1 process x batch N*b.
    """
    if accelerator.num_processes == 1:
        return tensor
    return torch.cat(torch.distributed.nn.functional.all_gather(tensor.contiguous()), dim=0)


def global_contrastive_loss(outputs, accelerator: Accelerator) -> torch.Tensor:
    image_embeds = gather_with_grad(outputs.image_embeds.float(), accelerator)
    text_embeds = gather_with_grad(outputs.text_embeds.float(), accelerator)
    logits_per_text = outputs.logit_scale.float() * text_embeds @ image_embeds.t()
    return ndclip_loss(logits_per_text)


# ----- stopping a run whose loss or weights are no longer finite ----------------------------------------------------


def stop_if_loss_not_finite(loss, outputs, batch, accelerator, args, history, step: int, epoch: int) -> None:
    """Stop every process at the first NaN or infinite training loss, before its backward pass and optimizer step
    carry it into the weights.

    Every process computes the same global loss, but one that stopped alone would leave the others waiting forever in
    their next collective: the verdict is reduced across processes, so it is the same everywhere by construction. The
    embeddings of each sample then tell weights that diverged (every sample non-finite) from a few samples that reach
    a bad weight or overflow."""
    if not accelerator.reduce((~torch.isfinite(loss.detach())).float(), reduction="sum").item():
        return
    finite_rows = torch.isfinite(outputs.image_embeds).all(-1) & torch.isfinite(outputs.text_embeds).all(-1)
    finite_rows, image_ids = accelerator.gather((finite_rows.long(), batch["image_ids"]))
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
    problem = f"the training loss is {value} at step {step} (epoch {epoch}); {where}"
    raise stop_training(accelerator, args, history, step, problem)


def stop_if_parameters_not_finite(model, accelerator, args, history, step: int) -> None:
    """Refuse to save or push weights that hold NaN or infinity: a non-finite gradient makes them so although the loss
    of its step was finite. Each process checks its own parameters (its shards under FSDP; under DeepSpeed ZeRO-3 its
    partition, kept in `ds_tensor`), and the count is reduced, so that every process stops together."""
    params = list(accelerator.unwrap_model(model, keep_torch_compile=False).named_parameters())
    finite = torch.stack([torch.isfinite(getattr(param, "ds_tensor", param)).all() for _, param in params]).tolist()
    bad = [name for (name, _), ok in zip(params, finite) if not ok]
    if accelerator.reduce(torch.tensor(len(bad), device=accelerator.device), reduction="sum").item():
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") or "another process's shard"
        problem = f"the weights after step {step} hold NaN or infinity, in {names}"
        raise stop_training(accelerator, args, history, step, problem)


def stop_training(accelerator, args, history, step: int, problem: str) -> SystemExit:
    """Record why the run stopped (metrics.jsonl, trackers) and return the exit that says so and what to try."""
    history.log({"step": step, "stopped": problem}, args.with_tracking)
    if args.with_tracking:
        accelerator.end_training()
    saved = checkpoint_dirs(args.output_dir)
    kept = f"the checkpoints saved before are untouched, the newest {saved[-1]}" if saved else "no checkpoint was saved"
    return SystemExit(
        f"run_clip.py: {problem}. Training stopped: these weights are neither saved nor pushed ({kept}). Try a "
        f"lower --learning_rate (this run: {args.learning_rate:g}), warmup (--num_warmup_steps), gradient clipping "
        f"(--max_grad_norm, this run: {args.max_grad_norm:g}), bf16 rather than fp16 mixed precision; where only some "
        "samples are non-finite, check those samples and the weights they reach."
    )


# ----- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_eval_split(model, image_loader, caption_loader, accelerator) -> dict[str, torch.Tensor]:
    """Embeddings of every evaluation image (with its first caption, for the eval loss) and of every caption."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "first", "image_ids", "labels", "texts", "text_ids")}
    logit_scale = None
    for batch in image_loader:
        out = model(**{k: v for k, v in batch.items() if k not in ("image_ids", "labels")})
        logit_scale = out.logit_scale
        gathered = accelerator.gather_for_metrics((out.image_embeds.float(), out.text_embeds.float(), batch["image_ids"]))
        for key, value in zip(("images", "first", "image_ids"), gathered):
            parts[key].append(value)
        if "labels" in batch:
            parts["labels"].append(accelerator.gather_for_metrics(batch["labels"]))
    for batch in caption_loader:
        out = model(**{k: v for k, v in batch.items() if k != "image_ids"})
        texts, ids = accelerator.gather_for_metrics((out.text_embeds.float(), batch["image_ids"]))
        parts["texts"].append(texts)
        parts["text_ids"].append(ids)
    embeddings = {k: torch.cat(v).cpu() for k, v in parts.items() if v}
    embeddings["logit_scale"] = logit_scale.float().cpu()
    return embeddings


@torch.no_grad()
def embed_class_prompts(model, tokenizer, class_names: list[str], template: str, device) -> torch.Tensor:
    prompts = tokenizer([template.format(name) for name in class_names], padding=True, return_tensors="pt").to(device)
    return model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"]).text_embeds.float().cpu()


def evaluate(model, loaders, processor, accelerator, args, class_names=None, zero_shot=None) -> dict:
    model.eval()
    emb = embed_eval_split(model, loaders["images"], loaders["captions"], accelerator)
    metrics = retrieval_metrics(emb["images"], emb["texts"], emb["text_ids"], image_ids=emb["image_ids"])
    metrics["eval_loss"] = chunked_contrastive_loss(
        emb["images"], emb["first"], emb["logit_scale"], args.per_device_eval_batch_size
    )
    if class_names and "labels" in emb:
        prompts = embed_class_prompts(model, processor.tokenizer, class_names, args.zero_shot_template, accelerator.device)
        metrics["zero_shot_accuracy"] = zero_shot_accuracy(emb["images"], emb["labels"], prompts)
        metrics["zero_shot_chance"] = 1.0 / len(class_names)
    if zero_shot is not None:
        metrics.update(evaluate_zero_shot_dataset(model, zero_shot, processor, accelerator, args))
    set_train_mode(model, accelerator, args)
    return metrics


def load_zero_shot_dataset(args):
    """`--zero_shot_dataset`: any image-classification set with label names (a Hub id, or a local imagefolder)."""
    if os.path.isdir(args.zero_shot_dataset):
        dataset = datasets.load_dataset("imagefolder", data_dir=args.zero_shot_dataset, split="train")
    else:
        dataset = datasets.load_dataset(args.zero_shot_dataset, split=args.zero_shot_split)
    label_columns = [n for n, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)]
    image_columns = [n for n, f in dataset.features.items() if isinstance(f, datasets.Image)]
    if not label_columns or not image_columns:
        raise SystemExit(
            f"--zero_shot_dataset {args.zero_shot_dataset!r} needs an Image column and a ClassLabel column with label "
            f"names; it has {dict(dataset.features)}"
        )
    dataset = dataset.rename_columns({image_columns[0]: "image", label_columns[0]: "label"})
    dataset = dataset.select_columns(["image", "label"])
    return dataset, dataset.features["label"].names


@torch.no_grad()
def evaluate_zero_shot_dataset(model, zero_shot, processor, accelerator, args) -> dict:
    loader, names = zero_shot
    images, labels = [], []
    for batch in loader:
        out = model(pixel_values=batch["pixel_values"])
        embeds, batch_labels = accelerator.gather_for_metrics((out.image_embeds.float(), batch["labels"]))
        images.append(embeds)
        labels.append(batch_labels)
    prompts = embed_class_prompts(model, processor.tokenizer, names, args.zero_shot_template, accelerator.device)
    return {
        "zero_shot_accuracy": zero_shot_accuracy(torch.cat(images).cpu(), torch.cat(labels).cpu(), prompts),
        "zero_shot_chance": 1.0 / len(names),
        "zero_shot_dataset": args.zero_shot_dataset,
    }


# ----- checkpoints that survive a crash -----------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first. A save in progress lives in a `.tmp` folder and is never listed."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator: Accelerator, args, state: dict) -> Path:
    """Save the full training state atomically: write into a temporary folder, then rename it into place.

    accelerate's own `total_limit` deletes old checkpoints *before* writing the new one; here the old ones are only
    pruned once the new one is complete, so a crash during a save never loses the last good checkpoint. The state
    lists every file with its size, so that a checkpoint damaged afterwards is recognised (`checkpoint_problem`).
    """
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['completed_steps']}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
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
            f"writable); the partial save was removed. {intact_checkpoint_note(args.output_dir, exclude=final)}"
        ) from error
    if accelerator.is_main_process:
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


# What a failed write raises: OSError (ENOSPC, EFBIG, ...), torch's `unexpected pos ... vs ...` RuntimeError, and
# safetensors' own error type.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


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


# What a checkpoint's training_state.json holds beside accelerate's state (`training_state` in main).
TRAINING_STATE_KEYS = (
    "completed_steps", "epoch", "batches_in_epoch", "metrics_records", "eval_results", "settings", "train_samples",
    "files",
)  # fmt: skip


def checkpoint_problem(path: Path, settings: dict | None = None) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed, or None. Its training_state.json must parse and hold every
    key; each file it lists must be there, with the size it was saved with (a safetensors header must parse); and,
    given `settings`, it must be a checkpoint of a run with these settings."""
    if not path.is_dir():
        return "no such folder"
    try:
        state = json.loads((path / TRAINING_STATE_FILE).read_text())
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


def resolve_checkpoint(args, settings: dict) -> Path | None:
    """The checkpoint to resume from, validated. `latest` is this run's newest complete checkpoint: a damaged newer
    one is skipped with a warning that names it. An explicit folder that cannot be resumed is an error."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        for path in reversed(checkpoint_dirs(args.output_dir)):
            problem = checkpoint_problem(path, settings)
            if problem is None:
                return path
            logger.warning(f"skipping checkpoint {path}: {problem}")
        logger.info(f"no complete checkpoint of this run in {args.output_dir}: training from the start")
        return None
    path = Path(args.resume_from_checkpoint)
    problem = checkpoint_problem(path, settings)
    if problem is not None:
        raise SystemExit(f"--resume_from_checkpoint {path}: cannot resume: {problem}")
    return path


def check_resumable_data(checkpoint: Path, train_samples: int) -> None:
    """The checkpoint's place in its epoch is a number of batches: it means the same samples only on the same data."""
    state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
    if state["train_samples"] != train_samples:
        raise SystemExit(
            f"cannot resume {checkpoint}: its run trained on {state['train_samples']} images of the training split, "
            f"which now has {train_samples} usable images. The data changed, so the batches of its epoch would differ "
            "from those already trained (samples trained twice or skipped). Train a new run in another --output_dir."
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
    "seed": "the shuffled order of the epoch, the held-out split and the augmentations would change: samples of the "
    "epoch would be trained twice or not at all",
    "max_train_steps": "the learning-rate schedule is sized for the run's number of steps",
    "num_train_epochs": "the learning-rate schedule is sized for the run's number of steps",
}
# What a run writes into its output folder: `--overwrite_output_dir` deletes these, and only these.
RUN_ARTIFACTS = [
    RUN_FILE, "checkpoints", "runs", "metrics.jsonl", "eval_results.json", "README.md", "loss.png",
    "retrieval_recall.png", "model*.safetensors", "model.safetensors.index.json",
]  # fmt: skip


def run_settings(args, num_processes: int) -> dict:
    """What makes a run this run: every argument except `RESUMABLE_CHANGES`, as given, and the number of processes
    (as JSON would hold them, so that recorded and current settings compare equal)."""
    settings = {k: getattr(v, "value", v) for k, v in vars(args).items() if k not in RESUMABLE_CHANGES}
    return {**json.loads(json.dumps(settings, default=str)), "num_processes": num_processes}


def settings_changes(saved: dict, now: dict) -> list[str]:
    """Each setting that differs, as `name: saved → now (what resuming would do)`."""
    return [
        f"{key}: {saved.get(key)} → {now.get(key)} "
        f"({CHANGE_EFFECTS.get(key, 'the run would continue with other settings than it was trained with')})"
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key) != now.get(key)
    ]


def prepare_output_dir(args, settings: dict, accelerator: Accelerator) -> None:
    """Before anything is loaded: the output folder must be new (or empty), this run's when resuming, or cleared with
    --overwrite_output_dir, and writable. The run's settings are recorded there, to recognise it when resuming."""
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


# ----- logging ------------------------------------------------------------------------------------------------------


class MetricsHistory:
    """`metrics.jsonl` in the output folder: one line per logged training step or evaluation (main process only).
    `records` counts its lines, so that a checkpoint can record how far the history had got."""

    def __init__(self, output_dir: str, accelerator: Accelerator):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.records = 0

    def keep_first(self, records: int) -> None:
        """On resume, forget what was logged after the checkpoint -- by a killed run, perhaps ending in a half-written
        line, or the evaluation that ended a finished run: the resumed run logs those steps again."""
        if self.accelerator.is_main_process and not self.path.exists():
            records = 0  # resumed from another folder's checkpoint: this folder's history starts here
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

    def log(self, record: dict, tracking: bool) -> None:
        if tracking:
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


# ----- main ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)

    # accelerate: processes, devices and mixed precision come from `accelerate launch`. A seedable sampler makes the
    # shuffling a function of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
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
    settings = run_settings(args, accelerator.num_processes)  # before main fills in defaults of its own
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_dataloader_workers()
    args.dataloader_pin_memory = accelerator.device.type == "cuda"  # page-locked batches copy to the GPU async
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown ours
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    # Output folder and checkpoint: checked before anything is loaded, so that a mistake there fails fast.
    prepare_output_dir(args, settings, accelerator)
    checkpoint = resolve_checkpoint(args, settings)

    # Data: loaded and validated once (the main process first, the others then read datasets' cache).
    with accelerator.main_process_first():
        raw = load_data(args)
    for split, reasons in getattr(raw, "dropped_samples", {}).items():
        if reasons:
            logger.warning(f"skipped unusable samples in `{split}`: {dict(reasons)}")
    if args.eval_split not in raw:
        raise SystemExit(f"--eval_split {args.eval_split!r} is not in the data set (splits: {', '.join(raw)})")
    # Training images stay encoded until the training transform decodes them: a JPEG much larger than the model's
    # input is then decoded at reduced size (image_caption_data.DecodeImage).
    train_split = without_image_decoding(truncate(raw["train"], args.max_train_samples))
    eval_split = truncate(raw[args.eval_split], args.max_eval_samples)
    class_names = eval_split.features["label"].names if "label" in eval_split.features else None
    if checkpoint is not None:
        check_resumable_data(checkpoint, len(train_split))

    # Model
    model, processor = build_model_and_processor(args, demo_dataset=raw if args.preset == "demo" else None)
    validate_args_for_model(args, model)
    if args.freeze_vision_model:
        model.lock_image_tower()
    if args.freeze_text_model:
        model.lock_text_tower()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()

    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    # Images are transformed on the fly in the collators: the training crop and caption are functions of
    # (seed, epoch, image), the evaluation transform is the image processor's deterministic resize. A frozen vision
    # tower sees un-augmented images, so that its output per image is fixed (and can be cached).
    train_transform = (eval_image_transform if args.freeze_vision_model else train_image_transform)(image_processor)
    train_collator = CaptionCollator(tokenizer, args.max_seq_length, seed=args.seed, image_transform=train_transform)
    eval_collator = CaptionCollator(
        tokenizer, args.max_seq_length, train=False, image_transform=eval_image_transform(image_processor)
    )
    eval_batch = args.per_device_eval_batch_size
    eval_loaders = {
        "images": make_loader(eval_split, eval_batch, eval_collator, args),
        "captions": make_loader(
            flatten_captions(eval_split), eval_batch * 4, TextCollator(tokenizer, args.max_seq_length), args
        ),
    }
    zero_shot = None
    if args.zero_shot_dataset:
        with accelerator.main_process_first():
            zs_data, zs_names = load_zero_shot_dataset(args)
        zero_shot = (make_loader(zs_data, eval_batch, eval_collator, args), zs_names)

    # Optimizer and schedule: AdamW with decoupled weight decay, warmup, then the chosen schedule. The schedule is
    # sized from the prepared loader, whose length is the number of batches *this* process sees per epoch.
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, args.weight_decay), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loaders = {k: accelerator.prepare(v) for k, v in eval_loaders.items()}

    # Frozen towers: their features for the whole training split are computed once, then training reads the cache.
    train_data, collate = train_split, train_collator
    if (args.freeze_vision_model or args.freeze_text_model) and not args.disable_feature_cache:
        train_data, collate = build_feature_cache(model, train_split, train_collator, eval_collator, accelerator, args)
        eval_loaders = {
            k: accelerator.prepare(v)
            for k, v in build_eval_feature_cache(model, eval_split, eval_collator, accelerator, args).items()
        }
    train_loader = accelerator.prepare(
        make_loader(train_data, args.per_device_train_batch_size, collate, args, train=True)
    )
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    if updates_per_epoch == 0:
        raise SystemExit(
            f"the training split has {len(train_split)} usable images, fewer than one global batch of "
            f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes"
        )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = accelerator.prepare(
        get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps,
            num_training_steps=args.max_train_steps,
        )
    )
    if zero_shot is not None:
        zero_shot = (accelerator.prepare(zero_shot[0]), zero_shot[1])

    if args.with_tracking:
        config = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()}
        accelerator.init_trackers("ndclip", {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})

    history = MetricsHistory(args.output_dir, accelerator)
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"training on {len(train_split)} images ({accelerator.num_processes} processes, global batch {total_batch}, "
        f"{args.dataloader_num_workers} data loader workers per process), evaluating on {len(eval_split)} images of "
        f"`{args.eval_split}`; {args.max_train_steps} optimizer steps"
    )

    # Resume: weights, optimizer, schedule and random states from the checkpoint; the data position, the latest
    # evaluation and the length of metrics.jsonl from its state.
    completed_steps, start_epoch, skip_batches, eval_results = 0, 0, 0, None
    run = {"settings": settings, "train_samples": len(train_split)}
    if checkpoint is not None:
        state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
        accelerator.load_state(str(checkpoint))
        completed_steps, start_epoch, skip_batches = state["completed_steps"], state["epoch"], state["batches_in_epoch"]
        eval_results = state["eval_results"]
        logger.info(f"resumed from {checkpoint} at step {completed_steps} (epoch {start_epoch}, batch {skip_batches})")
    history.keep_first(state["metrics_records"] if checkpoint is not None else 0)

    progress = tqdm(
        range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process, desc="train"
    )
    epoch = start_epoch  # the epoch a run with no step left to train (max_train_steps reached, or 0) evaluates in
    for epoch in range(start_epoch, args.num_train_epochs):
        if completed_steps >= args.max_train_steps:
            break  # resumed from the checkpoint of the last step
        set_train_mode(model, accelerator, args)
        train_loader.set_epoch(epoch)
        collate.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        batches_in_epoch, skip_batches = skip_batches, 0
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**{k: v for k, v in batch.items() if k not in ("image_ids", "labels")})
                loss = global_contrastive_loss(outputs, accelerator)
                stop_if_loss_not_finite(loss, outputs, batch, accelerator, args, history, completed_steps + 1, epoch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    lr_scheduler.step()
                optimizer.zero_grad()
            batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                record = {
                    "step": completed_steps,
                    "epoch": epoch,
                    "loss": loss.item(),
                    "learning_rate": lr_scheduler.get_last_lr()[0],
                    "logit_scale": outputs.logit_scale.item(),
                }
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                history.log(record, args.with_tracking)
            if args.eval_steps and completed_steps % args.eval_steps == 0:
                eval_results = run_evaluation(model, eval_loaders, processor, accelerator, args, history, completed_steps, epoch, class_names, zero_shot)
            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                state = training_state(run, history, eval_results, completed_steps, epoch, batches_in_epoch)
                save_training_checkpoint(accelerator, args, model, processor, history, state)
            if completed_steps >= args.max_train_steps:
                break
        if not args.eval_steps or completed_steps % args.eval_steps:
            eval_results = run_evaluation(model, eval_loaders, processor, accelerator, args, history, completed_steps, epoch, class_names, zero_shot)
        if args.checkpointing_steps == "epoch":
            state = training_state(run, history, eval_results, completed_steps, epoch + 1, 0)
            save_training_checkpoint(accelerator, args, model, processor, history, state)
        if completed_steps >= args.max_train_steps:
            break
    progress.close()
    if eval_results is None or eval_results["step"] != completed_steps:  # no step trained, or resumed at the end
        eval_results = run_evaluation(model, eval_loaders, processor, accelerator, args, history, completed_steps, epoch, class_names, zero_shot)

    # Final save: the Hub-ready folder (safetensors weights, config with auto_map, code files, processor, card).
    accelerator.wait_for_everyone()
    stop_if_parameters_not_finite(model, accelerator, args, history, completed_steps)
    save_hub_folder(accelerator, args, model, processor, eval_results)
    if accelerator.is_main_process:
        plot_history(args.output_dir)
        if args.push_to_hub:
            push_folder(args, f"NdCLIP trained for {completed_steps} steps")
    if args.with_tracking:
        accelerator.end_training()
    return eval_results


def run_evaluation(model, loaders, processor, accelerator, args, history, step, epoch, class_names, zero_shot) -> dict:
    metrics = evaluate(model, loaders, processor, accelerator, args, class_names=class_names, zero_shot=zero_shot)
    results = {**metrics, "split": args.eval_split, "step": step, "epoch": epoch}
    history.log(results, args.with_tracking)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    logger.info(f"eval at step {step}: {summary}")
    if "zero_shot_accuracy" in metrics:
        logger.info(
            f"zero-shot accuracy {metrics['zero_shot_accuracy']:.3f} (chance level {metrics['zero_shot_chance']:.3f})"
        )
    return results


def training_state(run: dict, history, eval_results, step: int, epoch: int, batches_in_epoch: int) -> dict:
    """What a checkpoint records beside accelerate's state (`TRAINING_STATE_KEYS`): the position in the data, the
    latest evaluation and the length of metrics.jsonl (so that a resumed run neither repeats nor loses any), and the
    run it belongs to."""
    return {
        "completed_steps": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
        "metrics_records": history.records, "eval_results": eval_results, **run,
    }  # fmt: skip


def save_training_checkpoint(accelerator, args, model, processor, history, state: dict) -> None:
    stop_if_parameters_not_finite(model, accelerator, args, history, state["completed_steps"])
    path = save_checkpoint(accelerator, args, state)
    logger.info(f"saved checkpoint {path}")
    if args.push_to_hub and args.push_checkpoints:
        save_hub_folder(accelerator, args, model, processor, None)
        if accelerator.is_main_process:
            push_folder(args, f"checkpoint at step {state['completed_steps']}")


def save_hub_folder(accelerator, args, model, processor, eval_results) -> None:
    """The Hub-ready folder. The results (`eval_results.json`, and the card that reports them) are written only after
    the weights they describe, so that a save that fails midway never leaves results beside other weights."""
    # From the prepared model, on every process: under FSDP / DeepSpeed ZeRO-3 each holds a shard of the weights, and
    # get_state_dict is the collective that gathers them (the unwrapped model alone would save its own shard).
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        for stale in ("eval_results.json", "README.md"):
            (out / stale).unlink(missing_ok=True)
        try:
            unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
            processor.save_pretrained(args.output_dir)
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


def write_card(args, model, eval_results) -> None:
    from ndclip.hub import is_hub_dataset_id, write_model_card

    # The card's metadata names Hub datasets only; the demo's data and local files are described in its body.
    local = args.data_dir or args.train_file or (None if is_hub_dataset_id(args.dataset_name) else args.dataset_name)
    if args.preset == "demo" and not (args.data_dir or args.train_file):
        dataset, training_data = None, "the offline demo's generated data"
    else:
        dataset, training_data = (None, f"local data: {Path(local).name}") if local else (args.dataset_name, None)
    training_args = {
        k: v
        for k, v in vars(args).items()
        if k in {
            "learning_rate", "weight_decay", "num_train_epochs", "max_train_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "lr_scheduler_type", "num_warmup_steps", "seed", "max_seq_length",
            "freeze_vision_model", "freeze_text_model", "preset",
        }
    }
    training_args["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    base_models = None if args.preset == "demo" or args.model_name_or_path else [
        args.vision_model_name_or_path,
        args.text_model_name_or_path,
    ]
    write_model_card(
        args.output_dir,
        model,
        eval_results=eval_results,
        training_args=training_args,
        dataset_name=dataset,
        training_data=training_data,
        base_models=base_models,
        repo_id=args.hub_model_id,
    )


# What stays local when the output folder is pushed: resumable training state, the run's settings (local paths) and
# tracker logs.
HUB_IGNORE_PATTERNS = ["checkpoints/*", "runs/*", RUN_FILE]


def push_folder(args, message: str) -> None:
    """Upload the Hub-ready output folder (not the training checkpoints or tracker logs)."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True)
    api.upload_folder(
        repo_id=args.hub_model_id,
        folder_path=args.output_dir,
        commit_message=message,
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )


if __name__ == "__main__":
    try:
        main()
    except DatasetDownloadError as error:  # offline without local data: one clear message, not a traceback
        sys.exit(f"run_clip.py: {error}")
