"""Streaming image-caption data: shards read as a `datasets.IterableDataset` in the training schema, split between
processes and DataLoader workers, shuffled with a seeded buffer, bad samples skipped and counted.

Sources (`--train_shards`, see `resolve_train_shards`): globs of local webdataset tar shards (img2dataset's layout,
as `ndclip shards` writes it: `KEY.jpg`/`.png`/`.webp`... + `KEY.txt` + `KEY.json` per sample), globs of parquet
shards, a folder holding such shards, or a dataset name (Hub, or a local dataset folder) read with `streaming=True`.

Rows come out in the schema of the map-style path (`ndclip.data`), so `ndclip.transforms.CaptionCollator` batches
them unchanged:

    image     {"bytes", "path"}   encoded, as rows of `ndclip.data.without_image_decoding`; the collator decodes it
    captions  list[str]           all non-empty captions of the image
    image_id  int64               a stable id derived from the image's encoded bytes (see `stable_image_id`): a
                                  stream has no row numbers, and the collator seeds each sample's crop and caption
                                  draw with it, so the same sample gets the same id in every process, worker, epoch
                                  and resumed run (and two copies of one image share it, as the map-style path
                                  groups the rows of one image file)

Columns are found as in the map-style path for parquet shards and datasets (`ndclip.data.find_image_column`,
`find_caption_columns`: `image` or an Image column; `captions`, `caption`, numbered `caption_0..N`...). Webdataset
samples are judged one by one (their files vary): the image is whichever of `WEBDATASET_IMAGE_FIELDS` the sample
has, the captions a list in its `json` (`captions`, `sentences`...), else its `txt`, else a caption string in its
`json` (img2dataset's `caption`); `image_column` / `caption_column` override both.

Bad samples are skipped and counted with the check of the map-style path (`ndclip.data.image_problem`,
`ndclip.data.clean_captions`): the same reasons, "missing_file", "not_an_image", "corrupt_image" (also truncated
files), "no_caption" (also a caption that is not text). Counts live in shared memory (`DroppedSamples`), one row per
DataLoader worker, so the training process reads the exact count of its workers; each process counts what it read,
and the training loop sums the processes (`accelerator.reduce`) and logs the counts at the end of each epoch, then
resets them (`DroppedSamples.counts`, `DroppedSamples.reset`). A count covers the samples read (workers read ahead
of the batches the training consumed); a stream resumed mid-epoch by `ndclip.training.ResumableStream` checks the
skipped part again, so the epoch's count is complete again when it ends.

Splitting (`split_stream_by_process`): whole shards go to each process with `datasets.distributed.
split_dataset_by_node` when the shard count is a multiple of the number of processes; otherwise it is an error that
says what to do, unless `allow_example_split` accepts datasets' fallback (every process reads every shard and keeps
one sample in `world_size`: complete, but `world_size` times the reading and image checking). Within a process,
datasets gives each DataLoader worker its own shards (a warning when the process's shard count is not a multiple of
the workers: the epoch is still complete, but workers with fewer shards idle at its end). Shuffling
(`training_stream`): shard order and a buffer of `shuffle_buffer_size` samples, drawn from `seed`; the shard order
is drawn again each epoch from `IterableDataset.set_epoch(epoch)` (called by accelerate's prepared loader), the
same on every process, so the shards of an epoch are split without overlap.

Preparing the loader with accelerate (1.15; read in accelerate/data_loader.py and checkpointing.py). The stream is
already split between processes, so accelerate must not split it again, and `Accelerator.prepare` would:
  - with `dispatch_batches=False` and several processes, `prepare_data_loader` calls the stream's
    `IterableDataset.shard(num_processes, process_index)` when it has at least `num_processes` shards, and otherwise
    wraps it in `IterableDatasetShard` (which keeps one batch in `num_processes`): either way each process would read
    1/world_size of its share;
  - with the default `dispatch_batches=None` (True for an iterable dataset) process 0 reads every batch and sends
    slices to the others: process 0 becomes the bottleneck;
  - `prepare` does not recognise a loader prepared outside it (it marks only its own objects `_is_accelerate_prepared`):
    passing one in wraps it again.
So the training loader is not passed to `Accelerator.prepare`: it is torchdata's `StatefulDataLoader` over
`ndclip.training.ResumableStream(stream)` (`ndclip.training.StreamLoader`), with its batches moved to the device
by the training loop and `set_epoch` passed to the stream before each epoch. (accelerate's own
`prepare_data_loader(loader, num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False)` would
not split it again either, but with `use_stateful_dataloader=True` its `DataLoaderShard.state_dict()` subtracts the
launch's `num_processes - 1` from the loader's yield counters, a correction for prefetched map-style shards.)
Resuming: `accelerator.save_state` saves the state of the stateful loaders it prepared as `dl_state_dict.bin`, one
file name for every process (they overwrite each other's), so the training loop saves `loader.state_dict()` itself,
one file per process. datasets' own `IterableDataset.state_dict()` restores the shard positions but not the shuffle
buffer's contents (its documented limit): a resumed run would skip the samples that were in the buffer; hence
`ResumableStream`'s replay of the epoch up to the position.

Per-process streams are not equally long (shards differ in size, bad samples are skipped), so the training loop has
to end an epoch on all processes together; the stream itself has no length (`ndclip.shards.indexed_sample_count`
gives the total of shards written by `ndclip shards`).
"""

