"""ndclip.streaming: shards (ours, img2dataset's, parquet, a dataset folder) read back as a stream in the training
schema with the source's samples, captions and bytes; bad samples skipped and counted as the map-style path counts
them, across DataLoader workers; splitting between processes (simulated in-process: every rank's DataLoader with 2
workers) covers every sample once per epoch, reshuffled per epoch, the same for the same seed; uneven shard counts."""

import logging
import os

import datasets
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset, Image
from torch.utils.data import DataLoader

from ndclip.data import DatasetDownloadError, drop_unusable_samples, load_image_caption_dataset, without_image_decoding
from ndclip.layouts import (
    captions_of,
    encoded,
    picture,
    write_hub_parquet,
    write_img2dataset_shards,
    write_kaggle_flickr8k,
    write_messy_images,
    write_tar_shard,
)
from ndclip.shards import write_shards, write_source_shards
from ndclip.streaming import (
    STREAM_FEATURES,
    UnevenShardsError,
    load_image_caption_stream,
    resolve_train_shards,
    split_stream_by_process,
    stable_image_id,
    training_stream,
)
from ndclip.transforms import CaptionCollator, train_image_transform

datasets.disable_progress_bars()

STREAM_LOGGER = "ndclip.streaming"


def as_list(examples):
    return examples


def read_all(stream, num_workers=0, batch_size=2) -> list[dict]:
    """Every row of `stream` through a DataLoader with `num_workers` workers."""
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=as_list)
    return [row for batch in loader for row in batch]


def file_bytes(image: dict) -> bytes:
    if image["bytes"] is not None:
        return image["bytes"]
    with open(image["path"], "rb") as file:
        return file.read()


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """A Kaggle Flickr8k folder of 12 images: its map-style train split (10 images) and its shards (3 samples per
    shard)."""
    root = tmp_path_factory.mktemp("flickr")
    write_kaggle_flickr8k(root / "flickr", 12)
    cache = str(root / "cache")
    write_source_shards(root / "shards", samples_per_shard=3, data_dir=str(root / "flickr"), cache_dir=cache)
    train = load_image_caption_dataset(data_dir=str(root / "flickr"), cache_dir=cache)["train"]
    return {"train": train, "shards": root / "shards" / "train", "root": root}


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    """img2dataset-style shards of unequal sizes: 8 shards, 24 samples."""
    folder = tmp_path_factory.mktemp("img2dataset")
    samples = write_img2dataset_shards(folder, [3, 4, 2, 5, 3, 4, 2, 1])
    return folder, samples


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------


def test_shards_stream_back_the_source_samples_captions_and_bytes(flickr):
    stream, dropped = load_image_caption_stream(str(flickr["shards"] / "*.tar"))
    rows = read_all(stream)
    assert stream.features == STREAM_FEATURES and stream.num_shards == len(list(flickr["shards"].glob("*.tar"))) == 4
    source = {file_bytes(row["image"]): row["captions"] for row in without_image_decoding(flickr["train"])}
    assert {row["image"]["bytes"]: row["captions"] for row in rows} == source
    assert len(rows) == len(source) == 10
    assert [row["image_id"] for row in rows] == [stable_image_id(row["image"]) for row in rows]
    assert len({row["image_id"] for row in rows}) == len(rows) and all(row["image_id"] >= 0 for row in rows)
    assert dropped.counts() == {}


def test_parquet_shards_and_a_dataset_folder_stream_the_same_schema(flickr, tmp_path):
    write_shards(flickr["train"], tmp_path / "parquet", num_shards=2, shard_format="parquet")
    assert resolve_train_shards(str(tmp_path / "parquet"))[0] == "parquet"
    rows = read_all(load_image_caption_stream(str(tmp_path / "parquet"))[0])
    tar_rows = read_all(load_image_caption_stream(str(flickr["shards"]))[0])
    assert [(row["image"]["bytes"], row["captions"], row["image_id"]) for row in rows] == [
        (row["image"]["bytes"], row["captions"], row["image_id"]) for row in tar_rows
    ]

    write_hub_parquet(tmp_path / "hub", {"train": 4, "test": 2})
    assert resolve_train_shards(str(tmp_path / "hub")) == ("dataset", str(tmp_path / "hub"))
    hub_rows = read_all(load_image_caption_stream(str(tmp_path / "hub"), cache_dir=str(tmp_path / "cache"))[0])
    assert [row["captions"] for row in hub_rows] == [captions_of(n) for n in range(4)]
    assert [row["image"]["bytes"] for row in hub_rows] == [encoded(picture(n), "JPEG") for n in range(4)]


