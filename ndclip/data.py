"""Image-caption data for NdCLIP training: sources, normalisation to one schema, bad-sample filtering, splitting.

Every source ends up in one schema, one row per image:

    image     datasets.Image()                 decoded lazily (PIL) when a row is read
    captions  List(Value("string"))            all non-empty captions of the image
    image_id  Value("int64")                   0..n-1 within the split, after bad samples are dropped
    label     ClassLabel                       only when the source has a ClassLabel `label` (zero-shot eval)

Sources (see `load_image_caption_dataset`): a Hub dataset such as `jxie/flickr8k`, local csv/json/parquet files,
an `imagefolder` with captions in its metadata, and the two common local Flickr8k downloads (Kaggle's
`Images/` + `captions.txt`, and the original `Flickr8k_Dataset/` + `Flickr8k_text/`). Everything goes through the
`datasets` library, so the expensive steps (decoding every image once to find the broken ones) are cached.
The image transforms and collators that turn these rows into model inputs are in `ndclip.transforms`.
"""

import codecs
import csv
import io
import logging
import os
import re
from collections import Counter, defaultdict
from functools import partial

import numpy as np
import PIL.Image
import pyarrow as pa
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    LargeList,
    List,
    Sequence,
    Value,
    concatenate_datasets,
    load_dataset,
)
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import ImageFile

from ndclip.transforms import encoded_image_source

logger = logging.getLogger(__name__)

# Why these names: the columns that image-caption datasets on the Hub and in the wild use for captions and images.
CAPTION_COLUMN_CANDIDATES = ("captions", "caption", "sentences", "sentence", "texts", "text", "raw", "description")
IMAGE_PATH_COLUMN_CANDIDATES = ("image_path", "image_file", "file_name", "filename", "filepath", "file_path", "path")
NUMBERED_CAPTION_COLUMN = re.compile(r"^(?:caption|text|sentence)s?_?(\d+)$")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
DATA_FILE_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
CAPTIONS_FEATURE = List(Value("string"))
EXAMPLES_IN_LOG = 5  # offending names shown per reason

# Reasons a row is dropped, as counted by `drop_unusable_samples`.
MISSING_FILE = "missing_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
NO_CAPTION = "no_caption"
OUTSIDE_DATA_FOLDER = "outside_data_folder"
UNUSABLE_REASONS = (MISSING_FILE, NOT_AN_IMAGE, CORRUPT_IMAGE, NO_CAPTION, OUTSIDE_DATA_FOLDER)

# The original Flickr8k release; its image folder is spelled "Flicker8k_Dataset" in the official zip.
FLICKR8K_IMAGE_DIRS = ("Flickr8k_Dataset", "Flicker8k_Dataset")
FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