import glob
import hashlib
import logging
import os
from collections import Counter
from itertools import islice

import torch
from datasets import Features, Image, IterableDataset, Json, List, Value, load_dataset
from datasets.distributed import split_dataset_by_node
from huggingface_hub.errors import LocalEntryNotFoundError

from ndclip.data import (
    CAPTION_COLUMN_CANDIDATES,
    EXAMPLES_IN_LOG,
    NO_CAPTION,
    UNUSABLE_REASONS,
    DatasetDownloadError,
    captions_of_row,
    clean_captions,
    find_caption_columns,
    find_image_column,
    image_problem,
)

logger = logging.getLogger(__name__)

SHARD_BUILDERS = {".tar": "webdataset", ".parquet": "parquet"}
# The image files a webdataset sample may hold, in the order they are looked for; other files of a sample are not read.
WEBDATASET_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
WEBDATASET_TEXT_FIELDS = ("txt", "text")  # the caption files (datasets decodes them as UTF-8 text)
WEBDATASET_METADATA_FIELD = "json"
WEBDATASET_FEATURES = Features(
    {
        **{field: Image(decode=False) for field in WEBDATASET_IMAGE_FIELDS},
        **{field: Value("string") for field in WEBDATASET_TEXT_FIELDS},
        WEBDATASET_METADATA_FIELD: Json(),  # as it is, of any shape: the checks judge each sample
        "__key__": Value("string"),
        "__url__": Value("string"),
    }
)
STREAM_FEATURES = Features(
    {"image": Image(decode=False), "captions": List(Value("string")), "image_id": Value("int64")}
)
# Extra columns between the check and the filter that counts and drops: why a sample is unusable, and its name.
_CHECKED_FEATURES = Features({**STREAM_FEATURES, "unusable_reason": Value("string"), "sample_name": Value("string")})
MAX_COUNTED_WORKERS = 64


class UnevenShardsError(ValueError):
    """The shards of a stream cannot be split evenly between the processes."""


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