def test_img2dataset_shards_take_the_caption_from_txt(eight_shards):
    folder, samples = eight_shards
    rows = read_all(load_image_caption_stream([str(folder / "0000[0-3].tar"), str(folder / "0000[4-7].tar")])[0])
    assert [row["captions"] for row in rows] == [[sample["txt"]] for sample in samples]
    assert [row["image"]["path"] for row in rows] == [f"{sample['__key__']}.jpg" for sample in samples]


def test_sources_that_are_not_shards_are_named(tmp_path, flickr):
    with pytest.raises(DatasetDownloadError, match="Could not stream the dataset 'someone/captions'.*local shards"):
        load_image_caption_stream("someone/captions")
    with pytest.raises(ValueError, match="'.*nothing-\\*.tar' matches no .tar or .parquet file"):
        resolve_train_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not a .tar or .parquet shard"):
        resolve_train_shards([str(flickr["shards"] / "*.tar"), str(tmp_path / "*.txt")])
    write_tar_shard(
        tmp_path / "00000.tar", [{"__key__": f"k{n}", "jpg": encoded(picture(n), "JPEG"), "cls": "3"} for n in range(2)]
    )
    with pytest.raises(
        ValueError, match=r"no caption in its first samples, which hold \['__key__', '__url__', 'jpg'\]"
    ):
        load_image_caption_stream(str(tmp_path / "00000.tar"))


# ----------------------------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------------------------


def messy_samples(folder) -> tuple[list[dict], Dataset]:
    """The messy images of `ndclip.layouts` (each broken kind, every colour mode) as webdataset samples, and the same
    samples as a map-style dataset for `drop_unusable_samples`."""
    names = write_messy_images(folder)
    samples, images, captions = [], [], []
    for number, name in enumerate(names):
        stem, extension = os.path.splitext(name)
        sample = {"__key__": f"{number:04d}_{stem}"}
        if os.path.exists(folder / name):
            sample[extension[1:]] = (folder / name).read_bytes()
        caption = "" if name == "uncaptioned.jpg" else f"a photo of {stem}"
        sample["txt"] = caption
        samples.append(sample)
        images.append({"path": str(folder / name), "bytes": None})
        captions.append([caption])
    samples.append({"__key__": "0010_wrongtype", "jpg": encoded(picture(3), "JPEG"), "json": {"caption": 7}})
    samples.append({"__key__": "0011_nocaption", "png": encoded(picture(4))})
    images += [{"path": None, "bytes": encoded(picture(3), "JPEG")}, {"path": None, "bytes": encoded(picture(4))}]
    captions += [[], []]  # a caption of the wrong type is no caption
    return samples, Dataset.from_dict({"image": images, "captions": captions}).cast_column("image", Image())


def test_bad_samples_in_shards_are_skipped_and_counted_as_in_the_map_style_path(tmp_path, caplog):
    samples, reference = messy_samples(tmp_path / "messy")
    (tmp_path / "shards").mkdir()
    write_tar_shard(tmp_path / "shards" / "00000.tar", samples[:6])
    write_tar_shard(tmp_path / "shards" / "00001.tar", samples[6:])
    usable, expected = drop_unusable_samples(reference, "train")

    stream, dropped = load_image_caption_stream(str(tmp_path / "shards"))
    rows = read_all(stream, num_workers=2)
    assert dropped.counts() == expected and sum(expected.values()) == 7, "the counts of both workers, exactly"
    assert {"corrupt_image", "not_an_image", "missing_file", "no_caption"} <= set(expected)
    assert sorted(row["image"]["bytes"] for row in rows) == sorted(
        file_bytes(image) for image in without_image_decoding(usable)["image"][:]
    )

    dropped.reset()
    assert dropped.counts() == {}
    with caplog.at_level(logging.WARNING, logger=STREAM_LOGGER):
        read_all(stream, num_workers=0)
    assert dropped.counts() == expected, "counted again in the next epoch, here in the training process itself"
    logged = " ".join(record.getMessage() for record in caplog.records if record.name == STREAM_LOGGER)
    for key in ("0005_truncated", "0006_corrupt", "0007_notes", "0008_missing", "0009_uncaptioned", "0010_wrongtype"):
        assert key in logged


# ----------------------------------------------------------------------------------------------------------------
# Splitting between processes and workers, shuffling
# ----------------------------------------------------------------------------------------------------------------


def epoch_of(folder, rank, world_size, epoch, seed=0, num_workers=2, **options) -> tuple[list[str], object]:
    """The sample keys that process `rank` reads in `epoch`, through a DataLoader with `num_workers` workers."""
    stream, dropped = training_stream(
        str(folder),
        seed=seed,
        shuffle_buffer_size=4,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        **options,
    )
    stream.set_epoch(epoch)
    return [row["image"]["path"] for row in read_all(stream, num_workers=num_workers)], dropped