class DatasetDownloadError(RuntimeError):
    """A Hub dataset could not be downloaded (offline, or the Hub is unreachable)."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def add_source_arguments(group, default_dataset_name: str | None = None) -> None:
    """The options that name an image-caption source, as `load_image_caption_dataset` takes them: the one set shared
    by `run_clip.py` and `ndclip shards`, so that both read the same sources the same way."""
    group.add_argument("--dataset_name", default=default_dataset_name, help="A Hub dataset or a local dataset folder.")
    group.add_argument("--dataset_config_name")
    group.add_argument("--data_dir", help="A local Flickr8k folder (either layout) or an imagefolder.")
    group.add_argument("--train_file", help="csv, json or parquet with an image and caption(s) per row.")
    group.add_argument("--validation_file")
    group.add_argument("--image_column")
    group.add_argument("--caption_column")


def load_image_caption_dataset(
    dataset_name=None,
    dataset_config_name=None,
    data_dir=None,
    train_file=None,
    validation_file=None,
    image_column=None,
    caption_column=None,
    seed=42,
    validation_fraction=0.1,
    cache_dir=None,
    num_proc=None,
) -> DatasetDict:
    """Load an image-caption dataset as splits "train", "validation" (and "test" when the source has one).

    Sources, in order of precedence (local data wins over `dataset_name`):
      - `data_dir`: a Kaggle Flickr8k download (`Images/` + `captions.txt`), the original Flickr8k release
        (`Flickr8k_Dataset/` or `Flicker8k_Dataset/` + `Flickr8k_text/`), or else an `imagefolder` whose
        metadata.csv/jsonl holds the captions.
      - `train_file` / `validation_file`: csv, json/jsonl or parquet files; image paths in them are resolved against
        the file's folder.
      - `dataset_name` (+ `dataset_config_name`): a Hub dataset such as `jxie/flickr8k`, or a local dataset folder.

    Captions come from `caption_column` or are detected: numbered columns (`caption_0` ... `caption_4`), a list
    column, or one string column (several rows of the same image file are then grouped into one image).
    The image column is `image_column`, else `image`, else the first Image column, else a column of file paths.

    Official splits are kept; without a validation split, "train" is split by image with `seed` and
    `validation_fraction`, so the captions of one image never straddle train and validation. Unusable rows are
    dropped from every split (see `drop_unusable_samples`), among them images read from a file outside the data
    folder (`data_dir`, or the folder of the split's `train_file` / `validation_file`); the returned DatasetDict
    carries their counts as the attribute `dropped_samples`: {split name: Counter(reason -> number of images)}, read
    it before any `.map` (which returns a new DatasetDict without it).
    """
    splits = _load_normalised_splits(
        dataset_name, dataset_config_name, data_dir, train_file, validation_file, image_column, caption_column,
        cache_dir, num_proc,
    )
    usable, dropped_samples = {}, {}
    for split_name, split in splits.items():
        data_folder = _data_folder(split_name, data_dir, train_file, validation_file)
        usable[split_name], dropped_samples[split_name] = drop_unusable_samples(
            split, split_name, num_proc=num_proc, data_folder=data_folder
        )
    if "train" not in usable:
        raise ValueError(f"The data has no 'train' split to train on, only {list(usable)}")
    if "validation" not in usable:
        usable["train"], usable["validation"] = _split_by_image(usable["train"], validation_fraction, seed)
    ordered = [name for name in ("train", "validation", "test") if name in usable]
    dataset = DatasetDict({name: _number_images(usable[name]) for name in ordered})
    dataset.dropped_samples = dropped_samples
    return dataset


def _load_normalised_splits(
    dataset_name, dataset_config_name, data_dir, train_file, validation_file, image_column, caption_column,
    cache_dir, num_proc,
) -> dict[str, Dataset]:
    """The source's splits in the normalised schema (image, captions[, label]), before any cleaning."""
    if data_dir is not None:
        if _is_kaggle_flickr8k(data_dir):
            return _load_kaggle_flickr8k(data_dir, cache_dir)
        if _find_flickr8k_token_file(data_dir) is not None:
            return _load_original_flickr8k(data_dir, cache_dir)
        raw = _load_imagefolder(data_dir, cache_dir, num_proc)
        return _normalise_splits(raw, image_column, caption_column, data_dir, data_dir, cache_dir, num_proc)
    if train_file is not None:
        files = {"train": train_file, "validation": validation_file}
        return {
            split_name: _normalise_split(
                _load_data_file(path, cache_dir), image_column, caption_column, os.path.dirname(os.path.abspath(path)),
                path, cache_dir, num_proc,
            )
            for split_name, path in files.items()
            if path is not None
        }
    if validation_file is not None:
        raise ValueError("`validation_file` needs a `train_file` too")
    if dataset_name is not None:
        raw = _load_hub_dataset(dataset_name, dataset_config_name, cache_dir, num_proc)
        return _normalise_splits(raw, image_column, caption_column, None, dataset_name, cache_dir, num_proc)
    raise ValueError("Give a `dataset_name`, a `data_dir`, or a `train_file` to load image-caption data from")


def _data_folder(split_name, data_dir, train_file, validation_file) -> str | None:
    """The folder a split's image files must lie in: `data_dir`, or the folder of the split's data file (whose image
    paths are relative to it). None for a Hub dataset, whose files are wherever `datasets` stored them."""
    if data_dir is not None:
        return data_dir
    data_file = {"train": train_file, "validation": validation_file}.get(split_name)
    return os.path.dirname(os.path.abspath(data_file)) if data_file is not None else None


def _load_hub_dataset(dataset_name, dataset_config_name, cache_dir, num_proc) -> DatasetDict:
    """`load_dataset` with one clear error instead of a long traceback when the Hub cannot be reached."""
    try:
        return load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, num_proc=num_proc)
    except (ConnectionError, LocalEntryNotFoundError) as error:  # datasets/huggingface_hub offline errors
        raise DatasetDownloadError(
            f"Could not download the dataset '{dataset_name}' from the Hugging Face Hub ({error}). This machine is "
            "offline or cannot reach the Hub (and the dataset is not in the local cache). To train offline, use "
            "local data: --data_dir FOLDER (a Flickr8k download, or an imagefolder with captions in metadata.csv), "
            "--train_file/--validation_file (csv, json or parquet), or --preset demo (generated data)."
        ) from None


