"""`ndclip shards`: write an image-caption source as webdataset tar shards (or parquet shards) for streaming training.

    ndclip shards --data_dir ~/data/Flickr8k --output_dir shards/flickr8k --samples_per_shard 1000
    ndclip shards --dataset_name jxie/flickr8k --output_dir shards/jxie --num_shards 8 --splits train
    ndclip shards --train_file captions.csv --output_dir shards/mine --max_shard_bytes 256MB --format parquet

Any source that `run_clip.py` reads (a Hub dataset, the local Flickr8k layouts, csv/json/parquet files, an
imagefolder) is loaded through `ndclip.data.load_image_caption_dataset`, which drops and counts the bad samples, and
each split is written to `OUTPUT/SPLIT/`:

    00000.tar, 00001.tar, ...   img2dataset's layout: per sample `KEY.jpg` (or .png, .webp...: the original encoded
                                bytes, not re-encoded, with the extension of their format), `KEY.txt` (the first
                                caption) and `KEY.json` ({"key", "image_id", "captions", "file_name", "label"...})
    index.json                  {"format", "source" (the options that name it, and the split), "total_samples",
                                "shards": {"00000.tar": count, ...}, "dropped_samples": {reason: count}}; written last

KEY is the sample's number in the split, zero-padded to 9 digits: unique across the split's shards, in write order.
`image_id` is the row's id in the map-style split, so a sample can be traced back to its source. With `--format
parquet` the shards are `00000.parquet` files with columns `image` ({"bytes", "path"}), `captions`, `image_id` and
`key`. Shards hold `--samples_per_shard` samples, or stop before `--max_shard_bytes`, or the split is cut into
`--num_shards` shards whose sizes differ by one at most (pick a multiple of the number of training processes times
DataLoader workers; see `ndclip.streaming`). A shard is written under a temporary name and renamed when complete,
and the index is written (then renamed) only once every shard is: a crash leaves no index and no partial shard.
"""

import argparse
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator

import PIL.Image
from datasets import Dataset, Features, Image, List, Value

from ndclip.data import add_source_arguments, load_image_caption_dataset, without_image_decoding
from ndclip.inference import BadInputError

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SHARD_FORMATS = {"webdataset": ".tar", "parquet": ".parquet"}
KEY_DIGITS = 9
# The file extension of each image format the streams read (`ndclip.streaming.WEBDATASET_IMAGE_FIELDS`).
FORMAT_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
PARQUET_FEATURES = Features(
    {"image": Image(), "captions": List(Value("string")), "image_id": Value("int64"), "key": Value("string")}
)
_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def write_source_shards(
    output_dir,
    splits=None,
    samples_per_shard=None,
    max_shard_bytes=None,
    num_shards=None,
    shard_format="webdataset",
    overwrite=False,
    **source,
) -> dict[str, dict]:
    """Load a source with `load_image_caption_dataset(**source)` (its `dataset_name`, `data_dir`, `train_file`...)
    and write each of its `splits` (default: all) with `write_shards` to `output_dir/SPLIT`. Returns {split: index}."""
    dataset = load_image_caption_dataset(**source)
    dropped = getattr(dataset, "dropped_samples", {})
    splits = list(dataset) if splits is None else splits
    unknown = [split for split in splits if split not in dataset]
    if unknown:
        raise ValueError(f"The source has no split {', '.join(unknown)}; its splits are {list(dataset)}")
    described = {name: value for name, value in source.items() if value is not None}
    return {
        split: write_shards(
            dataset[split],
            os.path.join(output_dir, split),
            samples_per_shard=samples_per_shard,
            max_shard_bytes=max_shard_bytes,
            num_shards=num_shards,
            shard_format=shard_format,
            description={**described, "split": split},
            dropped_samples=dict(dropped.get(split, {})),
            overwrite=overwrite,
        )
        for split in splits
    }


def write_shards(
    dataset: Dataset,
    folder,
    samples_per_shard=None,
    max_shard_bytes=None,
    num_shards=None,
    shard_format="webdataset",
    description=None,
    dropped_samples=None,
    overwrite=False,
) -> dict:
    """Write the rows of `dataset` (the map-style schema: `image`, `captions`, `image_id`[, `label`]) as shards in
    `folder`, and the index; return the index.

    Shard size: `samples_per_shard` and/or `max_shard_bytes` (a shard is closed before the sample that would make it
    larger, but holds one sample at least; the tar's headers count, its end padding of up to 10 KiB does not, and a
    parquet shard, compressed, comes out smaller), or `num_shards` (sizes as equal as they can be). The default is
    1000 samples per shard. `folder` must be empty or absent; with `overwrite` its shards and index are removed first
    (the index before the shards). `description` (the source) and `dropped_samples` ({reason: count}) go in the
    index.
    """
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"Unknown shard format '{shard_format}'; use one of {sorted(SHARD_FORMATS)}")
    sizes = _shard_plan(len(dataset), samples_per_shard, max_shard_bytes, num_shards)
    _prepare_folder(folder, overwrite)
    writer = _write_tar if shard_format == "webdataset" else _write_parquet
    shards = {}
    for shard_number, samples in enumerate(_shards_of(_samples_of(dataset), sizes, max_shard_bytes)):
        name = f"{shard_number:05d}{SHARD_FORMATS[shard_format]}"
        _write_atomically(os.path.join(folder, name), lambda path, samples=samples: writer(path, samples))
        shards[name] = len(samples)
    index = {
        "format": shard_format,
        "source": description or {},
        "total_samples": sum(shards.values()),
        "shards": shards,
        "dropped_samples": dropped_samples or {},
    }
    _write_atomically(os.path.join(folder, INDEX_FILE), lambda path: _write_json(path, index))
    logger.info("Wrote %d samples in %d %s shards to %s", index["total_samples"], len(shards), shard_format, folder)
    return index


