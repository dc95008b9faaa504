"""`ndclip shards` (ndclip.shards): each cheap source kind written as webdataset (or parquet) shards in img2dataset's
layout, with the original image bytes, a correct index, the shard sizes asked for, bad samples dropped and counted,
and no index or partial shard left by a write that fails."""

import json
import os
import tarfile

import datasets
import pytest
from datasets import Dataset, Image, load_dataset

from ndclip.cli import main
from ndclip.data import load_image_caption_dataset, without_image_decoding
from ndclip.layouts import (
    write_csv_one_caption_per_row,
    write_imagefolder,
    write_kaggle_flickr8k,
    write_messy_images,
    write_original_flickr8k,
)
from ndclip.shards import INDEX_FILE, indexed_sample_count, read_shard_index, write_shards, write_source_shards

datasets.disable_progress_bars()


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


def samples_of_folder(folder) -> list[dict]:
    """{key, ext, image, txt, json} of every sample of the folder's tar shards, in shard and file order, checking
    that each sample is its image, txt and json files, in that order."""
    samples = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        members = tar_members(os.path.join(folder, name))
        assert len(members) % 3 == 0
        for (image_name, image), (txt_name, txt), (json_name, metadata) in zip(*[iter(members)] * 3):
            key, extension = image_name.split(".")
            assert (txt_name, json_name) == (f"{key}.txt", f"{key}.json")
            samples.append(
                {
                    "key": key,
                    "ext": extension,
                    "image": image,
                    "txt": txt.decode(),
                    "json": json.loads(metadata),
                    "shard": name,
                }
            )
    return samples


def original_images(split: Dataset) -> dict[int, bytes]:
    """{image_id: the bytes of the image's file (or inline bytes)} of a map-style split."""
    images = {}
    for row in without_image_decoding(split):
        image = row["image"]
        if image["bytes"] is None:
            with open(image["path"], "rb") as file:
                images[row["image_id"]] = file.read()
        else:
            images[row["image_id"]] = image["bytes"]
    return images


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """A Kaggle Flickr8k folder of 14 images, its map-style splits, and its shards (4 samples per shard)."""
    root = tmp_path_factory.mktemp("kaggle")
    write_kaggle_flickr8k(root / "flickr", 14)
    cache = str(root / "cache")
    indexes = write_source_shards(root / "shards", samples_per_shard=4, data_dir=str(root / "flickr"), cache_dir=cache)
    return {
        "splits": load_image_caption_dataset(data_dir=str(root / "flickr"), cache_dir=cache),
        "shards": root / "shards",
        "indexes": indexes,
    }


def test_kaggle_flickr8k_shards_hold_the_original_bytes_and_every_caption(kaggle):
    for split_name, split in kaggle["splits"].items():
        folder = kaggle["shards"] / split_name
        samples = samples_of_folder(folder)
        originals = original_images(split)
        assert len(samples) == len(split) == len(originals)
        assert [sample["key"] for sample in samples] == [f"{n:09d}" for n in range(len(split))]
        for sample in samples:
            row = split[sample["json"]["image_id"]]
            assert sample["image"] == originals[sample["json"]["image_id"]], "image bytes are not re-encoded"
            assert sample["ext"] == "jpg"
            assert sample["json"]["captions"] == row["captions"] and sample["txt"] == row["captions"][0]
            assert sample["json"]["key"] == sample["key"]
            assert sample["json"]["file_name"].endswith("_abc.jpg")


