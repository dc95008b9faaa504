"""Using a trained NdCLIP: load a model folder (or Hub id), find the images in a folder, embed images and texts in
batches, draw a contact sheet. Shared by the tools of the `ndclip` command, `ndclip.predict` and `ndclip.search`."""

import argparse
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from configuration_ndclip import NdClipConfig
from modeling_ndclip import NdClipModel
from ndclip.embedding import IMAGE_INPUTS, TEXT_INPUTS, embed
from ndclip.transforms import to_rgb_array
from processing_ndclip import NdClipProcessor

logger = logging.getLogger(__name__)

# Contact-sheet layout, in pixels: each cell is a square thumbnail above `text_lines` lines of text.
PAD = 4
LINE_HEIGHT = 14
EXAMPLES_IN_LOG = 5  # unreadable images named in the log message that counts them


class BadInputError(ValueError):
    """A problem with what the user passed (model, image folder, labels, index). The `ndclip` command reports it as
    one line."""


# How a file that PIL identifies as an image can still fail to decode: truncated or corrupt data (an OSError, which
# `open_image` reports as a BadInputError), or more pixels than PIL's `MAX_IMAGE_PIXELS` allows, twice over
# (`DecompressionBombError`). Images between one and two times that limit are decoded, with PIL's warning.
UNREADABLE_IMAGE_ERRORS = (BadInputError, OSError, Image.DecompressionBombError)


def positive_int(text: str) -> int:
    """An argparse `type` for counts such as `--top_k` and `--batch_size`: an integer of at least 1."""
    value = int(text)  # not a number: argparse reports "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def load_ndclip(name_or_path: str, device: str | None = None) -> tuple[NdClipModel, NdClipProcessor]:
    """An NdCLIP (in eval mode, on `device`: CUDA when available) and its processor, from a saved folder or Hub id.

    Raises `BadInputError` when it is not an NdCLIP (see `check_ndclip`).
    """
    check_ndclip(name_or_path)
    # The processor's tokenizer and image processor read config.json through AutoConfig: knowing the NdCLIP config
    # locally keeps it from asking whether to run the folder's copy of the code.
    AutoConfig.register(NdClipConfig.model_type, NdClipConfig, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = NdClipModel.from_pretrained(name_or_path).eval().to(device)
    return model, NdClipProcessor.from_pretrained(name_or_path)


def check_ndclip(name_or_path: str) -> None:
    """Raise `BadInputError`, saying why, when `name_or_path` is not a saved NdCLIP: a folder that does not exist,
    has no `config.json` or holds another kind of model, or a Hub id that cannot be loaded."""
    folder = Path(name_or_path)
    looks_like_a_path = folder.is_absolute() or str(name_or_path).startswith(".") or str(name_or_path).count("/") > 1
    if looks_like_a_path and not folder.exists():
        raise BadInputError(f"model folder {name_or_path} does not exist")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise BadInputError(f"{name_or_path} has no config.json: it is not a saved model folder")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(name_or_path))
    except OSError as error:
        raise BadInputError(f"cannot load a model from {name_or_path!r}: {error}") from error
    model_type = config_dict.get("model_type")
    if model_type != NdClipConfig.model_type:
        raise BadInputError(
            f"{name_or_path} holds a {model_type!r} model, not an NdCLIP (an NdCLIP's config.json has model_type "
            "'ndclip')"
        )


