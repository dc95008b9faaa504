"""Small image-caption data written in the formats of the real sources, so that the data layer (`ndclip.data`),
training (`run_clip.py`) and the benchmarks are exercised on the same files a user would bring, without a download.

Writers (each takes the folder to write into, a `str` or a `Path`): the `jxie/flickr8k` parquet layout of the Hub
(`write_hub_parquet`), the Kaggle Flickr8k download (`write_kaggle_flickr8k`), the original Flickr8k release
(`write_original_flickr8k`), a csv with one caption per row (`write_csv_one_caption_per_row`), jsonl files with a
list of captions per image (`write_jsonl_caption_lists`), an imagefolder with a metadata.csv (`write_imagefolder`),
a folder of every kind of image the data layer must keep or drop (`write_messy_images`), and webdataset tar shards
as img2dataset writes them (`write_img2dataset_shards`, on `write_tar_shard`).

Every image is a picture of random pixels drawn from its number (`picture`), and its five captions name that number
(`captions_of`), so a test can tell from a caption which image it belongs to.
"""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Image
from PIL import Image as PILImage

# An image name that the real Flickr8k.token.txt captions but the release has no file for; the original layout
# writes its captions too, so that the loader's skipping of absent images is exercised.
BOGUS_FLICKR8K_NAME = "2258277193_586949ec62.jpg.1"

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
_ANIMALS = ["dog", "cat", "horse", "bird", "child", "man", "woman", "boy"]


def captions_of(image_number: int) -> list[str]:
    """Five captions naming the image's number (as their second word), one with a comma (quoted in csv files)."""
    colour, animal = _COLOURS[image_number % 8], _ANIMALS[image_number % 8]
    return [
        f"photo {image_number} a {colour} {animal} runs",
        f"photo {image_number} the {animal} is {colour}",
        f"photo {image_number} a {animal} plays , near the sea",
        f"photo {image_number} one {colour} {animal} sits on the grass",
        f"photo {image_number} an {animal}",
    ]


def picture(seed: int, size: tuple[int, int] = (24, 32), mode: str = "RGB") -> PILImage.Image:
    """Random pixels drawn from `seed`; `size` is (height, width); `mode` one of RGB, RGBA, CMYK, L."""
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    array = np.random.default_rng(seed).integers(0, 256, size=(*size, channels), dtype=np.uint8)
    return PILImage.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def encoded(image: PILImage.Image, image_format: str = "PNG") -> bytes:
    """The image as the bytes of a file of `image_format`."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_images(folder, names: list[str], image_format: str = "JPEG") -> None:
    """`picture(n)` saved as `folder/names[n]`."""
    os.makedirs(folder, exist_ok=True)
    for number, name in enumerate(names):
        picture(number).save(os.path.join(folder, name), format=image_format)


def write_kaggle_flickr8k(folder, count: int) -> None:
    """`Images/` + `captions.txt`: csv with header image,caption; captions with a comma are quoted."""
    folder = Path(folder)
    names = [f"{1000 + n}_abc.jpg" for n in range(count)]
    write_images(folder / "Images", names)
    lines = ["image,caption"]
    for number, name in enumerate(names):
        lines += [f'{name},"{caption}"' if "," in caption else f"{name},{caption}" for caption in captions_of(number)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")


def write_original_flickr8k(folder, image_dir: str, split_sizes=(4, 2, 2)) -> list[str]:
    """The original release: images under `image_dir` (relative to `folder`), and in `Flickr8k_text/` the token file
    (with the captions of `BOGUS_FLICKR8K_NAME`) and the train/dev/test lists of `split_sizes` images. Returns the
    image names, in the order of the split lists."""
    folder = Path(folder)
    names = [f"{2000 + n}_def.jpg" for n in range(sum(split_sizes))]
    write_images(folder / image_dir, names)
    text_dir = folder / "Flickr8k_text"
    text_dir.mkdir()
    lines = [f"{name}#{k}\t{caption}" for n, name in enumerate(names) for k, caption in enumerate(captions_of(n))]
    lines += [f"{BOGUS_FLICKR8K_NAME}#{k}\tA man in a blue shirt ." for k in range(5)]
    (text_dir / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    ends = np.cumsum(split_sizes)
    for list_name, start, end in zip(["train", "dev", "test"], [0, *ends[:-1]], ends):
        (text_dir / f"Flickr_8k.{list_name}Images.txt").write_text("\n".join(names[start:end]) + "\n")
    return names


def write_hub_parquet(folder, sizes: dict[str, int], with_label: bool = True) -> None:
    """The `jxie/flickr8k` schema (image bytes + caption_0..caption_4) as parquet files in the Hub's data/ layout,
    one per split of `sizes` {split: number of images}; images are numbered on across the splits. With `with_label`,
    a ClassLabel `label` (the image number's parity, "even"/"odd") as a zero-shot set has."""
    first = 0
    for split, size in sizes.items():
        numbers = range(first, first + size)
        first += size
        table = {"image": [{"bytes": encoded(picture(n), "JPEG"), "path": f"{n}.jpg"} for n in numbers]}
        table.update({f"caption_{k}": [captions_of(n)[k] for n in numbers] for k in range(5)})
        rows = Dataset.from_dict(table).cast_column("image", Image())
        if with_label:
            labels = ClassLabel(names=["even", "odd"])
            rows = rows.add_column("label", [n % 2 for n in numbers]).cast_column("label", labels)
        os.makedirs(os.path.join(folder, "data"), exist_ok=True)
        rows.to_parquet(os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))