def test_ranks_and_workers_read_every_sample_once_per_epoch(eight_shards):
    folder, samples = eight_shards
    everything = sorted(f"{sample['__key__']}.jpg" for sample in samples)
    orders = {}
    for epoch in (0, 1):
        parts = [epoch_of(folder, rank, 2, epoch)[0] for rank in (0, 1)]
        assert sorted(parts[0] + parts[1]) == everything, "no sample missing or read twice"
        assert parts[0] and parts[1]
        orders[epoch] = parts
    assert orders[0] != orders[1], "another shard order and buffer in the next epoch"
    in_process = epoch_of(folder, 0, 2, 1, num_workers=0)[0]
    assert epoch_of(folder, 0, 2, 1, num_workers=0)[0] == in_process, "the same seed gives the same order"
    assert sorted(in_process) == sorted(orders[1][0]), "the same shards, with or without workers"
    assert epoch_of(folder, 0, 2, 1, seed=1, num_workers=0)[0] != in_process


def test_uneven_shard_count_is_an_error_saying_what_to_do(eight_shards, tmp_path, caplog):
    folder, _ = eight_shards
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    jpeg = encoded(picture(50), "JPEG")
    write_tar_shard(
        tmp_path / "00003.tar",
        [{"__key__": "bad", "jpg": jpeg[:100], "txt": "cut"}]
        + [
            {"__key__": f"extra{n}", "jpg": encoded(picture(60 + n), "JPEG"), "txt": "an extra photo"} for n in range(2)
        ],
    )
    (tmp_path / "00001.tar").unlink()  # three shards: 00000, 00002, 00003
    with pytest.raises(UnevenShardsError) as error:
        training_stream(str(tmp_path), seed=0, shuffle_buffer_size=4, rank=0, world_size=2)
    message = str(error.value)
    assert "3 shards, which do not split evenly between 2 processes" in message
    assert "ndclip shards --num_shards 4" in message and "--allow_example_split" in message

    with caplog.at_level(logging.WARNING, logger=STREAM_LOGGER):
        parts = [epoch_of(tmp_path, rank, 2, 0, allow_example_split=True) for rank in (0, 1)]
    keys = parts[0][0] + parts[1][0]
    assert len(keys) == len(set(keys)) == 3 + 2 + 2, "split by example: every sample once"
    assert abs(len(parts[0][0]) - len(parts[1][0])) <= 1
    assert parts[0][1].counts() == {"corrupt_image": 1} and parts[1][1].counts() == {}, "counted once, by rank 0"
    assert "Splitting by example" in caplog.text


def test_workers_that_do_not_divide_a_process_s_shards_get_a_warning(eight_shards, caplog):
    folder, _ = eight_shards
    stream = load_image_caption_stream(str(folder))[0]
    with caplog.at_level(logging.WARNING, logger=STREAM_LOGGER):
        split_stream_by_process(stream, rank=0, world_size=2, num_workers=4)
        split_stream_by_process(stream, rank=0, world_size=2, num_workers=2)
        assert "reads 4 shards with" not in caplog.text
        split_stream_by_process(stream, rank=0, world_size=2, num_workers=3)
    assert "Each process reads 4 shards with 3 DataLoader workers" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Into training: the collator, and the loader prepared as accelerate needs it
# ----------------------------------------------------------------------------------------------------------------


def test_stream_rows_batch_with_the_caption_collator(flickr, processor):
    stream, _ = training_stream(str(flickr["shards"]), seed=0, shuffle_buffer_size=4)
    collator = CaptionCollator(processor.tokenizer, image_transform=train_image_transform(processor.image_processor))
    batch = next(iter(DataLoader(stream, batch_size=4, collate_fn=collator)))
    assert batch["pixel_values"].shape[:2] == (4, 3) and batch["input_ids"].shape[0] == 4
    assert batch["image_ids"].dtype == torch.int64 and len(set(batch["image_ids"].tolist())) == 4


def test_accelerate_would_split_a_process_s_stream_again_unless_prepared_for_one_process(eight_shards):
    folder, samples = eight_shards
    stream, _ = training_stream(str(folder), seed=0, shuffle_buffer_size=4, rank=0, world_size=2)
    own_share = read_all(stream)
    loader = DataLoader(stream, batch_size=2, collate_fn=as_list)

    split_again = prepare_data_loader(
        loader, num_processes=2, process_index=0, put_on_device=True, dispatch_batches=False
    )
    assert len([row for batch in split_again for row in batch]) < len(own_share), "accelerate alone splits again"

    prepared = prepare_data_loader(
        loader, device=torch.device("cpu"), num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False
    )
    assert [row["image"]["path"] for batch in prepared for row in batch] == [row["image"]["path"] for row in own_share]
    prepared.set_epoch(3)
    assert stream.epoch == 3, "the prepared loader passes the epoch to the stream"
