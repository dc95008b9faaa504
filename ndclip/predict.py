"""Zero-shot classification and caption matching on a folder of new images with a trained NdCLIP.

    ndclip predict --model outputs/ndclip --images photos/ --labels dog,cat,car --output_dir predictions/
    ndclip predict --model user/ndclip-flickr8k --images photos/ --labels_file labels.txt \
        --captions captions.txt --top_k 3 --output_dir predictions/

For every image: the top-k labels with their probabilities and, with `--captions`, the best-matching captions with
their cosine similarity. Each label is written into `--template`, or into every template of the ensemble `--templates`
(a file, or `builtin`), whose text embeddings are averaged per label; the probabilities are the model's
`logits_to_probabilities` of its logits over the labels: their softmax, as in the `zero-shot-image-classification`
pipeline, for a model trained with the softmax loss, a sigmoid per label for a sigmoid model. Prints a table, writes
`predictions.json` and `contact_sheet.png` (each thumbnail with its top labels) to `--output_dir`. Images that cannot
be decoded (truncated files, decompression bombs) are skipped, counted and listed in `predictions.json`.
"""

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ndclip.inference import (
    BadInputError,
    contact_sheet,
    embed_images,
    embed_texts,
    find_images,
    load_ndclip,
    log_unreadable,
    positive_int,
)
from ndclip.prompts import BUILTIN, DEFAULT_TEMPLATE, class_embeddings, template_argument, templates_argument

logger = logging.getLogger(__name__)


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"file {path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_labels(labels: str | None = None, labels_file: str | Path | None = None) -> list[str]:
    """The candidate labels: those of the comma-separated `labels`, then the lines of `labels_file`.

    Raises `BadInputError` when there is none or when a label appears twice (its probability would be split).
    """
    parsed = [label.strip() for label in (labels or "").split(",") if label.strip()]
    if labels_file is not None:
        parsed += read_lines(labels_file)
    if not parsed:
        raise BadInputError("the label list is empty: pass --labels a,b,c or --labels_file with one label per line")
    duplicates = sorted({label for label in parsed if parsed.count(label) > 1})
    if duplicates:
        raise BadInputError(f"the label list has duplicates: {', '.join(map(repr, duplicates))}")
    return parsed


def top_matches(scores: torch.Tensor, names: Sequence[str], key: str, top_k: int) -> list[list[dict]]:
    """For each row of `scores` `[images, names]`, the `top_k` best names with their scores, best first."""
    values, indices = scores.topk(min(top_k, len(names)), dim=-1)
    return [
        [{key: names[i], "score": round(v, 6)} for v, i in zip(row_values.tolist(), row_indices.tolist())]
        for row_values, row_indices in zip(values, indices)
    ]


def predict(
    model,
    processor,
    images: Sequence,
    labels: Sequence[str],
    template: str | Sequence[str] = DEFAULT_TEMPLATE,
    captions: Sequence[str] | None = None,
    top_k: int = 3,
    batch_size: int = 32,
) -> tuple[list[dict], list[dict]]:
    """Predictions for the images (paths or PIL images) that can be read, and the images skipped as unreadable.

    Each prediction holds `image`, `labels`, its top-k labels with probabilities, and, given `captions`,
    `captions`, its top-k captions with cosine similarities; each skipped image `image` and `reason` (the skipped
    ones are also logged). `template` is one template or several (an ensemble: each label's embedding is the
    renormalised mean of its normalised text embeddings, `ndclip.prompts.class_embeddings`). With one template the
    label probabilities are those of the zero-shot pipeline called with `hypothesis_template=template`.
    """
    templates = [template] if isinstance(template, str) else list(template)
    if top_k < 1:
        raise BadInputError(f"top_k must be at least 1, got {top_k}")
    names = [str(image) if isinstance(image, (str, Path)) else f"image {i}" for i, image in enumerate(images)]
    label_embeds = class_embeddings(lambda texts: embed_texts(model, processor, texts), labels, templates)
    image_embeds, unreadable = embed_images(model, processor, images, batch_size=batch_size)
    log_unreadable({Path(names[i]).name: why for i, why in unreadable.items()})
    probabilities = label_probabilities(model, image_embeds, label_embeds)
    readable = [name for i, name in enumerate(names) if i not in unreadable]
    results = [
        {"image": name, "labels": matches}
        for name, matches in zip(readable, top_matches(probabilities, labels, "label", top_k))
    ]
    if captions:
        similarities = image_embeds @ embed_texts(model, processor, captions).t()
        for result, matches in zip(results, top_matches(similarities, captions, "caption", top_k)):
            result["captions"] = matches
    return results, [{"image": names[i], "reason": why} for i, why in unreadable.items()]