def _shard_plan(total, samples_per_shard, max_shard_bytes, num_shards):
    """`sizes(shard_number)`: the most samples that shard may hold."""
    if num_shards is not None:
        if samples_per_shard is not None or max_shard_bytes is not None:
            raise ValueError("Give either num_shards, or samples_per_shard and/or max_shard_bytes")
        if not 0 < num_shards <= max(total, 1):
            raise ValueError(f"num_shards must be between 1 and the number of samples ({total}), got {num_shards}")
        base, extra = divmod(total, num_shards)
        return lambda shard_number: base + (1 if shard_number < extra else 0)
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be 1 or more, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be 1 or more, got {max_shard_bytes}")
    if samples_per_shard is None:
        samples_per_shard = total if max_shard_bytes is not None else 1000
    return lambda shard_number: samples_per_shard


def _prepare_folder(folder, overwrite) -> None:
    if os.path.isdir(folder) and os.listdir(folder):
        if not overwrite:
            raise ValueError(f"{folder} is not empty; pass --overwrite to replace the shards in it")
        index = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index):
            os.remove(index)  # first: a folder without its index is never mistaken for a complete one
        for name in os.listdir(folder):
            if os.path.splitext(name)[1] in SHARD_FORMATS.values():
                os.remove(os.path.join(folder, name))
    os.makedirs(folder, exist_ok=True)


def _shards_of(samples: Iterator[dict], sizes, max_bytes) -> Iterator[list[dict]]:
    """The samples grouped into shards: at most `sizes(shard_number)` samples, and under `max_bytes` unless one
    sample alone is larger."""
    shard, size, shard_number = [], 0, 0
    for sample in samples:
        sample_size = _tar_footprint(sample)
        too_large = max_bytes is not None and size + sample_size > max_bytes
        if shard and (len(shard) >= sizes(shard_number) or too_large):
            yield shard
            shard, size, shard_number = [], 0, shard_number + 1
        shard.append(sample)
        size += sample_size
    if shard:
        yield shard