def test_index_counts_every_shard_and_is_the_returned_one(kaggle):
    for split_name, split in kaggle["splits"].items():
        folder = kaggle["shards"] / split_name
        index = read_shard_index(folder)
        assert index == kaggle["indexes"][split_name]
        counted = {name: len(tar_members(folder / name)) // 3 for name in os.listdir(folder) if name.endswith(".tar")}
        assert index["shards"] == counted and index["total_samples"] == len(split)
        assert all(count == 4 for count in list(counted.values())[:-1]), "every shard but the last is full"
        assert index["format"] == "webdataset" and index["source"]["split"] == split_name
        assert index["source"]["data_dir"].endswith("flickr") and index["dropped_samples"] == {}
        assert sorted(os.listdir(folder)) == sorted([*counted, INDEX_FILE]), "no temporary file is left"
    shard_files = sorted(str(path) for path in (kaggle["shards"] / "train").glob("*.tar"))
    assert indexed_sample_count(shard_files) == len(kaggle["splits"]["train"])
    assert indexed_sample_count(shard_files[:2]) == 8


def test_csv_source_keeps_png_bytes_and_groups_captions_by_image(tmp_path):
    csv_path = write_csv_one_caption_per_row(tmp_path / "csv", 5)
    cache = str(tmp_path / "cache")
    write_source_shards(tmp_path / "shards", splits=["train"], train_file=csv_path, cache_dir=cache)
    split = load_image_caption_dataset(train_file=csv_path, cache_dir=cache)["train"]
    samples = samples_of_folder(tmp_path / "shards" / "train")
    originals = original_images(split)
    assert len(samples) == len(split) and os.listdir(tmp_path / "shards") == ["train"]
    for sample in samples:
        assert sample["ext"] == "png" and sample["image"] == originals[sample["json"]["image_id"]]
        assert len(sample["json"]["captions"]) == 5


def test_imagefolder_through_the_command_in_equal_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_imagefolder(tmp_path / "folder", 11)
    main(
        [
            "shards",
            "--data_dir",
            str(tmp_path / "folder"),
            "--output_dir",
            str(tmp_path / "shards"),
            "--num_shards",
            "4",
            "--splits",
            "train",
            "--validation_fraction",
            "0.1",
        ]
    )
    index = read_shard_index(tmp_path / "shards" / "train")
    sizes = list(index["shards"].values())
    assert len(sizes) == 4 and max(sizes) - min(sizes) <= 1 and sum(sizes) == index["total_samples"] == 9
    assert f"train: 9 samples in 4 shards in {tmp_path / 'shards' / 'train'}" in capsys.readouterr().out
    assert all(len(sample["json"]["captions"]) == 1 for sample in samples_of_folder(tmp_path / "shards" / "train"))


def test_original_flickr8k_splits_and_byte_limited_shards(tmp_path):
    write_original_flickr8k(tmp_path / "flickr", "Flicker8k_Dataset", split_sizes=(6, 2, 2))
    image_bytes = os.path.getsize(next((tmp_path / "flickr" / "Flicker8k_Dataset").iterdir()))
    limit = 3 * (image_bytes + 3 * 512 + 1000)
    indexes = write_source_shards(
        tmp_path / "shards",
        splits=["train", "test"],
        max_shard_bytes=limit,
        data_dir=str(tmp_path / "flickr"),
        cache_dir=str(tmp_path / "cache"),
    )
    assert sorted(os.listdir(tmp_path / "shards")) == ["test", "train"]
    assert indexes["train"]["total_samples"] == 6 and indexes["test"]["total_samples"] == 2
    assert len(indexes["train"]["shards"]) >= 2, "the byte limit cuts the split into several shards"
    for name in indexes["train"]["shards"]:
        members = tar_members(tmp_path / "shards" / "train" / name)
        assert sum(512 + -(-len(data) // 512) * 512 for _, data in members) <= limit, "headers and padded files"


def test_bad_samples_are_dropped_before_writing_and_counted_in_the_index(tmp_path):
    names = write_messy_images(tmp_path / "messy")
    lines = ["image_path,caption"] + [f"{name},a photo of {name}" for name in names if name != "uncaptioned.jpg"]
    lines.append("uncaptioned.jpg,")
    (tmp_path / "messy" / "captions.csv").write_text("\n".join(lines) + "\n")
    source = {"train_file": str(tmp_path / "messy" / "captions.csv"), "cache_dir": str(tmp_path / "cache")}
    index = write_source_shards(tmp_path / "shards", splits=["train", "validation"], **source)
    reference = load_image_caption_dataset(**source)
    dropped = {split: dict(counts) for split, counts in reference.dropped_samples.items()}
    assert index["train"]["dropped_samples"] == dropped["train"]
    assert sum(dropped["train"].values()) == 5, "truncated, corrupt, text, missing and uncaptioned images"
    kept = sorted(
        s["json"]["file_name"]
        for split in ("train", "validation")
        for s in samples_of_folder(tmp_path / "shards" / split)
    )
    assert kept == sorted(["good.jpg", "gray.png", "rgba.png", "cmyk.jpg", "palette.png"])
    extensions = {s["json"]["file_name"]: s["ext"] for s in samples_of_folder(tmp_path / "shards" / "train")}
    assert all(name.endswith(extension) for name, extension in extensions.items()), "each keeps its format's extension"


def test_parquet_shards_are_read_back_by_datasets(kaggle, tmp_path):
    split = kaggle["splits"]["train"]
    index = write_shards(split, tmp_path / "parquet", num_shards=2, shard_format="parquet")
    assert list(index["shards"]) == ["00000.parquet", "00001.parquet"]
    files = [str(tmp_path / "parquet" / name) for name in index["shards"]]
    rows = load_dataset("parquet", data_files=files, split="train").cast_column("image", Image(decode=False))
    originals = original_images(split)
    assert len(rows) == index["total_samples"] == len(split)
    for row in rows:
        assert (
            row["image"]["bytes"] == originals[row["image_id"]]
            and row["captions"] == split[row["image_id"]]["captions"]
        )
        assert row["image"]["path"] == f"{row['key']}.jpg"


def test_existing_shards_are_kept_unless_overwritten(kaggle, tmp_path, ndclip_error):
    folder = tmp_path / "shards"
    write_shards(kaggle["splits"]["validation"], folder)
    (folder / "notes.txt").write_text("mine")
    error = ndclip_error("shards", "--data_dir", tmp_path / "absent", "--output_dir", tmp_path, "--splits", "train")
    assert "absent" in error
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        write_shards(kaggle["splits"]["train"], folder)
    write_shards(kaggle["splits"]["train"], folder, num_shards=3, overwrite=True)
    assert sorted(os.listdir(folder)) == ["00000.tar", "00001.tar", "00002.tar", INDEX_FILE, "notes.txt"]


def test_a_write_that_fails_leaves_no_index_and_no_partial_shard(kaggle, tmp_path):
    rows = without_image_decoding(kaggle["splits"]["train"]).to_dict()
    rows["image"][6] = {"bytes": None, "path": str(tmp_path / "deleted.jpg")}  # vanished since it was checked
    broken = Dataset.from_dict(rows).cast_column("image", Image(decode=False))
    with pytest.raises(FileNotFoundError, match="deleted.jpg"):
        write_shards(broken, tmp_path / "shards", samples_per_shard=4)
    assert os.listdir(tmp_path / "shards") == ["00000.tar"], "the complete shard stays; no index, no partial file"
    with pytest.raises(ValueError, match=f"no {INDEX_FILE}"):
        read_shard_index(tmp_path / "shards")


def test_shard_sizes_are_checked(kaggle, tmp_path, ndclip_error):
    split = kaggle["splits"]["train"]
    with pytest.raises(ValueError, match="either num_shards, or samples_per_shard"):
        write_shards(split, tmp_path / "a", num_shards=2, samples_per_shard=3)
    with pytest.raises(ValueError, match=r"between 1 and the number of samples \(12\)"):
        write_shards(split, tmp_path / "b", num_shards=13)
    error = ndclip_error("shards", "--data_dir", "x", "--output_dir", tmp_path, "--max_shard_bytes", "12 parsecs")
    assert "'12 parsecs' is not a size" in error


def test_sizes_read_in_bytes():
    from ndclip.shards import parse_bytes

    assert [parse_bytes(text) for text in ("100", "2KB", "1.5MB", "1GiB")] == [100, 2000, 1_500_000, 2**30]