def label_probabilities(model, image_embeds: torch.Tensor, label_embeds: torch.Tensor) -> torch.Tensor:
    """`[images, labels]` probabilities: the model's logits (scaled cosine similarities, plus the learned bias of a
    sigmoid model), turned into probabilities as the model says (`logits_to_probabilities`)."""
    with torch.no_grad():
        logits = model.clamped_logit_scale().cpu() * image_embeds @ label_embeds.t()
        if model.logit_bias is not None:
            logits = logits + model.logit_bias.cpu()
        return model.logits_to_probabilities(logits)


def format_table(predictions: Sequence[dict], width: int = 40) -> str:
    """A readable table: one row per image, its top labels, and its best caption if there are captions."""

    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    header = ["image", "top labels (probability)"] + (["best caption (cosine)"] if "captions" in predictions[0] else [])
    rows = [header]
    for p in predictions:
        row = [cut(Path(p["image"]).name), " | ".join(f"{m['label']} {m['score']:.3f}" for m in p["labels"])]
        if "captions" in p:
            row.append(f"{cut(p['captions'][0]['caption'])} ({p['captions'][0]['score']:.3f})")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip predict`."""
    parser.add_argument("--model", required=True, help="a saved NdCLIP folder or a Hub id")
    parser.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--labels", help="comma-separated candidate labels, e.g. dog,cat,car")
    parser.add_argument("--labels_file", help="a text file with one candidate label per line")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument(
        "--template",
        type=template_argument,
        default=DEFAULT_TEMPLATE,
        help="the text each label is written into, at its one '{}'",
    )
    prompts.add_argument(
        "--templates",
        type=templates_argument,
        help=f"a prompt ensemble: a text file with one template per line (blank lines and lines starting with '#' "
        f"are skipped), or `{BUILTIN}` for the built-in set; each label's text embeddings are averaged over them",
    )
    parser.add_argument("--captions", help="a text file with one caption per line, to match against each image")
    parser.add_argument("--top_k", type=positive_int, default=3, help="labels (and captions) to report per image")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--output_dir", required=True, help="where predictions.json and contact_sheet.png go")
    parser.add_argument(
        "--sheet_max_images", type=positive_int, default=256, help="at most this many images on the sheet"
    )
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")


def run_predict(args: argparse.Namespace) -> None:
    """`ndclip predict`: print the table, write `predictions.json` and `contact_sheet.png`."""
    labels = parse_labels(args.labels, args.labels_file)
    captions = read_lines(args.captions) if args.captions else None
    if captions is not None and not captions:
        raise BadInputError(f"the caption file {args.captions} has no captions")
    images = find_images(args.images)
    model, processor = load_ndclip(args.model, args.device)

    templates = args.templates or [args.template]
    predictions, skipped = predict(model, processor, images, labels, templates, captions, args.top_k, args.batch_size)
    if not predictions:
        raise BadInputError(f"none of the {len(images)} images in {args.images} could be read (see the log)")
    print(format_table(predictions))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        # One template, or the ensemble's list.
        **({"template": templates[0]} if len(templates) == 1 else {"templates": templates}),
        "labels": labels,
        "predictions": predictions,
        "skipped": skipped,
    }
    (output_dir / "predictions.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    shown = predictions[: args.sheet_max_images]
    if len(shown) < len(predictions):
        logger.info("the contact sheet shows the first %d of %d images", len(shown), len(predictions))
    sheet_captions = [
        "\n".join([Path(p["image"]).name] + [f"{m['label']} {m['score']:.0%}" for m in p["labels"]]) for p in shown
    ]
    contact_sheet([p["image"] for p in shown], sheet_captions).save(output_dir / "contact_sheet.png")
    logger.info("wrote %s and %s", output_dir / "predictions.json", output_dir / "contact_sheet.png")
