"""Image transforms and collators: from a row of the image-caption schema (see `ndclip.data`) to model inputs.

The image transforms (`ImageTransform`) decode an image (a PIL image, or an encoded row of
`ndclip.data.without_image_decoding`) straight to uint8 RGB pixels, converted exactly as the image processor converts
(8-bit scaling of high-bit-depth greyscale included), crop and resize them on the uint8 tensor, and convert to float
and normalise last, once per batch in the collator: `eval_image_transform` gives what `image_processor(images=...)`
gives, `train_image_transform` adds a caption-safe random crop. The collators turn examples into batches: one caption
per image (or `captions_per_image` of them), drawn reproducibly, for training and evaluation (`CaptionCollator`), and
the captions of `ndclip.data.flatten_captions` for embedding every caption (`TextCollator`).
"""

import io
import math
import platform
import random
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from transformers.image_transforms import convert_to_rgb

if TYPE_CHECKING:  # only for annotations: the transforms themselves need no `datasets`
    from datasets import Dataset

# PIL's greyscale modes with more than 8 bits per pixel (16-bit PNG and TIFF, 32-bit and float TIFF).
HIGH_BIT_DEPTH_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# --------------------------------------------------------------------------------------------------------------
# Image transforms
# --------------------------------------------------------------------------------------------------------------


class DecodeImage:
    """The first step of the image transforms: an image as a row gives it -> its RGB pixels, uint8 [3, H, W].

    Encoded images ({"bytes", "path"}, rows of `ndclip.data.without_image_decoding`) are decoded here. A JPEG goes
    straight into a tensor through `torchvision.io.decode_jpeg` (libjpeg-turbo, the pixels PIL decodes; greyscale
    and CMYK JPEGs are converted to RGB by the decoder as PIL converts them); anything else is opened with PIL and
    converted by `to_rgb_array`, as decoded PIL images are. So is a JPEG that torchvision refuses: every image the
    bad-sample check (`ndclip.data.image_problem`, which opens images with PIL) lets through is decoded. PIL's
    reduced-size JPEG decoding (`draft`) is not used: it skips the inverse DCT but not the entropy decoding that
    dominates a photo's decode, so it gained little over `decode_jpeg` on Flickr8k-sized photos, and it left the
    crop fewer pixels to resize from.
    """

    def __call__(self, image) -> torch.Tensor:
        return self.decode(image)[0]

    def decode(self, image) -> tuple[torch.Tensor, bool]:
        """(RGB pixels uint8 [3, H, W], whether they were decoded from a JPEG)."""
        if isinstance(image, PIL.Image.Image):
            return rgb_tensor(image), False
        data = encoded_image_bytes(image)
        is_jpeg = data[: len(JPEG_SIGNATURE)] == JPEG_SIGNATURE
        if is_jpeg:
            try:
                return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB), True
            except RuntimeError:  # e.g. a JPEG variant libjpeg-turbo refuses: PIL decodes it, or names the problem
                pass
        with PIL.Image.open(io.BytesIO(data)) as picture:
            return rgb_tensor(picture), is_jpeg

    def __repr__(self):
        return f"{type(self).__name__}()"


# The first bytes of every JPEG file (SOI marker, then the first segment's marker).
JPEG_SIGNATURE = b"\xff\xd8\xff"


def encoded_image_source(image: dict):
    """What PIL opens for an undecoded `datasets.Image` value {"bytes", "path"}: the bytes, else the file."""
    return io.BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"]


def encoded_image_bytes(image: dict) -> bytearray:
    """The encoded file of an undecoded `datasets.Image` value {"bytes", "path"}, writable (torch refuses to wrap
    read-only memory without a warning)."""
    if image["bytes"] is not None:
        return bytearray(image["bytes"])
    with open(image["path"], "rb") as file:
        return bytearray(file.read())


