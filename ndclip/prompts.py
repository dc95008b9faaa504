"""Zero-shot prompt templates: the default one, a small built-in ensemble, template files, and the class
embedding of an ensemble.

Zero-shot classification writes each class name into a template ("a photo of a {}.") and picks the class whose text
embedding is closest to the image's. One wording is one guess at how captions phrase things; CLIP's zero-shot results
use an ensemble instead: every class name is written into each template, the normalised text embeddings are averaged
per class and the mean is normalised again (`ensemble_embeddings`). `run_clip.py --zero_shot_templates` and
`ndclip predict --templates` take a template file (`read_templates`) or `builtin` (`BUILTIN_TEMPLATES`).
"""

import argparse
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ndclip.inference import BadInputError

DEFAULT_TEMPLATE = "a photo of a {}."
BUILTIN = "builtin"  # the name that selects BUILTIN_TEMPLATES where a template file is expected
# Written for this project: everyday photo phrasings, and phrasings of one object on a background (the demo's
# coloured shapes, product photos), at two sizes. The default template comes first, so the ensemble contains it.
BUILTIN_TEMPLATES = (
    DEFAULT_TEMPLATE,
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a snapshot of a {}.",
    "a photo with a {} in it.",
    "a {} in the middle of the picture.",
    "a {} on a plain background.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a simple drawing of a {}.",
    "a photo of the {}.",
)
COMMENT = "#"  # a template file's lines that start with it (after spaces) are comments


def check_template(template: str) -> str:
    """`template` if it holds exactly one `{}`, where each label goes, and no other replacement field (`{name}`,
    `{0}`; a literal brace is written `{{` or `}}`). Raises `BadInputError` naming what it found otherwise."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise BadInputError(
            f"the template {template!r} is not a valid format string ({error}); write a literal brace as '{{{{' or "
            "'}}}}'"
        ) from error
    fields = [
        "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        for _, name, spec, conversion in parts
        if name is not None
    ]
    if fields != ["{}"]:
        found = "none" if not fields else f"the field {fields[0]!r}" if len(fields) == 1 else f"{len(fields)} fields"
        raise BadInputError(f"the template {template!r} needs exactly one '{{}}' where the label goes, found {found}")
    return template


def read_templates(path: str | Path) -> list[str]:
    """The templates of a text file: one per line, stripped; blank lines and lines starting with `#` are skipped.

    Raises `BadInputError` naming the file (and the line) when it does not exist, holds no template, holds a line
    that is not a template (`check_template`) or the same template twice (it would weigh double in the mean)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"the template file {path} does not exist (or pass `{BUILTIN}` for the built-in set)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BadInputError(f"the template file {path} is not UTF-8 text: {error}") from error
    templates, first_line = [], {}
    for number, line in enumerate(lines, start=1):
        template = line.strip()
        if not template or template.startswith(COMMENT):
            continue
        try:
            check_template(template)
        except BadInputError as error:
            raise BadInputError(f"{path}, line {number}: {error}") from error
        if template in first_line:
            repeated = first_line[template]
            raise BadInputError(f"{path}, line {number}: repeats the template {template!r} of line {repeated}")
        first_line[template] = number
        templates.append(template)
    if not templates:
        raise BadInputError(f"the template file {path} holds no template (one per line, with one '{{}}' each)")
    return templates


def load_templates(source: str | Path) -> list[str]:
    """`BUILTIN_TEMPLATES` for `builtin`, else the templates of the file `source` (`read_templates`)."""
    return list(BUILTIN_TEMPLATES) if str(source) == BUILTIN else read_templates(source)


def template_argument(text: str) -> str:
    """An argparse `type` for one template, checked by `check_template` (argparse then names the flag)."""
    try:
        return check_template(text)
    except BadInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def templates_argument(text: str) -> list[str]:
    """An argparse `type` for a template file or `builtin`: the templates (`load_templates`), read once when the
    arguments are parsed, so that a bad file stops the command before anything runs."""
    try:
        return load_templates(text)
    except BadInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def ensemble_embeddings(per_template: torch.Tensor) -> torch.Tensor:
    """`[C, D]` class embeddings from `[T, C, D]` text embeddings (template t, class c): CLIP's recipe, the mean over
    the templates of the L2-normalised embeddings, normalised again.

    One template gives its embeddings unchanged: they are the model's `text_embeds`, unit-length already, and
    normalising them again would only move their last bits -- zero-shot scores with one template stay exactly those
    of the single-template code path."""
    if per_template.dim() != 3 or per_template.shape[0] == 0:
        shape = tuple(per_template.shape)
        raise ValueError(f"expected [templates, classes, dim] embeddings with at least one template, got {shape}")
    if per_template.shape[0] == 1:
        return per_template[0]
    normalised = torch.nn.functional.normalize(per_template, dim=-1)
    return torch.nn.functional.normalize(normalised.mean(dim=0), dim=-1)


def class_embeddings(
    embed_texts: Callable[[list[str]], torch.Tensor], class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """`[C, D]` zero-shot class embeddings: every class name written into every template, embedded in one call of
    `embed_texts` (texts -> `[texts, D]` text embeddings; it batches), and averaged per class over the templates
    (`ensemble_embeddings`)."""
    if not templates:
        raise BadInputError("zero-shot classification needs at least one template")
    texts = [check_template(template).format(name) for template in templates for name in class_names]
    embeddings = embed_texts(texts)
    return ensemble_embeddings(embeddings.reshape(len(templates), len(class_names), -1))


def describe_templates(templates: Sequence[str]) -> str:
    """A short label for logs: the one template, or how many."""
    return repr(templates[0]) if len(templates) == 1 else f"an ensemble of {len(templates)} templates"
