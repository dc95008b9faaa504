"""The evaluation of a training run: retrieval recall@K and median ranks (the `image_text_retrieval` evaluate
metric), the evaluation loss, and zero-shot accuracy on the evaluation split's labels and on `--zero_shot_dataset`.

Every process embeds its shard of the data and the shards are gathered (`ndclip.embedding.embed`), so every process
computes the same metrics, whatever the number of processes.
"""

import os

import datasets
import torch

from ndclip.embedding import IMAGE_INPUTS, embed
from ndclip.metrics import chunked_contrastive_loss, load_retrieval_metric, zero_shot_accuracy
from ndclip.prompts import class_embeddings

PROMPT_BATCH_SIZE = 256  # zero-shot prompts embedded at once (classes x templates of them in all)


def evaluate(model, loaders, processor, accelerator, args, class_names=None, zero_shot=None) -> dict:
    """Metrics of `model` on the evaluation loaders, prepared by `accelerator`: `loaders["images"]` yields images
    with their first caption (and `labels` when the split has them), `loaders["captions"]` every caption.

    `args` gives `per_device_eval_batch_size` (the batch size of the evaluation loss), the zero-shot prompts
    (`zero_shot_template`, or the ensemble `zero_shot_templates` when set: `zero_shot_templates_of`) and
    `zero_shot_dataset`; `class_names` are the split's label names (zero-shot accuracy on the split itself) and
    `zero_shot` the (loader, class names) of `load_zero_shot_dataset`. Zero-shot results list the templates used
    (`zero_shot_templates`). The model's modes are left as they were.
    """
    image_outputs, image_fields = ["image_embeds", "text_embeds"], ["image_ids", "labels"]
    images = embed(model, loaders["images"], image_outputs, fields=image_fields, accelerator=accelerator)
    captions = embed(model, loaders["captions"], ["text_embeds"], fields=["image_ids"], accelerator=accelerator)
    metrics = load_retrieval_metric().compute(
        predictions=captions["text_embeds"].numpy(),
        references=captions["image_ids"].numpy(),
        image_embeds=images["image_embeds"],
        image_ids=images["image_ids"],
    )
    # Each image with its first caption, re-batched at a fixed size: the same loss on any number of processes. It is
    # the model's own loss (softmax or sigmoid), comparable with its training loss.
    unwrapped = accelerator.unwrap_model(model)
    logit_scale = unwrapped.clamped_logit_scale().detach().float().cpu()
    logit_bias = unwrapped.logit_bias.detach().float().cpu() if unwrapped.logit_bias is not None else None
    metrics["eval_loss"] = chunked_contrastive_loss(
        images["image_embeds"], images["text_embeds"], logit_scale, args.per_device_eval_batch_size,
        logit_bias=logit_bias, kind=unwrapped.config.contrastive_loss,
    )  # fmt: skip
    if class_names and "labels" in images:
        templates = zero_shot_templates_of(args)
        prompts = embed_class_prompts(model, processor.tokenizer, class_names, templates, accelerator.device)
        metrics["zero_shot_accuracy"] = zero_shot_accuracy(images["image_embeds"], images["labels"], prompts)
        metrics["zero_shot_chance"] = 1.0 / len(class_names)
        metrics["zero_shot_templates"] = templates
    if zero_shot is not None:
        metrics.update(evaluate_zero_shot_dataset(model, zero_shot, processor, accelerator, args))
    return metrics


def zero_shot_templates_of(args) -> list[str]:
    """The zero-shot templates of a run: `--zero_shot_templates` (already read from its file by the argument
    parser) when given, which overrides `--zero_shot_template`; else that one template."""
    return list(getattr(args, "zero_shot_templates", None) or [args.zero_shot_template])


def embed_class_prompts(
    model, tokenizer, class_names: list[str], templates: list[str], device, batch_size: int = PROMPT_BATCH_SIZE
) -> torch.Tensor:
    """`[C, D]` class embeddings of `templates` filled with each class name (averaged over an ensemble:
    `ndclip.prompts.class_embeddings`); every process embeds them all, in batches of `batch_size` prompts."""

    def embed_texts(texts: list[str]) -> torch.Tensor:
        batches = (
            tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt").to(device)
            for start in range(0, len(texts), batch_size)
        )
        return embed(model, batches, ["text_embeds"])["text_embeds"]

    return class_embeddings(embed_texts, class_names, templates)


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


def evaluate_zero_shot_dataset(model, zero_shot, processor, accelerator, args) -> dict:
    """Zero-shot accuracy on `--zero_shot_dataset`: `zero_shot` is its (prepared loader, class names)."""
    loader, names = zero_shot
    images = embed(model, loader, ["image_embeds"], fields=["labels"], inputs=IMAGE_INPUTS, accelerator=accelerator)
    templates = zero_shot_templates_of(args)
    prompts = embed_class_prompts(model, processor.tokenizer, names, templates, accelerator.device)
    return {
        "zero_shot_accuracy": zero_shot_accuracy(images["image_embeds"], images["labels"], prompts),
        "zero_shot_chance": 1.0 / len(names),
        "zero_shot_dataset": args.zero_shot_dataset,
        "zero_shot_templates": templates,
    }