def rgb_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """A PIL image's RGB pixels (`to_rgb_array`) as a uint8 tensor [3, H, W], left in the channels-last memory layout
    of the array (and of `decode_jpeg`'s output), the layout torch's uint8 resize kernels work in."""
    return torch.from_numpy(to_rgb_array(image)).permute(2, 0, 1)


class ImageTransform:
    """An image transform in two stages: `pixels` per image (decode, convert to RGB, crop and resize: uint8
    [3, H, W]) and `normalise` per batch (float conversion and the processor's normalisation, on the stacked
    [B, 3, H, W] batch). `CaptionCollator` runs `pixels` on each example and `normalise` once per batch, which saves a
    float tensor per image; the float ops are elementwise, so a batch gives exactly the values each image gives
    alone. Called on one image it gives that image's float tensor [3, H, W]."""

    def __init__(self, pixels, normalise):
        self.pixels = pixels
        self.normalise = normalise

    def __call__(self, image) -> torch.Tensor:
        return self.normalise(self.pixels(image).unsqueeze(0))[0]

    def __repr__(self):
        return f"{type(self).__name__}(pixels={self.pixels!r}, normalise={self.normalise!r})"


class NormalisePixels:
    """uint8 pixels [..., 3, H, W] -> float32: scaled to [0, 1], then normalised with the image processor's mean and
    std, as `image_processor(images=...)` ends."""

    def __init__(self, image_processor):
        self.mean = [float(value) for value in image_processor.image_mean]
        self.std = [float(value) for value in image_processor.image_std]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), mean=self.mean, std=self.std)

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class RandomCropPixels:
    """Training pixels: the decoded image (`DecodeImage`), a random crop of 80-100% of its area with an aspect ratio
    between 3:4 and 4:3 (`random_crop_box`), resized (antialiased) to `size` (height, width), uint8 [3, size].

    The crop box is drawn from torch's global generator (`CaptionCollator` seeds it per (seed, epoch, image)) on the
    image's crop frame: for a JPEG, the size PIL's reduced-size decoding (`draft`) would give for `draft_size`, the
    frame earlier versions decoded and cropped, so that a seed gives the crops it always gave; the box is then scaled
    onto the full-size pixels, whose (sharper) resize replaces the reduced decode's. Other images are their own frame.
    """

    def __init__(self, size: tuple[int, int], interpolation: int, draft_size: tuple[int, int]):
        self.size = list(size)
        self.interpolation = interpolation
        self.draft_size = draft_size
        self.decode = DecodeImage()
        self.native_mode = native_uint8_resize_mode(interpolation)

    def __call__(self, image) -> torch.Tensor:
        pixels, is_jpeg = self.decode.decode(image)
        top, left, height, width = self.crop_box(pixels.shape[-2:], is_jpeg)
        # The crop, copied into a dense channels-last block: torch's uint8 antialiased resize reads that layout
        # without repacking it (a strided crop view or a channels-first tensor is repacked first, which is slower).
        crop = pixels[None, :, top : top + height, left : left + width].contiguous(memory_format=torch.channels_last)
        if self.native_mode:  # what `F.resize` runs, without its per-call checks (they cost more than a small resize)
            return torch.nn.functional.interpolate(
                crop, size=self.size, mode=self.native_mode, align_corners=False, antialias=True
            )[0]
        return F.resize_image(crop, self.size, self.interpolation, antialias=True)[0]

    def crop_box(self, image_size: tuple[int, int], is_jpeg: bool) -> tuple[int, int, int, int]:
        """A random (top, left, height, width) in the pixels of an image of `image_size` (height, width)."""
        height, width = image_size
        scale = draft_scale((width, height), self.draft_size) if is_jpeg else 1
        top, left, box_height, box_width = random_crop_box(-(-height // scale), -(-width // scale))  # ceil: PIL's
        top, left = top * scale, left * scale
        return top, left, min(box_height * scale, height - top), min(box_width * scale, width - left)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation}, draft={self.draft_size})"


CROP_SCALE = (0.8, 1.0)  # of the image's area
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # of width to height


