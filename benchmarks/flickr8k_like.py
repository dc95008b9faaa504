"""Flickr8k-like data for the benchmarks that read real files: photo-like JPEGs in a Kaggle-layout folder
(`Images/` + `captions.txt`, five captions per image, as `ndclip.layouts.write_kaggle_flickr8k` writes it), and a
WordPiece tokenizer trained on its captions.

The photos are 500x375 by default, every fourth one 375x500 as Flickr8k's portrait photos, quality 90, smooth random
content with a little noise (about 75 KB each): decoding one costs what decoding a Flickr8k photo costs, whatever the
model.
"""

import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from ndclip.data import load_image_caption_dataset, read_kaggle_captions, without_image_decoding
from ndclip.layouts import write_kaggle_flickr8k
from ndclip.tiny_towers import train_wordpiece_tokenizer

PHOTO_SIZE = (500, 375)  # width, height: Flickr8k's most common size
PORTRAIT_EVERY = 4  # every fourth photo is 375x500
JPEG_QUALITY = 90
VOCAB_SIZE = 2000


def smooth_photo(seed: int, width: int, height: int) -> PILImage.Image:
    """A photo-like RGB image: random colours on a coarse grid, smoothly (bicubically) enlarged, plus a little noise,
    so that its JPEG has a photo's size and decoding cost (random noise alone would be unrealistically large)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(PILImage.fromarray(coarse).resize((width, height), PILImage.Resampling.BICUBIC), np.float32)
    noisy = smooth + rng.normal(0.0, 12.0, size=smooth.shape)
    return PILImage.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_flickr8k_like(folder, count: int, size=PHOTO_SIZE, portrait_every: int | None = PORTRAIT_EVERY,
                        seed: int = 0) -> dict:
    """`count` JPEG photos in a Kaggle-layout Flickr8k folder: the layout of `ndclip.layouts`, its small pictures
    replaced by photos. `size` is (width, height); with `portrait_every`, every such photo is rotated to portrait.
    Returns a summary."""
    folder = Path(folder)
    write_kaggle_flickr8k(folder, count)
    sizes = []
    for number, name in enumerate(read_kaggle_captions(folder / "captions.txt")):
        width, height = size
        if portrait_every and number % portrait_every == portrait_every - 1:
            width, height = height, width
        buffer = io.BytesIO()
        smooth_photo(seed * 100_003 + number, width, height).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        (folder / "Images" / name).write_bytes(buffer.getvalue())
        sizes.append(len(buffer.getvalue()))
    return {"images": count, "photo_size": list(size), "portrait_every": portrait_every,
            "jpeg_quality": JPEG_QUALITY, "mean_file_bytes": round(statistics.mean(sizes))}


def read_captions(data_dir) -> list[str]:
    """Every caption of a Kaggle-layout folder (to train the tokenizer on), grouped by image."""
    by_image = read_kaggle_captions(Path(data_dir) / "captions.txt")
    return [caption for captions in by_image.values() for caption in captions]


def train_tokenizer(data_dir):
    """A WordPiece tokenizer trained on the folder's captions."""
    return train_wordpiece_tokenizer(read_captions(data_dir), vocab_size=VOCAB_SIZE)


def prepare_data(workdir: Path, images: int, seed: int, data_dir=None):
    """The data folder (`data_dir`, or `images` photos generated under `workdir`), its train split (images left
    encoded, as run_clip.py reads them), the tokenizer trained on its captions, and a summary."""
    data_info = {"data_dir": str(data_dir)} if data_dir else None
    data_dir = Path(data_dir) if data_dir else workdir / "flickr8k_like"
    if data_info is None:
        data_info = write_flickr8k_like(data_dir, images, seed=seed)
    started = time.perf_counter()
    dataset = load_image_caption_dataset(data_dir=str(data_dir), seed=seed, cache_dir=str(workdir / "hf_cache"))
    data_info["load_image_caption_dataset_s"] = time.perf_counter() - started
    data_info["train_images"] = len(dataset["train"])
    return data_dir, without_image_decoding(dataset["train"]), train_tokenizer(data_dir), data_info