def resolve_train_shards(train_shards) -> tuple[str, list[str] | str]:
    """What `--train_shards` names: `("webdataset", files)`, `("parquet", files)` or `("dataset", name)`.

    `train_shards` is a string or a list of strings: globs or paths of `.tar` or `.parquet` files (sorted, the same
    on every process), a folder holding such files, or one dataset name (a Hub id, or a local dataset folder without
    shards at its top) to stream with `load_dataset(name, streaming=True)`. A glob that matches nothing, a file of
    another type, or a mix of tar and parquet shards is a ValueError naming it.
    """
    patterns = [train_shards] if isinstance(train_shards, (str, os.PathLike)) else list(train_shards)
    patterns = [os.fspath(pattern) for pattern in patterns]
    if not patterns:
        raise ValueError("--train_shards: no shards given")
    if len(patterns) == 1 and _is_dataset_name(patterns[0]):
        return "dataset", patterns[0]
    files = []
    for pattern in patterns:
        matched = _shard_files_in_folder(pattern) if os.path.isdir(pattern) else sorted(glob.glob(pattern))
        if not matched:
            raise ValueError(f"--train_shards: '{pattern}' matches no .tar or .parquet file")
        files.extend(matched)
    kinds = {SHARD_BUILDERS.get(os.path.splitext(path)[1].lower()) for path in files}
    if None in kinds:
        other = next(path for path in files if os.path.splitext(path)[1].lower() not in SHARD_BUILDERS)
        raise ValueError(f"--train_shards: {other} is not a .tar or .parquet shard")
    if len(kinds) > 1:
        raise ValueError("--train_shards: give either webdataset .tar shards or .parquet shards, not both")
    return kinds.pop(), sorted(set(files), key=files.index)


def _is_dataset_name(pattern: str) -> bool:
    if glob.has_magic(pattern) or os.path.splitext(pattern)[1].lower() in SHARD_BUILDERS:
        return False
    return not (os.path.isdir(pattern) and _shard_files_in_folder(pattern))


def _shard_files_in_folder(folder) -> list[str]:
    return sorted(
        os.path.join(folder, name) for name in os.listdir(folder) if os.path.splitext(name)[1].lower() in SHARD_BUILDERS
    )


def load_image_caption_stream(
    train_shards,
    image_column=None,
    caption_column=None,
    dataset_config_name=None,
    split="train",
    cache_dir=None,
    dropped=None,
) -> tuple[IterableDataset, "DroppedSamples"]:
    """The samples of `train_shards` (see `resolve_train_shards`) as an IterableDataset in the training schema
    (`image` encoded, `captions`, `image_id`; see the module's docstring), bad samples skipped and counted.

    Returns `(stream, dropped)`: the stream, unshuffled and unsplit (see `training_stream`), and the
    `DroppedSamples` that counts its bad samples (`dropped`, or a new one). `split` names the split of a dataset
    name; `image_column` / `caption_column` override the detection (a caption column may be a field of the
    webdataset `json`). The columns are checked here: no image or caption column (for webdataset shards: none in
    the first samples of the first shard) is a ValueError naming the source and what it holds.
    """
    kind, source = resolve_train_shards(train_shards)
    describe = source if kind == "dataset" else f"{len(source)} {kind} shards ({source[0]} ...)"
    raw = _load_raw_stream(kind, source, dataset_config_name, split, cache_dir, describe)
    if _is_webdataset(raw.features):
        normalise = _WebdatasetNormaliser(image_column, caption_column)
        _check_first_samples(raw, normalise, describe)
    else:
        normalise = _table_normaliser(raw.features, image_column, caption_column, describe)
    dropped = dropped if dropped is not None else DroppedSamples()
    stream = raw.map(normalise, remove_columns=list(raw.features), features=_CHECKED_FEATURES)
    stream = stream.filter(dropped.keep).remove_columns(["unusable_reason", "sample_name"])
    logger.info("Streaming %s: %d shards", describe, stream.num_shards)
    return stream, dropped