def random_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of `CROP_SCALE` of the area and aspect ratio (width / height)
    within `CROP_LOG_RATIO`, drawn from torch's global generator with exactly the draws, in the same order, of
    `torchvision.transforms.v2.RandomResizedCrop(scale=CROP_SCALE, ratio=(3/4, 4/3)).make_params` (tested equal), so
    that a seed gives the box it gave: written out because that method's generic input checks cost more per image
    than the draws themselves."""
    area = height * width
    draw, position = torch.empty(1), torch.empty(1, dtype=torch.int64)  # reused: `randint` is `empty().random_()`
    for _ in range(10):
        target_area = area * draw.uniform_(*CROP_SCALE).item()
        aspect_ratio = draw.uniform_(*CROP_LOG_RATIO).exp_().item()
        box_width = int(round(math.sqrt(target_area * aspect_ratio)))
        box_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = position.random_(0, height - box_height + 1).item()
            left = position.random_(0, width - box_width + 1).item()
            return top, left, box_height, box_width
    # No draw fitted: the largest centred box of an allowed aspect ratio, as torchvision falls back.
    ratio = width / height
    if ratio < 3 / 4:
        box_width, box_height = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        box_width, box_height = int(round(height * (4 / 3))), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def native_uint8_resize_mode(interpolation: int) -> str | None:
    """The `torch.nn.functional.interpolate` mode that resizes uint8 pixels directly, exactly as torchvision's
    `F.resize` does for `interpolation` on this CPU ("bilinear" needs AVX2/AVX512 or ARM there, "bicubic" always),
    or None where torchvision resizes otherwise (other modes, or in float and rounded back)."""
    if interpolation == PIL.Image.Resampling.BICUBIC:
        return "bicubic"
    arm = platform.machine() in ("aarch64", "arm64")
    capable = arm or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return "bilinear" if interpolation == PIL.Image.Resampling.BILINEAR and capable else None


def draft_scale(image_size: tuple[int, int], draft_size: tuple[int, int]) -> int:
    """The reduction (1, 2, 4 or 8) that PIL's `JpegImageFile.draft(mode, draft_size)` picks for a JPEG of
    `image_size` (width, height): the largest that keeps both sides at least `draft_size` (1 for a smaller image)."""
    fits = min(image_size[0] // draft_size[0], image_size[1] // draft_size[1])
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def train_image_transform(image_processor) -> ImageTransform:
    """Image (PIL, or encoded: see `DecodeImage`) -> float tensor [3, H, W] with mild, caption-safe augmentation.

    A random crop of 80-100% of the image area, with an aspect ratio between 3:4 and 4:3 (the range of the photos
    themselves, so a crop of a landscape or a portrait photo need not cut one side away), resized to the image
    processor's size (`RandomCropPixels`). No horizontal flip (captions say "left" and "right") and no colour jitter
    (captions name colours). The crop boxes of a JPEG are drawn on the frame of a decode at reduced size whenever
    that stays at least twice the output size (see `RandomCropPixels`).
    """
    size, _ = _processor_sizes(image_processor)
    interpolation = _processor_interpolation(image_processor)
    pixels = RandomCropPixels(size, interpolation, draft_size=(2 * size[1], 2 * size[0]))
    return ImageTransform(pixels, NormalisePixels(image_processor))


def eval_image_transform(image_processor) -> ImageTransform:
    """Image (PIL, or encoded) -> float tensor [3, H, W], the same as `image_processor(images=...)["pixel_values"][0]`:
    the processor's resize and center crop on the uint8 pixels, then its rescaling and normalisation."""
    size, resize = _processor_sizes(image_processor)
    interpolation = _processor_interpolation(image_processor)
    pixels = v2.Compose([DecodeImage(), v2.Resize(resize, interpolation=interpolation), v2.CenterCrop(size)])
    return ImageTransform(pixels, NormalisePixels(image_processor))


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
    """collate_fn for the image-caption DataLoaders: `captions_per_image` captions per image (1 by default), tokenized,
    and the images as a batch.

    With `train=True` the captions are drawn from the image's captions by (seed, epoch, image_id) alone, and so is the
    random crop of `image_transform`: a resumed run, another batch order or another number of workers sees the same
    captions and crops, and the global random stream (dropout) is left untouched. Call `set_epoch` before each epoch
    (with `persistent_workers=True` the workers keep the epoch they started with). One caption per image is drawn
    uniformly; N > 1 are the first N of a random order of the image's captions, which an image with fewer than N
    captions repeats (each of its captions then appears N // k or N // k + 1 times) so that every image fills N
    rows. With `train=False` it takes the first captions in order (the first one for N = 1: a stable evaluation loss).

    Examples are rows of the dataset as loaded (`image` decoded by datasets, or encoded in rows of
    `ndclip.data.without_image_decoding`, and transformed here with `image_transform`, an `ImageTransform`), or rows of
    `with_image_transform(...)` that already carry `pixel_values` (then `image_transform` is None). Captions are
    padded to the longest in the batch and truncated at `max_seq_length`. Returns `pixel_values` [B, 3, H, W],
    `input_ids` and `attention_mask` [B * N, L] (image-major: the N captions of the first image first), `image_ids`
    [B], and `labels` [B] when the examples have a `label`; examples without `captions` (an image-classification set)
    give no text.
    """

    def __init__(
        self, tokenizer, max_seq_length: int = 64, seed: int = 42, train: bool = True, image_transform=None,
        captions_per_image: int = 1,
    ):  # fmt: skip
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.train = train
        self.image_transform = image_transform
        self.captions_per_image = captions_per_image
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _sample_random(self, image_id: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{image_id}")

    def caption_indices(self, captions: list[str], image_id: int) -> list[int]:
        """Which of the image's captions go into the batch, `captions_per_image` of them (see the class)."""
        count = len(captions)
        if not self.train:
            order = range(count)
        elif self.captions_per_image == 1:  # `choice` of the indices: the very draw of `choice(captions)`
            return [self._sample_random(image_id).choice(range(count))]
        else:
            order = self._sample_random(image_id).sample(range(count), count)
        return [order[n % count] for n in range(self.captions_per_image)]

    def choose_captions(self, captions: list[str], image_id: int) -> list[str]:
        return [captions[n] for n in self.caption_indices(captions, image_id)]

    def tokenize(self, captions: list[str]) -> dict:
        return _tokenize(self.tokenizer, captions, self.max_seq_length)

    def pixel_batch(self, examples: list[dict]) -> torch.Tensor:
        """`pixel_values` [B, 3, H, W] of the examples: each image's uint8 pixels (`image_pixels`), stacked, then
        converted to float and normalised once for the whole batch (`ImageTransform`)."""
        if self.image_transform is None:
            return torch.stack([example["pixel_values"] for example in examples])
        # The training crops seed torch's global generator per image: it is restored after the batch.
        with one_torch_thread(), torch.random.fork_rng(devices=[], enabled=self.train):
            pixels = torch.stack([self.image_pixels(example) for example in examples])
            return self.image_transform.normalise(pixels)

    def image_pixels(self, example: dict) -> torch.Tensor:
        """The example's pixels before normalisation (`ImageTransform.pixels`). With `train=True` they are cropped
        by the crop of (seed, epoch, image_id): torch's global generator is seeded with it (and left so: `pixel_batch`
        restores it once per batch)."""
        if self.train:  # `default_generator.manual_seed`, not `torch.manual_seed`: that one also seeds CUDA, far slower
            torch.default_generator.manual_seed(self._sample_random(example["image_id"]).getrandbits(63))
        return self.image_transform.pixels(example["image"])

    def __call__(self, examples: list[dict]) -> dict:
        batch = {}
        if "captions" in examples[0]:  # an image-classification set (zero-shot evaluation) has none
            captions = [text for e in examples for text in self.choose_captions(e["captions"], e["image_id"])]
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