def _tar_footprint(sample: dict) -> int:
    """The bytes a sample takes in a tar shard: per file, a 512-byte header and the contents padded to 512 bytes."""
    metadata = sample["metadata"]
    contents = [sample["image_bytes"], metadata["captions"][0].encode(), _json_bytes(metadata)]
    return sum(512 + -(-len(data) // 512) * 512 for data in contents)


def _json_bytes(metadata: dict) -> bytes:
    return json.dumps(metadata, ensure_ascii=False).encode("utf-8")


def _samples_of(dataset: Dataset) -> Iterator[dict]:
    """The rows of a map-style split as shard samples: each image's original bytes and extension, and its
    metadata; KEY numbers the samples in order."""
    for number, row in enumerate(without_image_decoding(dataset)):
        image = row["image"]
        data = image["bytes"]
        if data is None:
            with open(image["path"], "rb") as file:
                data = file.read()
        data, extension = _bytes_and_extension(data, image.get("path"))
        metadata = {
            "key": f"{number:0{KEY_DIGITS}d}",
            "image_id": int(row["image_id"]),
            "captions": list(row["captions"]),
            "file_name": os.path.basename(image["path"]) if image.get("path") else None,
        }
        if "label" in row:
            metadata["label"] = row["label"]
        yield {"image_bytes": data, "extension": extension, "metadata": metadata}


def _bytes_and_extension(data: bytes, path) -> tuple[bytes, str]:
    """The image file's bytes as they are, with the extension of their format (told by PIL from the bytes, not the
    file name). A format the streams do not read as an image (outside `FORMAT_EXTENSIONS`) is re-encoded as PNG,
    losslessly, with a warning."""
    with PIL.Image.open(io.BytesIO(data)) as picture:
        image_format = picture.format
        if image_format in FORMAT_EXTENSIONS:
            return data, FORMAT_EXTENSIONS[image_format]
        logger.warning("%s: a %s image; written as PNG (shards hold %s)", path, image_format, sorted(FORMAT_EXTENSIONS))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue(), "png"


def _write_tar(path, samples: list[dict]) -> None:
    """One webdataset shard: KEY.EXT, KEY.txt, KEY.json per sample, in this order, with fixed file attributes so
    that the same data gives the same bytes."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            metadata = sample["metadata"]
            key = metadata["key"]
            _add_to_tar(tar, f"{key}.{sample['extension']}", sample["image_bytes"])
            _add_to_tar(tar, f"{key}.txt", metadata["captions"][0].encode("utf-8"))
            _add_to_tar(tar, f"{key}.json", _json_bytes(metadata))


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _write_parquet(path, samples: list[dict]) -> None:
    """One parquet shard: `image` ({"bytes", "path": KEY.EXT}), `captions`, `image_id`, `key`[, `label`]."""
    metadata = [sample["metadata"] for sample in samples]
    table = {
        "image": [
            {"bytes": s["image_bytes"], "path": f"{m['key']}.{s['extension']}"} for s, m in zip(samples, metadata)
        ],
        "captions": [m["captions"] for m in metadata],
        "image_id": [m["image_id"] for m in metadata],
        "key": [m["key"] for m in metadata],
    }
    features = PARQUET_FEATURES
    if "label" in metadata[0]:
        table["label"] = [m["label"] for m in metadata]
        features = Features({**features, "label": Value("int64")})
    Dataset.from_dict(table, features=features).to_parquet(path)


def _write_atomically(path, write) -> None:
    """`write(temporary_path)`, then the file renamed to `path`: it exists only once complete."""
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write_json(path, value) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")


# --------------------------------------------------------------------------------------------------------------
# Reading the index
# --------------------------------------------------------------------------------------------------------------


def read_shard_index(folder) -> dict:
    """The index of a folder of shards; a ValueError naming the folder when it has none (not written by
    `ndclip shards`, or the writing did not finish) or it does not parse."""
    path = os.path.join(folder, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise ValueError(
            f"{folder}: no {INDEX_FILE} (not written by `ndclip shards`, or the writing stopped)"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def indexed_sample_count(shard_files: list[str]) -> int | None:
    """The number of samples in `shard_files` by the index next to them, or None when a file is in no index (shards
    of another tool). Bad samples in shards written by `ndclip shards` were dropped before writing, so a stream of
    them yields exactly this many."""
    total, indexes = 0, {}
    for path in shard_files:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in indexes:
            try:
                indexes[folder] = read_shard_index(folder)["shards"]
            except ValueError:
                return None
        count = indexes[folder].get(os.path.basename(path))
        if count is None:
            return None
        total += count
    return total


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """ "256MB", "1.5GB", "64MiB" or a plain number of bytes -> bytes (argparse `type`)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a size: use bytes, or a number with KB, MB, GB, KiB, MiB, GiB"
        )
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip shards`: the source (as run_clip.py's data options), the output and the shard size."""
    parser.add_argument("--output_dir", required=True, help="where to write SPLIT/00000.tar ... and SPLIT/index.json")
    source = parser.add_argument_group("source (as run_clip.py reads it)")
    add_source_arguments(source)
    source.add_argument("--seed", type=int, default=42, help="draws the validation images when the source has none")
    source.add_argument("--validation_fraction", type=float, default=0.1, help="held out when no split exists")
    output = parser.add_argument_group("shards")
    output.add_argument("--splits", help="comma-separated splits to write (default: all the source has)")
    output.add_argument("--format", dest="shard_format", choices=sorted(SHARD_FORMATS), default="webdataset")
    output.add_argument("--samples_per_shard", type=int, help="samples per shard (default 1000)")
    output.add_argument(
        "--max_shard_bytes", type=parse_bytes, help="close a shard before it grows past this, e.g. 256MB"
    )
    output.add_argument(
        "--num_shards",
        type=int,
        help="cut each split into this many shards of equal size (a multiple of processes x DataLoader workers)",
    )
    output.add_argument("--overwrite", action="store_true", help="replace the shards of an existing output folder")


def run_shards(args: argparse.Namespace) -> dict[str, dict]:
    """`ndclip shards`: write the shards and print where they are; a bad source or option is a `BadInputError`."""
    if not (args.dataset_name or args.data_dir or args.train_file):
        raise BadInputError("give a source: --dataset_name, --data_dir or --train_file")
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise BadInputError(f"--data_dir {args.data_dir}: no such folder")
    for option, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        if path and not os.path.isfile(path):
            raise BadInputError(f"{option} {path}: no such file")
    try:
        indexes = write_source_shards(
            args.output_dir,
            splits=args.splits.split(",") if args.splits else None,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            num_shards=args.num_shards,
            shard_format=args.shard_format,
            overwrite=args.overwrite,
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            data_dir=args.data_dir,
            train_file=args.train_file,
            validation_file=args.validation_file,
            image_column=args.image_column,
            caption_column=args.caption_column,
            seed=args.seed,
            validation_fraction=args.validation_fraction,
        )
    except ValueError as error:  # the data layer's errors name the file, column or option
        raise BadInputError(str(error)) from None
    for split, index in indexes.items():
        print(
            f"{split}: {index['total_samples']} samples in {len(index['shards'])} shards in "
            f"{os.path.join(args.output_dir, split)}"
        )
    return indexes