def _load_raw_stream(kind, source, dataset_config_name, split, cache_dir, describe) -> IterableDataset:
    """The source as datasets streams it, with every image column left undecoded (the check and the collator open
    the bytes themselves); webdataset samples with the columns of `WEBDATASET_FEATURES`."""
    if kind == "webdataset":
        # Not datasets' inference of the columns: it reads the first samples of the first shard, refuses the whole
        # stream unless they hold the same files, and casts every later sample to them (an image of another
        # extension dropped, a caption number turned into a string, a json of another shape stopping the stream).
        return load_dataset(
            "webdataset",
            data_files=source,
            split="train",
            streaming=True,
            cache_dir=cache_dir,
            features=WEBDATASET_FEATURES,
        )
    if kind == "dataset":
        arguments = {"path": source, "name": dataset_config_name, "split": split}
    else:
        arguments = {"path": kind, "data_files": source, "split": "train"}
    try:
        raw = load_dataset(**arguments, streaming=True, cache_dir=cache_dir)
    except (ConnectionError, LocalEntryNotFoundError) as error:  # datasets/huggingface_hub offline errors
        raise DatasetDownloadError(
            f"Could not stream the dataset '{describe}' from the Hugging Face Hub ({error}): this machine is offline "
            "or cannot reach the Hub. --train_shards also takes local shards: globs of .tar or .parquet files, or a "
            "folder of them (`ndclip shards` writes them)."
        ) from None
    if raw.features is None:
        raise ValueError(f"{describe}: datasets could not tell the columns of this stream")
    if _is_webdataset(raw.features):  # a dataset name whose files are tar shards
        features = WEBDATASET_FEATURES
    else:
        features = Features(
            {name: Image(decode=False) if isinstance(value, Image) else value for name, value in raw.features.items()}
        )
    return load_dataset(**arguments, streaming=True, cache_dir=cache_dir, features=features)


def _is_webdataset(features) -> bool:
    """Whether the stream's samples are webdataset samples (files of one key), whichever builder read them."""
    return "__key__" in features


# --------------------------------------------------------------------------------------------------------------
# Normalising one sample to the training schema, with the reason it is unusable
# --------------------------------------------------------------------------------------------------------------


class _WebdatasetNormaliser:
    """A webdataset sample -> the training schema plus `unusable_reason` and `sample_name` ("shard.tar/KEY").

    Samples are judged one by one, as their files vary: the image is the first image file the sample has; the
    captions come from `caption_column` (a file of the sample, or a field of its json), else a list of captions in
    its json (`captions`, `sentences`...: all captions where `txt` holds one), else its `txt` / `text` file, else a
    caption string in its json (img2dataset's `caption`).
    """

    def __init__(self, image_column=None, caption_column=None):
        if image_column is not None and image_column not in WEBDATASET_IMAGE_FIELDS:
            raise ValueError(
                f"image_column '{image_column}': the image of a webdataset sample is one of its files "
                f"{', '.join(WEBDATASET_IMAGE_FIELDS)}"
            )
        self.image_fields = [image_column] if image_column else list(WEBDATASET_IMAGE_FIELDS)
        self.caption_column = caption_column

    def __call__(self, sample: dict) -> dict:
        image = next((sample[field] for field in self.image_fields if sample.get(field) is not None), None)
        name = f"{os.path.basename(sample.get('__url__') or '')}/{sample.get('__key__')}"
        return _checked_row(image, [self.caption_value(sample)], name)

    def caption_value(self, sample: dict):
        metadata = sample.get(WEBDATASET_METADATA_FIELD)
        metadata = metadata if isinstance(metadata, dict) else {}
        if self.caption_column is not None:
            return sample.get(self.caption_column, metadata.get(self.caption_column))
        lists = [metadata[name] for name in CAPTION_COLUMN_CANDIDATES if isinstance(metadata.get(name), list)]
        texts = [sample[name] for name in WEBDATASET_TEXT_FIELDS if sample.get(name) is not None]
        strings = [metadata[name] for name in CAPTION_COLUMN_CANDIDATES if metadata.get(name) is not None]
        return next(iter(lists + texts + strings), None)


class _TableNormaliser:
    """A row of a parquet shard or a dataset -> the training schema plus `unusable_reason` and `sample_name`."""

    def __init__(self, image_column, caption_columns):
        self.image_column = image_column
        self.caption_columns = caption_columns

    def __call__(self, row: dict) -> dict:
        image = row[self.image_column]
        if isinstance(image, bytes):  # a binary column: the bytes of an image file
            image = {"bytes": image, "path": None}
        sample_name = (image or {}).get("path") or "a row without a file name"
        return _checked_row(image, [row[column] for column in self.caption_columns], sample_name)