def write_csv_one_caption_per_row(folder, count: int) -> str:
    """`train.csv` with `image_path,caption` rows (one caption per row) and images under `pictures/`; returns the
    csv's path."""
    names = [f"{n}.png" for n in range(count)]
    write_images(os.path.join(folder, "pictures"), names, image_format="PNG")
    rows = [(f"pictures/{names[n]}", captions_of(n)[k]) for k in range(5) for n in range(count)]
    path = os.path.join(folder, "train.csv")
    Dataset.from_dict({"image_path": [r[0] for r in rows], "caption": [r[1] for r in rows]}).to_csv(path)
    return path


def write_jsonl_caption_lists(folder, splits: dict[str, range]) -> dict[str, str]:
    """One `<split>.jsonl` per split of `splits` {split: image numbers} with `file_name` and a `sentences` list of
    captions; images under `images/`. Returns {split: path of its file}."""
    write_images(os.path.join(folder, "images"), [f"{n}.png" for r in splits.values() for n in r], image_format="PNG")
    paths = {}
    for split, numbers in splits.items():
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        with open(paths[split], "w") as file:
            for n in numbers:
                file.write(json.dumps({"file_name": f"images/{n}.png", "sentences": captions_of(n)}) + "\n")
    return paths


def write_imagefolder(folder, count: int) -> None:
    """An `imagefolder` with one caption per image (the third of `captions_of`) in `metadata.csv` (`file_name,text`)."""
    write_images(folder, [f"{n}.png" for n in range(count)], image_format="PNG")
    lines = ["file_name,text"] + [f'{n}.png,"{captions_of(n)[2]}"' for n in range(count)]
    with open(os.path.join(folder, "metadata.csv"), "w") as file:
        file.write("\n".join(lines) + "\n")


def write_messy_images(folder) -> list[str]:
    """Good images in every colour mode the transforms convert (RGB, greyscale, RGBA, CMYK, palette), then one of
    each kind of broken file (truncated JPEG, zeroed PNG, text named .jpg, a name with no file) and a good image meant
    to be given no caption. Returns the ten file names in that order; "missing.jpg" is not written."""
    os.makedirs(folder, exist_ok=True)
    picture(1).save(os.path.join(folder, "good.jpg"))
    picture(2, mode="L").save(os.path.join(folder, "gray.png"))
    picture(3, mode="RGBA").save(os.path.join(folder, "rgba.png"))
    picture(4, mode="CMYK").save(os.path.join(folder, "cmyk.jpg"))
    picture(5).convert("P", palette=PILImage.Palette.ADAPTIVE).save(os.path.join(folder, "palette.png"))
    jpeg = encoded(picture(6), "JPEG")
    with open(os.path.join(folder, "truncated.jpg"), "wb") as file:
        file.write(jpeg[: len(jpeg) // 2])
    png = encoded(picture(7), "PNG")
    with open(os.path.join(folder, "corrupt.png"), "wb") as file:
        file.write(png[:60] + bytes(len(png) - 60))
    with open(os.path.join(folder, "notes.jpg"), "w") as file:
        file.write("these are not the pixels you are looking for")
    picture(8).save(os.path.join(folder, "uncaptioned.jpg"))
    return ["good.jpg", "gray.png", "rgba.png", "cmyk.jpg", "palette.png", "truncated.jpg", "corrupt.png",
            "notes.jpg", "missing.jpg", "uncaptioned.jpg"]


def write_tar_shard(path, samples: list[dict]) -> None:
    """A webdataset tar shard: each sample is {"__key__": KEY, EXT: content, ...}, written as files KEY.EXT in that
    order; content is bytes, a str (UTF-8) or a dict (JSON)."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for extension, content in sample.items():
                if extension == "__key__":
                    continue
                if isinstance(content, dict):
                    content = json.dumps(content)
                data = content.encode("utf-8") if isinstance(content, str) else content
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_img2dataset_shards(folder, shard_sizes: list[int]) -> list[dict]:
    """Shards `00000.tar`... of `shard_sizes` samples as img2dataset writes them: `KEY.jpg`, `KEY.txt` (one caption)
    and `KEY.json` ({"key", "caption", "status", "url"...}), KEY = shard number and position (`000010003`). Image n
    (numbered across the shards) is `picture(n)` with caption `captions_of(n)[0]`. Returns the samples written."""
    os.makedirs(folder, exist_ok=True)
    written, number = [], 0
    for shard, size in enumerate(shard_sizes):
        samples = []
        for position in range(size):
            key = f"{shard:05d}{position:04d}"
            caption = captions_of(number)[0]
            metadata = {"key": key, "caption": caption, "status": "success", "url": f"https://example.com/{number}.jpg"}
            samples.append({"__key__": key, "jpg": encoded(picture(number), "JPEG"), "txt": caption, "json": metadata})
            number += 1
        write_tar_shard(os.path.join(folder, f"{shard:05d}.tar"), samples)
        written += samples
    return written
