"""Image transforms and collators: from a row of the image-caption schema (see `ndclip.data`) to model inputs.

The image transforms decode an image (a PIL image, or an encoded row of `ndclip.data.without_image_decoding`),
convert it to RGB exactly as the image processor does (8-bit scaling of high-bit-depth greyscale included) and give
the float tensor the image processor would: `eval_image_transform` matches `image_processor(images=...)`,
`train_image_transform` adds a caption-safe random crop. The collators turn examples into batches: one caption per
image, drawn reproducibly, for training and evaluation (`CaptionCollator`), and the captions of
`ndclip.data.flatten_captions` for embedding every caption (`TextCollator`).
"""

import io
import random
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import v2
from transformers.image_transforms import convert_to_rgb

if TYPE_CHECKING:  # only for annotations: the transforms themselves need no `datasets`
    from datasets import Dataset

# PIL's greyscale modes with more than 8 bits per pixel (16-bit PNG and TIFF, 32-bit and float TIFF).
HIGH_BIT_DEPTH_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# --------------------------------------------------------------------------------------------------------------
# Image transforms
# --------------------------------------------------------------------------------------------------------------


class DecodeImage:
    """The first step of the image transforms: an image as a row gives it, decoded to PIL.

    Encoded images ({"bytes", "path"}, rows of `ndclip.data.without_image_decoding`) are opened here. With
    `draft_size` (width, height) a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale that is still at least
    that large (`PIL.Image.draft`, libjpeg's DCT scaling): the decoder then skips most of the work of a full-size
    decode and the resize that follows has fewer pixels to read, which matters when photos are much larger than the
    model's input (`benchmarks/bench_data_pipeline.py` measures the loader). Other formats ignore the draft. Decoded
    PIL images pass through unchanged.
    """

    def __init__(self, draft_size: tuple[int, int] | None = None):
        self.draft_size = draft_size

    def __call__(self, image):
        if isinstance(image, PIL.Image.Image):
            return image
        picture = PIL.Image.open(encoded_image_source(image))
        if self.draft_size:
            picture.draft(None, self.draft_size)  # mode None: keep the colour mode, `to_rgb_array` converts it next
        picture.load()
        return picture

    def __repr__(self):
        return f"{type(self).__name__}(draft_size={self.draft_size})"


def encoded_image_source(image: dict):
    """What PIL opens for an undecoded `datasets.Image` value {"bytes", "path"}: the bytes, else the file."""
    return io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]


def train_image_transform(image_processor) -> v2.Compose:
    """Image (PIL, or encoded: see `DecodeImage`) -> float tensor [3, H, W] with mild, caption-safe augmentation.

    A random crop of 80-100% of the image area, with an aspect ratio between 3:4 and 4:3 (the range of the photos
    themselves, so a crop of a landscape or a portrait photo need not cut one side away), resized to the image
    processor's size. No horizontal flip (captions say "left" and "right") and no colour jitter (captions name
    colours). An encoded JPEG is decoded at reduced size when it stays at least twice the output size: the crop
    (each side at least ~0.77 of the image's) is then still larger than the output, so it is only ever scaled down.
    """
    size, _ = _processor_sizes(image_processor)
    interpolation = _processor_interpolation(image_processor)
    return v2.Compose(
        [
            DecodeImage(draft_size=(2 * size[1], 2 * size[0])),
            v2.Lambda(to_rgb_array),
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interpolation),
            *_to_normalised_float(image_processor),
        ]
    )


def eval_image_transform(image_processor) -> v2.Compose:
    """Image (PIL, or encoded: decoded at full size) -> float tensor [3, H, W], the same as
    `image_processor(images=...)["pixel_values"][0]`."""
    size, resize = _processor_sizes(image_processor)
    interpolation = _processor_interpolation(image_processor)
    return v2.Compose(
        [
            DecodeImage(),
            v2.Lambda(to_rgb_array),
            v2.ToImage(),
            v2.Resize(resize, interpolation=interpolation),
            v2.CenterCrop(size),
            *_to_normalised_float(image_processor),
        ]
    )


def _processor_sizes(image_processor) -> tuple[tuple[int, int], int | tuple[int, int]]:
    """(output size (height, width), what to resize to first): {"height", "width"} resizes to exactly that;
    {"shortest_edge": n} resizes the shorter side to n and then center-crops to `crop_size` (n x n without one)."""
    size = image_processor.size
    if size.get("height") and size.get("width"):
        return (size["height"], size["width"]), (size["height"], size["width"])
    shortest_edge = size.get("shortest_edge")
    if not shortest_edge:
        raise ValueError(f"Unsupported image processor size {size}; expected height/width or shortest_edge")
    crop_size = getattr(image_processor, "crop_size", None)
    if crop_size and getattr(image_processor, "do_center_crop", False):
        return (crop_size["height"], crop_size["width"]), shortest_edge
    return (shortest_edge, shortest_edge), shortest_edge


def _processor_interpolation(image_processor) -> int:
    # torchvision's v2 transforms take PIL's resampling constants, which is what image processors store.
    resample = getattr(image_processor, "resample", None)
    return int(resample) if resample is not None else int(PIL.Image.Resampling.BILINEAR)