def _checked_row(image, caption_values, name) -> dict:
    """The sample in the training schema, and why it cannot be used ("" when it can), by the map-style checks."""
    captions = clean_captions(captions_of_row(value for value in caption_values if _is_text(value)))
    reason = image_problem(image) if captions else NO_CAPTION  # the map-style order: no caption first
    usable = not reason
    return {
        "image": image if usable else None,
        "captions": captions,
        "image_id": stable_image_id(image) if usable else -1,
        "unusable_reason": reason,
        "sample_name": name,
    }


def _is_text(value) -> bool:
    """A caption value of the right type: a string or a list of strings (a number or a struct is not a caption)."""
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(text, str) for text in value))


def stable_image_id(image: dict) -> int:
    """A non-negative int64 drawn from the image's encoded bytes (its path when it has none): the same in every
    process, worker, epoch and run, and the same for two copies of one image. 63 random bits: two images are likely
    to share one only in sets of billions."""
    content = image["bytes"] if image.get("bytes") is not None else os.fsencode(image["path"])
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little") >> 1


def _check_first_samples(raw: IterableDataset, normalise: _WebdatasetNormaliser, source) -> None:
    """A ValueError naming the source when none of its first samples has an image, or none a caption: the stream
    would skip every sample. (Single bad samples are skipped and counted as the stream meets them.)"""
    first = list(islice(iter(raw), EXAMPLES_IN_LOG))
    present = sorted({name for sample in first for name, value in sample.items() if value is not None})
    if not any(sample.get(field) is not None for sample in first for field in normalise.image_fields):
        raise ValueError(
            f"{source}: no image file ({', '.join(normalise.image_fields)}) in its first samples, which hold "
            f"{present}; pass `image_column`"
        )
    if not any(_is_text(normalise.caption_value(sample)) for sample in first):
        raise ValueError(
            f"{source}: no caption in its first samples, which hold {present}: no txt file, and no caption field in "
            f"their json (looked for {', '.join(CAPTION_COLUMN_CANDIDATES)}); pass `caption_column`"
        )


def _table_normaliser(features, image_column, caption_column, source) -> _TableNormaliser:
    image_column = find_image_column(features, image_column, source)
    if isinstance(features[image_column], Value) and "string" in features[image_column].dtype:
        raise ValueError(
            f"{source}: the image column '{image_column}' holds file paths; a stream needs the image bytes in the "
            "shards (write them with `ndclip shards`)"
        )
    return _TableNormaliser(image_column, find_caption_columns(features, caption_column, image_column, source))


# --------------------------------------------------------------------------------------------------------------
# Counting the bad samples across DataLoader workers
# --------------------------------------------------------------------------------------------------------------


class DroppedSamples:
    """The bad samples a stream skipped in this process, by reason, summed over its DataLoader workers.

    The stream's filter (`keep`) runs in the DataLoader workers; each worker adds to its own row of a tensor in
    shared memory (allocated here, before the workers start, as datasets shares its epoch with them), so nothing is
    lost with the worker processes and no two processes write the same numbers. Read `counts()` when an epoch's
    loader is exhausted (every worker has finished), sum it over the processes, then `reset()` for the next epoch.
    The first few bad samples per reason and worker are also logged by name (shard/KEY, or the image's file name).
    """

    def __init__(self, max_workers: int = MAX_COUNTED_WORKERS):
        self.table = torch.zeros(max_workers, len(UNUSABLE_REASONS), dtype=torch.int64).share_memory_()
        self.counting = True  # False on all processes but one when every process reads every sample

    def keep(self, row: dict) -> bool:
        """The stream's filter: whether `row` is usable; an unusable one is counted (and logged) here."""
        reason = row["unusable_reason"]
        if not reason:
            return True
        if self.counting:
            slot = _worker_slot(len(self.table))
            column = UNUSABLE_REASONS.index(reason)
            self.table[slot, column] += 1
            if self.table[slot, column] <= EXAMPLES_IN_LOG:
                logger.warning("Skipped a bad sample: %s (%s)", row["sample_name"], reason)
        return False

    def counts(self) -> Counter:
        """{reason: number of samples} skipped by this process since the last `reset` (reasons with none left out)."""
        totals = self.table.sum(dim=0).tolist()
        return Counter({reason: count for reason, count in zip(UNUSABLE_REASONS, totals) if count})

    def reset(self) -> None:
        self.table.zero_()