def find_images(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively, sorted). Other files are skipped, and their count logged.

    A file counts as an image when PIL can read its header, whatever its name; whether it decodes is found out when
    it is embedded (`embed_images` skips it then). Raises `BadInputError` when the folder does not exist or holds
    no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"image folder {folder} does not exist")
    images, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with Image.open(path):
                images.append(path)
        except Image.DecompressionBombError:  # an image, too large to decode: embed_images skips and counts it
            images.append(path)
        except (UnidentifiedImageError, OSError):
            skipped.append(path)
    if skipped:
        logger.info("skipped %d file(s) in %s that are not images, e.g. %s", len(skipped), folder, skipped[0].name)
    if not images:
        raise BadInputError(f"image folder {folder} holds no images ({len(skipped)} other file(s))")
    return images


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or an image, converted exactly as training converts it (`to_rgb_array`):
    transparency onto white, 16-bit greyscale scaled to 8 bits, grayscale, CMYK, palette... to RGB."""
    if isinstance(image, Image.Image):
        return Image.fromarray(to_rgb_array(image))
    try:
        with Image.open(image) as opened:
            return Image.fromarray(to_rgb_array(opened))
    except (UnidentifiedImageError, OSError) as error:
        raise BadInputError(f"cannot read image {image}: {error}") from error


def embed_images(
    model: NdClipModel,
    processor: NdClipProcessor,
    images: Sequence,
    batch_size: int = 32,
    progress: tqdm | None = None,
) -> tuple[torch.Tensor, dict[int, str]]:
    """L2-normalised embeddings (float32, on the CPU), in batches, of the images that can be read, and
    `{position in images: why}` for those that cannot (truncated or corrupt files, decompression bombs).

    One bad file in a large folder must not stop the run, so unreadable images are skipped: the embeddings are
    `[len(images) - len(unreadable), projection_dim]`, in the order of `images`. `images` is any sequence of PIL
    images or file paths (or whose items decode to PIL images); they are opened one batch at a time. The progress
    bar `progress` is advanced by the number of images (a new one is shown when it is None).
    """
    bar = progress if progress is not None else tqdm(total=len(images), desc="embedding images", unit="img")
    unreadable = {}
    batches = readable_image_batches(model, processor, images, batch_size, bar, unreadable)
    embeddings = embed(model, batches, ["image_embeds"], inputs=IMAGE_INPUTS).get("image_embeds")
    if progress is None:
        bar.close()
    return (embeddings if embeddings is not None else torch.empty(0, model.config.projection_dim)), unreadable


def readable_image_batches(
    model: NdClipModel, processor: NdClipProcessor, images: Sequence, batch_size: int, bar: tqdm, unreadable: dict
) -> Iterator[dict[str, torch.Tensor]]:
    """`{"pixel_values": ...}` batches, on the model's device and in its dtype, of the images of each slice of
    `batch_size` that open; the others go into `unreadable` (`{position: why}`). `bar` advances by the slice once
    its batch has been used."""
    for start in range(0, len(images), batch_size):
        positions = range(start, min(start + batch_size, len(images)))
        batch = []
        for i in positions:
            try:
                batch.append(open_image(images[i]))
            except UNREADABLE_IMAGE_ERRORS as error:
                unreadable[i] = str(error.__cause__ or error)  # PIL's reason, without open_image's wrapping
        if batch:
            pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
            yield {"pixel_values": pixel_values.to(model.device, model.dtype)}
        bar.update(len(positions))


def log_unreadable(reasons: dict[str, str]) -> None:
    """Log how many images were skipped as unreadable (`{name: why}`) and name the first few."""
    if reasons:
        examples = "; ".join(f"{name} ({why})" for name, why in list(reasons.items())[:EXAMPLES_IN_LOG])
        more = "; ..." if len(reasons) > EXAMPLES_IN_LOG else ""
        logger.warning("skipped %d unreadable image(s): %s%s", len(reasons), examples, more)


def embed_texts(
    model: NdClipModel, processor: NdClipProcessor, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised text embeddings `[len(texts), projection_dim]` (float32, on the CPU), in batches."""
    batches = (
        processor(text=list(texts[start : start + batch_size]), return_tensors="pt").to(model.device)
        for start in range(0, len(texts), batch_size)
    )
    embeddings = embed(model, batches, ["text_embeds"], inputs=TEXT_INPUTS).get("text_embeds")
    return embeddings if embeddings is not None else torch.empty(0, model.config.projection_dim)


def contact_sheet(
    images: Sequence, captions: Sequence[str], columns: int = 6, thumb_size: int = 160, text_lines: int | None = None
) -> Image.Image:
    """A white RGB sheet of thumbnails (scaled to fit `thumb_size`) in a grid, each above its caption (one line per
    newline).

    Each cell is `thumb_size + 2 * PAD` wide and `thumb_size + 2 * PAD + text_lines * LINE_HEIGHT` tall, where
    `text_lines` defaults to the most lines of any caption; `columns` is capped by the number of images. Text wider
    than a cell is cut with "...".
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    lines = [caption.splitlines() for caption in captions]
    text_lines = max(map(len, lines)) if text_lines is None else text_lines
    columns = min(columns, len(images))
    cell_width, cell_height = thumb_size + 2 * PAD, thumb_size + 2 * PAD + text_lines * LINE_HEIGHT
    sheet = Image.new("RGB", (columns * cell_width, math.ceil(len(images) / columns) * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, caption_lines) in enumerate(zip(images, lines)):
        left, top = (i % columns) * cell_width, (i // columns) * cell_height
        thumb = ImageOps.contain(open_image(image), (thumb_size, thumb_size))
        sheet.paste(thumb, (left + PAD + (thumb_size - thumb.width) // 2, top + PAD + (thumb_size - thumb.height) // 2))
        for j, line in enumerate(caption_lines[:text_lines]):
            text = fit_text(draw, line, font, thumb_size)
            draw.text((left + PAD, top + thumb_size + 2 * PAD + j * LINE_HEIGHT), text, fill="black", font=font)
    return sheet


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, or if it is wider than `width` pixels its longest prefix that fits with "..." after it.

    A longer prefix is never narrower, so the cut is found by binary search: a few measurements however long the
    text (removing one character at a time measured a caption once per character).
    """
    if draw.textlength(text, font=font) <= width:
        return text
    # The prefix of `too_wide` characters is too wide; `fits` only grows to lengths that fit (0: just "...").
    fits, too_wide = 0, len(text)
    while too_wide - fits > 1:
        middle = (fits + too_wide) // 2
        if draw.textlength(text[:middle] + "...", font=font) <= width:
            fits = middle
        else:
            too_wide = middle
    return text[:fits] + "..."
