"""Tiny image-caption data written in the formats the real sources use, for the data and training tests:
the `jxie/flickr8k` parquet layout, the Kaggle and the original Flickr8k folders, csv/json files, an imagefolder,
and a folder of every kind of broken sample."""

import io
import json
import os

import numpy as np
from datasets import ClassLabel, Dataset, Image
from PIL import Image as PILImage

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
ANIMALS = ["dog", "cat", "horse", "bird", "child", "man", "woman", "boy"]


def captions_of(image_number: int) -> list[str]:
    """Five captions naming the image's number, so a caption's image can be told from its text."""
    colour, animal = COLOURS[image_number % 8], ANIMALS[image_number % 8]
    return [
        f"photo {image_number} a {colour} {animal} runs",
        f"photo {image_number} the {animal} is {colour}",
        f"photo {image_number} a {animal} plays , near the sea",
        f"photo {image_number} one {colour} {animal} sits on the grass",
        f"photo {image_number} an {animal}",
    ]


def picture(seed: int, size=(24, 32), mode: str = "RGB") -> PILImage.Image:
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    array = np.random.default_rng(seed).integers(0, 256, size=(*size, channels), dtype=np.uint8)
    return PILImage.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def encoded(image: PILImage.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_images(folder, names, image_format="JPEG") -> None:
    os.makedirs(folder, exist_ok=True)
    for number, name in enumerate(names):
        picture(number).save(os.path.join(folder, name), format=image_format)


def write_kaggle_flickr8k(folder, count: int) -> None:
    """`Images/` + `captions.txt`: csv with header image,caption; captions with a comma are quoted."""
    names = [f"{1000 + n}_abc.jpg" for n in range(count)]
    write_images(folder / "Images", names)
    lines = ["image,caption"]
    for number, name in enumerate(names):
        lines += [f'{name},"{caption}"' if "," in caption else f"{name},{caption}" for caption in captions_of(number)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")


BOGUS_FLICKR8K_NAME = "2258277193_586949ec62.jpg.1"


def write_original_flickr8k(folder, image_dir: str, split_sizes=(4, 2, 2)) -> list[str]:
    """The original release: images, Flickr8k.token.txt (with the real file's bogus image name) and split lists."""
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
    """The `jxie/flickr8k` schema (image bytes + caption_0..caption_4) as parquet files in the Hub's data/ layout."""
    first = 0
    for split, size in sizes.items():
        numbers = range(first, first + size)
        first += size
        table = {"image": [{"bytes": encoded(picture(n), "JPEG"), "path": f"{n}.jpg"} for n in numbers]}
        table.update({f"caption_{k}": [captions_of(n)[k] for n in numbers] for k in range(5)})
        rows = Dataset.from_dict(table).cast_column("image", Image())
        if with_label:
            rows = rows.add_column("label", [n % 2 for n in numbers]).cast_column("label", ClassLabel(names=["even", "odd"]))
        os.makedirs(os.path.join(folder, "data"), exist_ok=True)
        rows.to_parquet(os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))


def write_csv_one_caption_per_row(folder, count: int) -> str:
    """`train.csv` with `image_path,caption` rows (one caption per row) and images under `pictures/`."""
    names = [f"{n}.png" for n in range(count)]
    write_images(os.path.join(folder, "pictures"), names, image_format="PNG")
    rows = [(f"pictures/{names[n]}", captions_of(n)[k]) for k in range(5) for n in range(count)]
    path = os.path.join(folder, "train.csv")
    Dataset.from_dict({"image_path": [r[0] for r in rows], "caption": [r[1] for r in rows]}).to_csv(path)
    return path


def write_jsonl_caption_lists(folder, splits: dict[str, range]) -> dict[str, str]:
    """One `<split>.jsonl` per split with `file_name` and a `sentences` list of captions; images under `images/`."""
    write_images(os.path.join(folder, "images"), [f"{n}.png" for r in splits.values() for n in r], image_format="PNG")
    paths = {}
    for split, numbers in splits.items():
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        with open(paths[split], "w") as file:
            for n in numbers:
                file.write(json.dumps({"file_name": f"images/{n}.png", "sentences": captions_of(n)}) + "\n")
    return paths


def write_imagefolder(folder, count: int) -> None:
    """An `imagefolder` with its captions in `metadata.csv` (`file_name,text`)."""
    write_images(folder, [f"{n}.png" for n in range(count)], image_format="PNG")
    lines = ["file_name,text"] + [f'{n}.png,"{captions_of(n)[2]}"' for n in range(count)]
    with open(os.path.join(folder, "metadata.csv"), "w") as file:
        file.write("\n".join(lines) + "\n")


def write_messy_images(folder) -> list[str]:
    """Good images in every colour mode and each kind of broken file; returns the file names (one is missing)."""
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