def _to_normalised_float(image_processor) -> list:
    mean, std = image_processor.image_mean, image_processor.image_std
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def to_rgb_array(image: PIL.Image.Image) -> np.ndarray:
    """An image's pixels as RGB, uint8 [H, W, 3]: what training, evaluation and the tools (`ndclip.inference`) feed
    the model.

    Transparency is composited onto white, exactly as the image processors' `do_convert_rgb` does. High-bit-depth
    greyscale is first scaled to 8 bits (`_to_8_bit_grey`): PIL's own conversion clips it at 255, which turns a
    16-bit photo almost entirely white. Every other image gives exactly what the image processor gives.
    """
    if image.mode in HIGH_BIT_DEPTH_GREY_MODES:
        image = _to_8_bit_grey(image)
    return convert_to_rgb(image, return_numpy=True)


def _to_8_bit_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """A greyscale image of 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") pixels as an 8-bit "L" image.

    16-bit pixels are divided by 257, the inverse of how 8-bit values are widened to 16 bits (255 -> 65535). "I" and
    "F" say nothing about the range their values use, so it is read from the values: floats within [0, 1] are scaled
    by 255; values within [0, 255] are taken as 8-bit, within [0, 65535] as 16-bit (PIL gave 16-bit PNGs as "I"
    before it had "I;16"); any other range (negative values, 32-bit data) is stretched linearly from its minimum to
    0 and its maximum to 255. Non-finite floats become 0.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scaled = values / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257
    elif high > low:
        scaled = (values - low) * (255 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return PIL.Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def with_image_transform(dataset: "Dataset", image_transform) -> "Dataset":
    """The dataset with an on-the-fly transform: each example gives `pixel_values` (image_transform(image)),
    `captions`, `image_id`, and `label` when the dataset has one."""
    return dataset.with_transform(partial(_transform_batch, image_transform=image_transform))


def _transform_batch(batch: dict, image_transform) -> dict:
    transformed = {"pixel_values": [image_transform(image) for image in batch["image"]]}
    transformed.update({name: batch[name] for name in ("captions", "image_id", "label") if name in batch})
    return transformed


@contextmanager
def one_torch_thread():
    """Run the block on one torch intra-op thread, as DataLoader workers always do. The per-image transforms are small
    ops that torch would otherwise split over every core, paying a fork/join each that costs more than the op
    (benchmarks/bench_data_pipeline.py measures it: `workers0` vs `workers0_torch_threads1`)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------


class CaptionCollator:
    """collate_fn for the image-caption DataLoaders: one caption per image, tokenized, and the images as a batch.

    With `train=True` the caption is drawn from the image's captions by (seed, epoch, image_id) alone, and so is the
    random crop of `image_transform`: a resumed run, another batch order or another number of workers sees the same
    captions and crops, and the global random stream (dropout) is left untouched. Call `set_epoch` before each epoch
    (with `persistent_workers=True` the workers keep the epoch they started with). With `train=False` it takes the
    first caption, for a stable evaluation loss.

    Examples are rows of the dataset as loaded (`image` decoded by datasets, or encoded in rows of
    `ndclip.data.without_image_decoding`, and transformed here with `image_transform`), or rows of
    `with_image_transform(...)` that already carry `pixel_values` (then `image_transform` is None). Captions are
    padded to the longest in the batch and truncated at `max_seq_length`. Returns `pixel_values` [B, 3, H, W],
    `input_ids` and `attention_mask` [B, L], `image_ids` [B], and `labels` [B]
    when the examples have a `label`; examples without `captions` (an image-classification set) give no text.
    """

    def __init__(self, tokenizer, max_seq_length: int = 64, seed: int = 42, train: bool = True, image_transform=None):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.train = train
        self.image_transform = image_transform
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _sample_random(self, image_id: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{image_id}")

    def choose_caption(self, captions: list[str], image_id: int) -> str:
        if not self.train:
            return captions[0]
        return self._sample_random(image_id).choice(captions)

    def tokenize(self, captions: list[str]) -> dict:
        return _tokenize(self.tokenizer, captions, self.max_seq_length)

    def pixel_batch(self, examples: list[dict]) -> torch.Tensor:
        """`pixel_values` [B, 3, H, W] of the examples."""
        with one_torch_thread():
            return torch.stack([self.pixel_values(example) for example in examples])

    def pixel_values(self, example: dict) -> torch.Tensor:
        if self.image_transform is None:
            return example["pixel_values"]
        if not self.train:
            return self.image_transform(example["image"])
        # The transform draws from torch's global generator: seed it for this sample only, then restore it.
        # (`default_generator.manual_seed`, not `torch.manual_seed`: the latter also seeds CUDA, far slower.)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self._sample_random(example["image_id"]).getrandbits(63))
            return self.image_transform(example["image"])

    def __call__(self, examples: list[dict]) -> dict:
        batch = {}
        if "captions" in examples[0]:  # an image-classification set (zero-shot evaluation) has none
            captions = [self.choose_caption(example["captions"], example["image_id"]) for example in examples]
            batch = self.tokenize(captions)
        batch["pixel_values"] = self.pixel_batch(examples)
        if "image_id" in examples[0]:
            batch["image_ids"] = torch.tensor([example["image_id"] for example in examples])
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([example["label"] for example in examples])
        return batch


class TextCollator:
    """collate_fn for a DataLoader over `ndclip.data.flatten_captions`: `input_ids`, `attention_mask` (padded to the
    longest caption in the batch, truncated at `max_seq_length`) and `image_ids`."""

    def __init__(self, tokenizer, max_seq_length: int = 64):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length

    def __call__(self, examples: list[dict]) -> dict:
        batch = _tokenize(self.tokenizer, [example["caption"] for example in examples], self.max_seq_length)
        batch["image_ids"] = torch.tensor([example["image_id"] for example in examples])
        return batch


def _tokenize(tokenizer, texts: list[str], max_seq_length: int) -> dict:
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_seq_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