def _worker_slot(slots: int) -> int:
    info = torch.utils.data.get_worker_info()
    slot = info.id if info is not None else 0
    if slot >= slots:
        raise ValueError(f"DroppedSamples counts {slots} DataLoader workers at most; make it with max_workers > {slot}")
    return slot


# --------------------------------------------------------------------------------------------------------------
# Splitting and shuffling
# --------------------------------------------------------------------------------------------------------------


def split_stream_by_process(
    stream: IterableDataset,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    dropped: DroppedSamples | None = None,
    allow_example_split: bool = False,
) -> IterableDataset:
    """The part of `stream` that process `rank` of `world_size` reads: whole shards (`split_dataset_by_node`).

    A shard count that is not a multiple of `world_size` raises `UnevenShardsError` saying what to do, unless
    `allow_example_split`: then every process reads every shard and keeps one sample in `world_size` (datasets'
    "examples" strategy; complete, at `world_size` times the reading and checking), logged as a warning, and only
    process 0 counts bad samples in `dropped` (every process meets all of them). `num_workers` (DataLoader workers
    per process) only checks that the process's shards divide between them: otherwise a warning, since workers with
    fewer shards idle at the end of each epoch (nothing is missed or read twice).
    """
    shards = stream.num_shards
    if world_size > 1 and shards % world_size:
        message = (
            f"The stream has {shards} shards, which do not split evenly between {world_size} processes. Splitting "
            f"by example, every process would read all {shards} shards and keep 1 sample in {world_size} "
            f"({world_size}x the reading and image checking). Re-write the shards as a multiple of {world_size} "
            f"(`ndclip shards --num_shards {_next_multiple(shards, world_size)}`), or train on a number of processes "
            f"that divides {shards}"
        )
        if not allow_example_split:
            raise UnevenShardsError(
                message + ", or accept the cost with allow_example_split (run_clip.py: --allow_example_split)."
            )
        if rank == 0:
            logger.warning("%s. Splitting by example, as allow_example_split asks.", message)
        if dropped is not None:
            dropped.counting = rank == 0
        return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy="examples")
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy="shards")
    per_process = stream.num_shards
    if num_workers > 1 and per_process % num_workers and rank == 0:
        logger.warning(
            "Each process reads %d shards with %d DataLoader workers: workers with fewer shards idle at the end of "
            "each epoch (nothing is missed). A multiple of %d shards per process keeps them all busy.",
            per_process,
            num_workers,
            num_workers,
        )
    return stream


def _next_multiple(number: int, factor: int) -> int:
    return -(-number // factor) * factor


def training_stream(
    train_shards,
    seed: int,
    shuffle_buffer_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    allow_example_split: bool = False,
    image_column=None,
    caption_column=None,
    dataset_config_name=None,
    cache_dir=None,
) -> tuple[IterableDataset, DroppedSamples]:
    """The training stream of process `rank`: `load_image_caption_stream`, shuffled, `split_stream_by_process`.

    The shuffle draws the shard order and a buffer of `shuffle_buffer_size` samples from `seed` (the same on every
    process, so they split the same shard order); call `stream.set_epoch(epoch)` before each epoch (accelerate's
    prepared loader does) to draw another shard order and buffer. `shuffle_buffer_size` 0 keeps the shards' order.
    Returns `(stream, dropped)` as `load_image_caption_stream` does.
    """
    if shuffle_buffer_size < 0:
        raise ValueError(f"shuffle_buffer_size must be 0 (no shuffling) or more, got {shuffle_buffer_size}")
    stream, dropped = load_image_caption_stream(
        train_shards,
        image_column=image_column,
        caption_column=caption_column,
        dataset_config_name=dataset_config_name,
        cache_dir=cache_dir,
    )
    if shuffle_buffer_size:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    stream = split_stream_by_process(stream, rank, world_size, num_workers, dropped, allow_example_split)
    return stream, dropped