def _load_data_file(path, cache_dir) -> Dataset:
    """One local csv/json/parquet file as a Dataset; a file that does not parse, or a csv/json file that is not
    UTF-8, is a ValueError naming it (and the line, where the parser or `_read_utf8_text` finds it)."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in DATA_FILE_BUILDERS:
        raise ValueError(f"{path}: unsupported data file type '.{extension}'; use one of {sorted(DATA_FILE_BUILDERS)}")
    builder = DATA_FILE_BUILDERS[extension]
    try:
        dataset = load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
        if builder == "json":
            # pyarrow's json reader stores bytes that are not UTF-8 in string columns unchecked: reading them later
            # would raise a UnicodeDecodeError that names nothing.
            dataset.data.validate(full=True)
        return dataset
    except (DatasetGenerationError, pa.ArrowInvalid) as error:
        cause = error.__cause__ or error
        if builder != "parquet" and isinstance(cause, (UnicodeDecodeError, pa.ArrowInvalid)):
            _read_utf8_text(path)  # raises the error that names the line and byte, when the file is not UTF-8
        # The parser's own message (e.g. pandas' "Expected 2 fields in line 3, saw 3") names the line.
        raise ValueError(f"{path}: could not be read as {extension}: {cause}") from error


def _load_imagefolder(data_dir, cache_dir, num_proc) -> DatasetDict:
    """`load_dataset("imagefolder")`, with its errors turned into ValueErrors naming the folder or file: a metadata
    file that is not UTF-8 (pandas' UnicodeDecodeError names no file), and a metadata `file_name` outside the folder
    (datasets refuses the whole folder, under a "DatasetGenerationError" traceback)."""
    try:
        return load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir, num_proc=num_proc)
    except (UnicodeDecodeError, DatasetGenerationError) as error:
        cause = error.__cause__ or error
        if isinstance(cause, UnicodeDecodeError):
            for path in _text_metadata_files(data_dir):
                _read_utf8_text(path)  # raises the error that names the file, line and byte
        raise ValueError(f"{data_dir}: could not be read as an imagefolder: {cause}") from error


def _text_metadata_files(data_dir) -> list[str]:
    return [
        os.path.join(folder, name)
        for folder, _, names in os.walk(data_dir)
        for name in names
        if name in ("metadata.csv", "metadata.jsonl")
    ]


# --------------------------------------------------------------------------------------------------------------
# Normalising any table of images and captions to one row per image
# --------------------------------------------------------------------------------------------------------------


def _normalise_splits(raw: DatasetDict, image_column, caption_column, base_dir, source, cache_dir, num_proc):
    return {
        SPLIT_ALIASES.get(name, name): _normalise_split(
            split, image_column, caption_column, base_dir, f"{source} [{name}]", cache_dir, num_proc
        )
        for name, split in raw.items()
    }


def _normalise_split(dataset: Dataset, image_column, caption_column, base_dir, source, cache_dir, num_proc) -> Dataset:
    """One split in the normalised schema. Image columns stay Image columns (one row per image); path columns are
    resolved against `base_dir` and their rows grouped by image file."""
    image_column = find_image_column(dataset.features, image_column, source)
    caption_columns = find_caption_columns(dataset.features, caption_column, image_column, source)
    keep_label = isinstance(dataset.features.get("label"), ClassLabel) and image_column != "label"
    if _is_string(dataset.features[image_column]):
        return _group_rows_by_image_path(dataset, image_column, caption_columns, keep_label, base_dir, cache_dir)
    captions = _computed_columns(
        dataset, _gather_captions, caption_columns, Features({"captions": CAPTIONS_FEATURE}), num_proc,
        desc="Collecting captions",
    )
    images = dataset.select_columns([image_column] + (["label"] if keep_label else []))
    images = images.rename_column(image_column, "image") if image_column != "image" else images
    return concatenate_datasets([images, captions], axis=1).cast_column("image", Image())


def find_image_column(features: Features, image_column, source) -> str:
    """The column holding the images: `image_column`, else `image`, else the first Image column, else a column of
    file paths; `source` names the data in errors."""
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"{source}: no image column '{image_column}'; columns are {list(features)}")
        return _checked_image_column(features, image_column, source)
    if "image" in features:
        return _checked_image_column(features, "image", source)
    image_columns = [name for name, feature in features.items() if _is_image(feature)]
    path_columns = [name for name in IMAGE_PATH_COLUMN_CANDIDATES if _is_string(features.get(name))]
    if not image_columns + path_columns:
        raise ValueError(f"{source}: no image column found among {list(features)}; pass `image_column`")
    return (image_columns + path_columns)[0]


def _checked_image_column(features: Features, name, source) -> str:
    """`name`, if its column holds images (`datasets.Image`, {"bytes", "path"} structs, raw bytes) or file paths;
    another type is a ValueError naming it, where the cast to `Image` would fail deep inside pyarrow."""
    feature = features[name]
    if not (_is_image(feature) or _is_string(feature) or _is_binary(feature)):
        raise ValueError(
            f"{source}: the image column '{name}' holds {_type_name(feature)}, not images (encoded image bytes, or "
            "image file paths as strings); pass `image_column`"
        )
    return name


def find_caption_columns(features: Features, caption_column, image_column, source) -> list[str]:
    """The column(s) holding captions: numbered string columns (caption_0..N), a list column, or a string column."""
    if caption_column is not None:
        if caption_column in features:
            return _checked_caption_columns(features, [caption_column], source)
        numbered = _numbered_caption_columns(features, prefix=caption_column)
        if not numbered:
            raise ValueError(f"{source}: no caption column '{caption_column}'; columns are {list(features)}")
        return _checked_caption_columns(features, numbered, source)
    numbered = _numbered_caption_columns(features)
    if numbered:
        return _checked_caption_columns(features, numbered, source)
    candidates = [name for name in CAPTION_COLUMN_CANDIDATES if name in features and name != image_column]
    for name in candidates:
        if _is_string_list(features[name]) or _is_string(features[name]):
            return [name]
    if candidates:  # a caption column by its name, of another type
        return _checked_caption_columns(features, candidates[:1], source)
    raise ValueError(
        f"{source}: no caption column found among {list(features)} (looked for caption_0..N and "
        f"{', '.join(CAPTION_COLUMN_CANDIDATES)}); pass `caption_column`"
    )


def _numbered_caption_columns(features: Features, prefix=None) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}_?(\d+)$") if prefix else NUMBERED_CAPTION_COLUMN
    numbered = {int(match.group(1)): name for name in features if (match := pattern.match(name))}
    return [numbered[number] for number in sorted(numbered)]


def _checked_caption_columns(features: Features, names: list[str], source) -> list[str]:
    """`names`, if their columns hold text: strings, lists of strings, or nothing at all (a column of nulls, as json
    gives for a caption no row has); another type is a ValueError naming the column and its type, where reading it
    would fail in the middle of loading (numbers) or silently take a struct's field names as captions."""
    for name in names:
        feature = features[name]
        if not (_is_string(feature) or _is_string_list(feature) or _is_null(feature)):
            raise ValueError(
                f"{source}: the caption column '{name}' holds {_type_name(feature)}, not text (strings or lists of "
                "strings); pass `caption_column`"
            )
    return names


def _is_image(feature) -> bool:
    # Parquet files written without datasets' metadata hold images as plain {"bytes", "path"} structs.
    return isinstance(feature, Image) or (isinstance(feature, dict) and set(feature) == {"bytes", "path"})


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _is_string_list(feature) -> bool:
    return isinstance(feature, (Sequence, LargeList)) and _is_string(feature.feature)


def _is_binary(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("binary", "large_binary")


def _is_null(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype == "null"


def _type_name(feature) -> str:
    """A column's type in words for error messages: "int64", "lists of int64", "structs {raw, tokens}"."""
    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, (Sequence, LargeList)):
        return f"lists of {_type_name(feature.feature)}"
    if isinstance(feature, dict):
        return f"structs {{{', '.join(feature)}}}"
    return type(feature).__name__


def _gather_captions(*caption_columns) -> dict:
    """Batched: one list of captions per row, from one or several columns of strings or lists of strings."""
    return {"captions": [captions_of_row(values) for values in zip(*caption_columns)]}


def captions_of_row(values) -> list[str]:
    """The captions of one row, from the values of its caption columns: strings, lists of strings, or None."""
    captions = []
    for value in values:
        if isinstance(value, str):
            captions.append(value)
        elif value is not None:
            captions.extend(text for text in value if text is not None)
    return captions


def _group_rows_by_image_path(dataset, image_column, caption_columns, keep_label, base_dir, cache_dir) -> Dataset:
    """One row per image file, for tables with one caption (or a few) per row and the image as a file path."""
    columns = dataset.select_columns([image_column, *caption_columns] + (["label"] if keep_label else [])).to_dict()
    groups, labels = defaultdict(list), {}
    for row, path in enumerate(columns[image_column]):
        if path and base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        groups[path].extend(captions_of_row(columns[name][row] for name in caption_columns))
        if keep_label:
            labels.setdefault(path, columns["label"][row])
    table = {"image": list(groups), "captions": list(groups.values())}
    features = {"image": Value("string"), "captions": CAPTIONS_FEATURE}
    if keep_label:
        table["label"], features["label"] = list(labels.values()), dataset.features["label"]
    return _dataset_of_image_files(table, Features(features), cache_dir)


def _dataset_of_image_files(table: dict[str, list], features: Features, cache_dir) -> Dataset:
    """A Dataset whose "image" column holds file paths, written to the datasets cache with `from_generator` (unlike
    `from_dict`, which stays in memory) so that the image checks that follow are cached too. The files' sizes and
    modification times are part of the cache key, so a replaced or repaired image is checked again."""
    file_stamps = tuple(_file_stamp(path) for path in table["image"])
    dataset = Dataset.from_generator(
        _rows_of_table, features=features, cache_dir=cache_dir, gen_kwargs={"table": table, "file_stamps": file_stamps}
    )
    return dataset.cast_column("image", Image())


def _rows_of_table(table: dict[str, list], file_stamps):
    del file_stamps  # only part of the cache key
    for values in zip(*table.values()):
        yield dict(zip(table, values))


def _file_stamp(path):
    try:
        status = os.stat(path)
    except (OSError, TypeError):
        return None
    return status.st_size, status.st_mtime_ns


def _computed_columns(dataset, function, input_columns, features, num_proc, desc) -> Dataset:
    """Only the columns that batched `function` computes from `input_columns`.

    Why not `dataset.map`: it rewrites every column, image bytes included, into a new cache file. Computing the few
    small columns alone and joining them back with `concatenate_datasets(axis=1)` leaves the images where they are.
    """
    return dataset.select_columns(input_columns).map(
        function, batched=True, input_columns=input_columns, remove_columns=input_columns, features=features,
        num_proc=num_proc, desc=desc,
    )


# --------------------------------------------------------------------------------------------------------------
# Flickr8k folders
# --------------------------------------------------------------------------------------------------------------


def _is_kaggle_flickr8k(data_dir) -> bool:
    return os.path.isfile(os.path.join(data_dir, "captions.txt")) and os.path.isdir(os.path.join(data_dir, "Images"))


def _load_kaggle_flickr8k(data_dir, cache_dir) -> dict[str, Dataset]:
    """The Kaggle download: `Images/` and `captions.txt` (a csv with header `image,caption`). It has no official
    splits, so everything is "train" and split by image later."""
    captions = read_kaggle_captions(os.path.join(data_dir, "captions.txt"))
    image_dir = os.path.join(data_dir, "Images")
    table = {"image": [os.path.join(image_dir, name) for name in captions], "captions": list(captions.values())}
    return {"train": _dataset_of_image_files(table, _image_file_features(), cache_dir)}


def read_kaggle_captions(path) -> dict[str, list[str]]:
    """{image file name: captions} from a Kaggle-style captions.txt, a real csv: captions with commas are quoted."""
    captions = defaultdict(list)
    records = _kaggle_caption_records(path)
    _, header = next(records, (1, None))
    if header is None or [name.strip() for name in header] != ["image", "caption"]:
        raise ValueError(f"{path}, line 1: expected the header 'image,caption', found {header}")
    for line, row in records:
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(
                f"{path}, line {line}: expected 2 fields (image,caption), found {len(row)}: {row}; "
                "captions containing commas must be quoted"
            )
        captions[row[0].strip()].append(row[1])
    return captions


def _kaggle_caption_records(path):
    """(line number, fields) of each csv record of a captions.txt.

    A caption never spans lines in this format, so a record that does is a quote left open: csv would read every
    line up to the next quote (or the end of the file) into one caption. That, and what `strict` csv rejects (text
    after a closing quote), is a ValueError naming the line where the record starts, which is where the quote opens.
    """
    reader = csv.reader(_open_utf8_text(path, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if reader.line_num > start:
                raise _unclosed_quote_error(path, start, reader.line_num) from None
            message = f"{path}, line {start}: {error}; a quote inside a quoted caption must be doubled"
            raise ValueError(message) from None
        if reader.line_num > start:
            raise _unclosed_quote_error(path, start, reader.line_num)
        yield start, row


def _unclosed_quote_error(path, start, end) -> ValueError:
    return ValueError(
        f"{path}, line {start}: a quote opens here and is not closed on this line (csv would read lines {start}-{end} "
        "as one caption); close the quote, or double a quote that belongs to the caption"
    )


def _open_utf8_text(path, newline=None) -> io.StringIO:
    """A text file, read whole and decoded (see `_read_utf8_text`), as a file object with `open`'s `newline`."""
    return io.StringIO(_read_utf8_text(path), newline=newline)


def _read_utf8_text(path) -> str:
    """A text file's contents: UTF-8, with or without the byte order mark that Windows editors write. Other bytes
    are a ValueError naming the file, line and byte offset, where Python's UnicodeDecodeError names none of them."""
    with open(path, "rb") as file:
        data = file.read()
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = len(data) - len(body) + error.start
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte {offset}: 0x{data[offset]:02x}); save the file as UTF-8"
        ) from None


def _find_flickr8k_token_file(data_dir):
    for folder in (os.path.join(data_dir, "Flickr8k_text"), data_dir):
        path = os.path.join(folder, FLICKR8K_TOKEN_FILE)
        if os.path.isfile(path):
            return path
    return None


def _find_flickr8k_image_dir(data_dir) -> str:
    """The folder holding the .jpg files; the official zip nests `Flicker8k_Dataset/` (sic) inside itself."""
    for outer in FLICKR8K_IMAGE_DIRS:
        for folder in [os.path.join(data_dir, outer, inner) for inner in FLICKR8K_IMAGE_DIRS] + [
            os.path.join(data_dir, outer)
        ]:
            if os.path.isdir(folder) and any(name.lower().endswith(".jpg") for name in os.listdir(folder)):
                return folder
    raise ValueError(f"{data_dir}: found {FLICKR8K_TOKEN_FILE} but no image folder {' or '.join(FLICKR8K_IMAGE_DIRS)}")


def _load_original_flickr8k(data_dir, cache_dir) -> dict[str, Dataset]:
    """The original release: images, `Flickr8k.token.txt` and the official train/dev/test lists (6000/1000/1000)."""
    token_file = _find_flickr8k_token_file(data_dir)
    image_dir = _find_flickr8k_image_dir(data_dir)
    captions = read_flickr8k_tokens(token_file)
    _skip_captions_of_absent_images(captions, image_dir, token_file)
    split_lists = {name: os.path.join(os.path.dirname(token_file), file) for name, file in FLICKR8K_SPLIT_LISTS.items()}
    if not all(os.path.isfile(path) for path in split_lists.values()):
        logger.warning("%s: no official split lists next to %s; splitting by image", data_dir, token_file)
        split_names = {"train": list(captions)}
    else:
        split_names = {split: _read_split_list(path) for split, path in split_lists.items()}
    return {
        split: _dataset_of_image_files(
            {"image": [os.path.join(image_dir, name) for name in names], "captions": [captions[n] for n in names]},
            _image_file_features(),
            cache_dir,
        )
        for split, names in split_names.items()
    }


def read_flickr8k_tokens(path) -> dict[str, list[str]]:
    """{image file name: captions} from `name.jpg#N<TAB>caption` lines."""
    captions = defaultdict(list)
    for line_number, line in enumerate(_open_utf8_text(path), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.rstrip("\n").partition("\t")
        if not tab:
            raise ValueError(f"{path}, line {line_number}: expected 'image.jpg#N<TAB>caption', found {line!r}")
        captions[key.rsplit("#", 1)[0].strip()].append(caption)
    return captions


def _skip_captions_of_absent_images(captions: dict[str, list[str]], image_dir, token_file):
    """Drop (in place) and log the captions of images that are not in `image_dir`; the real token file names one
    such image, `2258277193_586949ec62.jpg.1`."""
    present = set(os.listdir(image_dir))
    absent = [name for name in captions if name not in present]
    if absent:
        lines = sum(len(captions.pop(name)) for name in absent)
        logger.warning(
            "%s: skipped %d caption lines of %d images that are not in %s: %s",
            token_file, lines, len(absent), image_dir, ", ".join(absent[:EXAMPLES_IN_LOG]),
        )


def _read_split_list(path) -> list[str]:
    return [line.strip() for line in _open_utf8_text(path) if line.strip()]


def _image_file_features() -> Features:
    return Features({"image": Value("string"), "captions": CAPTIONS_FEATURE})


# --------------------------------------------------------------------------------------------------------------
# Bad samples, splitting, numbering
# --------------------------------------------------------------------------------------------------------------


def drop_unusable_samples(
    dataset: Dataset, split_name: str, num_proc=None, data_folder: str | None = None
) -> tuple[Dataset, Counter]:
    """Drop the rows that cannot be trained on, and count them.

    Returns `(usable, dropped)`: the dataset without those rows (and without empty strings inside caption lists),
    and a `collections.Counter` {reason: number of rows} with the reasons "missing_file", "not_an_image",
    "corrupt_image" (also truncated files), "no_caption" and, with `data_folder`, "outside_data_folder": an image
    read from a file (not inline bytes) whose path, once `..` is resolved, lies outside `data_folder`; it is never
    opened, so a captions file cannot make training read files from elsewhere on the disk. Symlinks are not
    resolved: an image folder that the user linked into the data folder belongs to it. Each image is decoded once
    with PIL (truncated images fail, as `ImageFile.LOAD_TRUNCATED_IMAGES` is False), through `datasets` on an
    undecoded view, so the check is cached and runs on `num_proc` processes. Grayscale, RGBA, CMYK, palette and
    16-bit images are kept: the transforms convert them to RGB. Raises ValueError when nothing usable remains.
    """
    view = without_image_decoding(dataset)
    # A filter predicate cannot report why it rejects a row, so a map computes the reason and a filter applies it.
    checks = _computed_columns(
        view, partial(_check_samples, data_folder=data_folder), ["image", "captions"],
        Features({"captions": CAPTIONS_FEATURE, "unusable_reason": Value("string")}), num_proc,
        desc=f"Checking {split_name} images",
    )
    reasons = checks["unusable_reason"][:]
    dropped = Counter(reason for reason in reasons if reason)
    summary = _describe_dropped(view, reasons, dropped)
    if sum(dropped.values()) == len(dataset):
        raise ValueError(
            f"No usable samples remain in split '{split_name}': all {len(dataset)} dropped ({summary or 'no rows'})"
        )
    if not dropped:
        cleaned = checks.remove_columns("unusable_reason")
        return concatenate_datasets([dataset.remove_columns("captions"), cleaned], axis=1), dropped
    logger.warning("%s: dropped %d of %d samples: %s", split_name, sum(dropped.values()), len(dataset), summary)
    checked = concatenate_datasets([dataset.remove_columns("captions"), checks], axis=1)
    usable = checked.filter(_is_usable, input_columns="unusable_reason", num_proc=num_proc, desc="Dropping")
    return usable.remove_columns("unusable_reason"), dropped


def _check_samples(images, captions, data_folder=None) -> dict:
    """Batched: the captions without empty strings, and why each row is unusable ("" when it is usable)."""
    cleaned = [clean_captions(texts) for texts in captions]
    reasons = [image_problem(image, data_folder) if texts else NO_CAPTION for image, texts in zip(images, cleaned)]
    return {"captions": cleaned, "unusable_reason": reasons}


def clean_captions(texts) -> list[str]:
    """The non-empty captions of a row, stripped; an image left with none is dropped as "no_caption"."""
    return [text.strip() for text in texts or [] if text and text.strip()]


def image_problem(image, data_folder=None) -> str:
    """Why an undecoded image ({"bytes", "path"}) cannot be used ("missing_file", "outside_data_folder",
    "not_an_image", "corrupt_image"), or "" if it decodes. The one check of the map-style path
    (`drop_unusable_samples`) and of the streams of `ndclip.streaming`."""
    if image is None or (image["bytes"] is None and not image["path"]):
        return MISSING_FILE
    if image["bytes"] is None and data_folder is not None and not _is_inside(image["path"], data_folder):
        return OUTSIDE_DATA_FOLDER
    source = encoded_image_source(image)
    load_truncated_images = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, not be padded with grey in training
    try:
        with PIL.Image.open(source) as picture:
            # A JPEG is checked at its smallest DCT scale: every entropy-coded byte is still read (a truncated or
            # broken stream fails the same way) without the full-size inverse DCT that training decodes anyway.
            picture.draft(picture.mode, (1, 1))
            picture.load()
    except FileNotFoundError:
        return MISSING_FILE
    except PIL.UnidentifiedImageError:
        return NOT_AN_IMAGE
    except Exception:  # PIL's decoders fail in many ways on broken files (OSError, SyntaxError, struct.error...)
        return CORRUPT_IMAGE
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated_images
    return ""


def _is_inside(path, folder) -> bool:
    """Whether `path` (a relative one from the working directory, as PIL opens it) lies under `folder`, by its
    spelling: `..` and absolute paths are resolved, symlinks are not."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def _is_usable(reason) -> bool:
    return not reason


def _describe_dropped(view: Dataset, reasons: list[str], dropped: Counter) -> str:
    """"2 missing_file (a.jpg, b.jpg), 1 no_caption (c.jpg)": counts and the first few names per reason."""
    rows = defaultdict(list)
    for row, reason in enumerate(reasons):
        if reason and len(rows[reason]) < EXAMPLES_IN_LOG:
            rows[reason].append(row)
    parts = []
    for reason, count in dropped.most_common():
        images = view.select(rows[reason])["image"][:]
        names = [_image_name(image, row, reason) for image, row in zip(images, rows[reason])]
        parts.append(f"{count} {reason} ({', '.join(names)}{', ...' if count > len(names) else ''})")
    return ", ".join(parts)


def _image_name(image, row, reason) -> str:
    if not (image and image["path"]):
        return f"row {row}"
    # A file outside the data folder is named in full: its file name alone would not say where it is.
    return os.path.abspath(image["path"]) if reason == OUTSIDE_DATA_FOLDER else os.path.basename(image["path"])


def _split_by_image(dataset: Dataset, validation_fraction, seed) -> tuple[Dataset, Dataset]:
    """Train and validation images, drawn with `seed`. Rows are images, so all captions of one image stay together."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
    if len(dataset) < 2:
        raise ValueError(f"Need at least 2 usable images to split off a validation set, found {len(dataset)}")
    parts = dataset.train_test_split(test_size=validation_fraction, seed=seed)
    return parts["train"], parts["test"]


def _number_images(dataset: Dataset) -> Dataset:
    """Adds `image_id`: 0..n-1 in row order."""
    return dataset.add_column("image_id", np.arange(len(dataset), dtype=np.int64))


# --------------------------------------------------------------------------------------------------------------
# Views for training and evaluation
# --------------------------------------------------------------------------------------------------------------


def without_image_decoding(dataset: Dataset) -> Dataset:
    """The dataset with its `image` column left encoded ({"bytes", "path"}) when a row is read. The image transforms
    decode such rows themselves (`ndclip.transforms.DecodeImage`): a JPEG goes straight into a uint8 tensor, with no
    PIL image in between. The bad-sample check reads images this way
    too, to open each one with PIL itself."""
    return dataset.cast_column("image", Image(decode=False))


def flatten_captions(dataset: Dataset) -> Dataset:
    """One row per caption, with columns `image_id` and `caption`, for embedding every caption at evaluation (batched
    by `ndclip.transforms.TextCollator`). Pass the dataset as loaded (not the `with_image_transform` view)."""
    columns = ["image_id", "captions"]
    return dataset.select_columns(columns).map(
        _one_row_per_caption, batched=True, remove_columns=columns, desc="Flattening captions"
    )


def _one_row_per_caption(batch: dict) -> dict:
    image_ids, captions = [], []
    for image_id, texts in zip(batch["image_id"], batch["captions"]):
        image_ids.extend([image_id] * len(texts))
        captions.extend(texts)
    return {"image_id": image_ids, "caption": captions}
