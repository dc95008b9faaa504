"""ndclip.data on tiny data written in the formats the real sources use (`ndclip.layouts`): the `jxie/flickr8k`
parquet layout, the Kaggle and the original Flickr8k folders, csv/json files, an imagefolder; bad samples, splitting,
and the views of the schema that training and evaluation read (`without_image_decoding`, `flatten_captions`)."""

import io
import logging
import os
import re

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from ndclip.data import (
    DatasetDownloadError,
    drop_unusable_samples,
    flatten_captions,
    load_image_caption_dataset,
    without_image_decoding,
)
from ndclip.layouts import (
    BOGUS_FLICKR8K_NAME,
    captions_of,
    picture,
    write_csv_one_caption_per_row,
    write_hub_parquet,
    write_imagefolder,
    write_images,
    write_jsonl_caption_lists,
    write_kaggle_flickr8k,
    write_messy_images,
    write_original_flickr8k,
)

datasets.disable_progress_bars()

DATA_LOGGER = "ndclip.data"


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def assert_one_row_per_image(split: Dataset, captions_per_image: int = 5) -> None:
    assert isinstance(split.features["image"], Image) and split.features["image"].decode
    assert split.features["captions"] == List(Value("string"))
    assert split["image_id"][:] == list(range(len(split)))
    for captions in split["captions"][:]:
        assert len(captions) == captions_per_image
        assert len({caption.split()[1] for caption in captions}) == 1, "captions of one image stay together"


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def test_hub_layout_parquet_with_numbered_captions_keeps_official_splits_and_label(tmp_path, cache_dir):
    """The `jxie/flickr8k` schema (image bytes + caption_0..caption_4) as parquet files in the Hub's data/ layout."""
    sizes = {"train": 6, "validation": 3, "test": 2}
    write_hub_parquet(tmp_path / "hub", sizes)

    loaded = load_image_caption_dataset(dataset_name=str(tmp_path / "hub"), cache_dir=cache_dir)

    assert {split: len(loaded[split]) for split in loaded} == sizes
    assert loaded.dropped_samples == {split: {} for split in sizes}
    for split in loaded.values():
        assert_one_row_per_image(split)
        assert isinstance(split.features["label"], ClassLabel)
    row = loaded["validation"][1]
    assert row["captions"] == captions_of(7)
    assert row["label"] == 1
    assert isinstance(row["image"], PILImage.Image) and row["image"].size == (32, 24)


def test_hub_dataset_offline_gives_one_clear_error(cache_dir):
    with pytest.raises(DatasetDownloadError) as error:
        load_image_caption_dataset(dataset_name="jxie/flickr8k", cache_dir=cache_dir)
    message = str(error.value)
    assert "jxie/flickr8k" in message
    assert "--data_dir" in message and "--train_file" in message and "--preset demo" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_kaggle_flickr8k_folder_is_split_by_image(tmp_path, cache_dir):
    write_kaggle_flickr8k(tmp_path / "kaggle", count=10)

    loaded = load_image_caption_dataset(data_dir=str(tmp_path / "kaggle"), validation_fraction=0.2, cache_dir=cache_dir)
    again = load_image_caption_dataset(data_dir=str(tmp_path / "kaggle"), validation_fraction=0.2, cache_dir=cache_dir)

    assert list(loaded) == ["train", "validation"]
    assert (len(loaded["train"]), len(loaded["validation"])) == (8, 2)
    for split in loaded.values():
        assert_one_row_per_image(split)
    paths = {split: {image["path"] for image in without_image_decoding(loaded[split])["image"]}
             for split in loaded}
    assert not paths["train"] & paths["validation"]
    assert len(paths["train"] | paths["validation"]) == 10
    assert loaded["validation"]["captions"][:] == again["validation"]["captions"][:], "the split follows the seed"
    loaded_captions = sorted(captions for split in loaded.values() for captions in split["captions"][:])
    assert loaded_captions == sorted(captions_of(n) for n in range(10)), "quoted commas stay inside captions"


@pytest.mark.parametrize(
    "contents, line",
    [
        ("image,caption\na.jpg,a dog\nb.jpg,a dog , running\n", 3),  # an unquoted comma
        ("a.jpg,a dog\nb.jpg,a cat\n", 1),  # no header
    ],
)
def test_malformed_kaggle_captions_name_file_and_line(tmp_path, cache_dir, contents, line):
    write_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.txt").write_text(contents)
    with pytest.raises(ValueError, match=rf"captions\.txt, line {line}"):
        load_image_caption_dataset(data_dir=str(tmp_path), cache_dir=cache_dir)


@pytest.mark.parametrize("image_dir", ["Flicker8k_Dataset", "Flicker8k_Dataset/Flicker8k_Dataset"])
def test_original_flickr8k_release_uses_split_lists_and_skips_absent_images(tmp_path, cache_dir, caplog, image_dir):
    names = write_original_flickr8k(tmp_path, image_dir)

    with caplog.at_level(logging.WARNING, logger=DATA_LOGGER):
        loaded = load_image_caption_dataset(data_dir=str(tmp_path), cache_dir=cache_dir)

    assert {split: len(loaded[split]) for split in loaded} == {"train": 4, "validation": 2, "test": 2}
    for split in loaded.values():
        assert_one_row_per_image(split)
    test_paths = [image["path"] for image in without_image_decoding(loaded["test"])["image"]]
    assert [os.path.basename(path) for path in test_paths] == names[6:]
    assert loaded["test"]["captions"][:] == [captions_of(6), captions_of(7)]
    skipped = [record.getMessage() for record in caplog.records if BOGUS_FLICKR8K_NAME in record.getMessage()]
    assert len(skipped) == 1 and "skipped 5 caption lines of 1 images" in skipped[0]


def test_token_line_without_tab_names_file_and_line(tmp_path, cache_dir):
    write_original_flickr8k(tmp_path, "Flickr8k_Dataset")
    token_file = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token_file.read_text().splitlines()
    lines[2] = lines[2].replace("\t", " ")
    token_file.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt, line 3"):
        load_image_caption_dataset(data_dir=str(tmp_path), cache_dir=cache_dir)


@pytest.mark.parametrize(
    "contents",
    [
        # The quote never closes: csv reads the rest of the file into one caption.
        'image,caption\na.jpg,a dog runs\na.jpg,"a dog , near the sea\nb.jpg,a cat sits\nb.jpg,a cat runs\n',
        # The next quoted caption's opening quote closes it, lines later.
        'image,caption\na.jpg,a dog runs\na.jpg,"a dog , near the sea\nb.jpg,a cat sits\nb.jpg,"a cat , runs"\n',
    ],
    ids=["never_closed", "closed_lines_later"],
)
def test_unterminated_quote_in_kaggle_captions_names_the_line_where_it_opens(tmp_path, cache_dir, contents):
    write_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    (tmp_path / "captions.txt").write_text(contents)
    with pytest.raises(ValueError, match=r"captions\.txt, line 3: .*quote"):
        load_image_caption_dataset(data_dir=str(tmp_path), cache_dir=cache_dir)


def test_caption_files_with_a_utf8_byte_order_mark_are_read(tmp_path, cache_dir):
    """Windows editors save UTF-8 with a BOM: the Kaggle header must still be found, and the first image of the token
    file and of a split list must keep its name."""
    write_kaggle_flickr8k(tmp_path / "kaggle", count=4)
    captions_file = tmp_path / "kaggle" / "captions.txt"
    captions_file.write_text("\ufeff" + captions_file.read_text(), encoding="utf-8")
    write_original_flickr8k(tmp_path / "original", "Flickr8k_Dataset")
    text_dir = tmp_path / "original" / "Flickr8k_text"
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt"):
        (text_dir / name).write_text("\ufeff" + (text_dir / name).read_text(), encoding="utf-8")

    kaggle = load_image_caption_dataset(data_dir=str(tmp_path / "kaggle"), validation_fraction=0.5, cache_dir=cache_dir)
    original = load_image_caption_dataset(data_dir=str(tmp_path / "original"), cache_dir=cache_dir)

    assert sorted(captions for split in kaggle.values() for captions in split["captions"][:]) == [
        captions_of(n) for n in range(4)
    ]
    assert {split: len(original[split]) for split in original} == {"train": 4, "validation": 2, "test": 2}
    assert original.dropped_samples == {"train": {}, "validation": {}, "test": {}}
    assert original["train"]["captions"][0] == captions_of(0)


def write_latin1_line(path, line_number: int) -> None:
    """Put a Latin-1 "café" into line `line_number` (1-based) of a UTF-8 text file: in place of the word "photo" of
    its caption, or at its end when it has none (a split list's image name)."""
    lines = path.read_bytes().split(b"\n")
    line, cafe = lines[line_number - 1], "café".encode("latin-1")
    lines[line_number - 1] = line.replace(b"photo", cafe, 1) if b"photo" in line else line + b" " + cafe
    path.write_bytes(b"\n".join(lines))


def data_with_a_latin1_line(kind, folder) -> tuple[dict, str]:
    """Data of each source whose captions (or split list) file has a non-UTF-8 line 3: (loader arguments, file)."""
    if kind == "kaggle":
        write_kaggle_flickr8k(folder, count=2)
        path = folder / "captions.txt"
    elif kind in ("token", "split_list"):
        write_original_flickr8k(folder, "Flickr8k_Dataset")
        path = folder / "Flickr8k_text" / ("Flickr8k.token.txt" if kind == "token" else "Flickr_8k.trainImages.txt")
    elif kind == "csv":
        path = folder / "train.csv"
        write_csv_one_caption_per_row(folder, 2)
    elif kind == "jsonl":
        path = folder / "train.jsonl"
        write_jsonl_caption_lists(folder, {"train": range(4)})
    else:
        write_imagefolder(folder, 3)
        path = folder / "metadata.csv"
    write_latin1_line(path, 3)
    return {"train_file": str(path)} if kind in ("csv", "jsonl") else {"data_dir": str(folder)}, path.name


@pytest.mark.parametrize("kind", ["kaggle", "token", "split_list", "csv", "jsonl", "imagefolder_metadata"])
def test_caption_files_that_are_not_utf8_name_the_file_and_line(tmp_path, cache_dir, kind):
    arguments, name = data_with_a_latin1_line(kind, tmp_path / "data")
    with pytest.raises(ValueError, match=rf"{re.escape(name)}, line 3: not UTF-8 text \(byte \d+: 0xe9\)"):
        load_image_caption_dataset(cache_dir=cache_dir, **arguments)


def test_csv_with_one_caption_per_row_groups_rows_by_relative_image_path(tmp_path, cache_dir):
    csv_file = write_csv_one_caption_per_row(tmp_path / "data", 6)

    loaded = load_image_caption_dataset(train_file=str(csv_file), validation_fraction=0.3, cache_dir=cache_dir)

    assert (len(loaded["train"]), len(loaded["validation"])) == (4, 2)
    for split in loaded.values():
        assert_one_row_per_image(split)
        for image, captions in zip(split["image"], split["captions"][:]):
            assert np.array_equal(np.asarray(image), np.asarray(picture(int(captions[0].split()[1]))))


def test_json_files_with_a_list_of_captions_keep_their_splits(tmp_path, cache_dir):
    write_jsonl_caption_lists(tmp_path, {"train": range(3), "validation": range(3, 5)})

    loaded = load_image_caption_dataset(
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "validation.jsonl"),
        cache_dir=cache_dir,
    )

    assert loaded["validation"]["captions"][:] == [captions_of(3), captions_of(4)]
    assert len(loaded["train"]) == 3
    assert_one_row_per_image(loaded["train"])


def test_data_file_without_caption_column_or_with_a_bad_row_names_the_file(tmp_path, cache_dir):
    (tmp_path / "no_captions.csv").write_text("image_path,author\na.png,me\n")
    with pytest.raises(ValueError, match=r"no_captions\.csv.*no caption column"):
        load_image_caption_dataset(train_file=str(tmp_path / "no_captions.csv"), cache_dir=cache_dir)
    (tmp_path / "bad_row.csv").write_text("image_path,caption\na.png,a dog\nb.png,a dog,running\n")
    with pytest.raises(ValueError, match=r"bad_row\.csv.*line 3"):
        load_image_caption_dataset(train_file=str(tmp_path / "bad_row.csv"), cache_dir=cache_dir)


@pytest.mark.parametrize(
    "file_type, columns, arguments, message",
    [
        ("parquet", {"image": [1, 2], "caption": ["a dog", "a cat"]}, {}, "the image column 'image' holds int64"),
        ("jsonl", {"image": [{"x": 1}, {"x": 2}], "caption": ["a dog", "a cat"]}, {},
         r"the image column 'image' holds structs \{x\}"),
        ("csv", {"image_path": ["a.png", "b.png"], "caption": [1, 2]}, {}, "the caption column 'caption' holds int64"),
        ("parquet", {"image_path": ["a.png", "b.png"], "caption": [1, 2]}, {"caption_column": "caption"},
         "the caption column 'caption' holds int64"),
        ("parquet", {"image_path": ["a.png", "b.png"], "caption": [{"raw": "a dog"}, {"raw": "a cat"}]},
         {"caption_column": "caption"}, r"the caption column 'caption' holds structs \{raw\}"),
        ("jsonl", {"image_path": ["a.png", "b.png"], "sentences": [[1], [2]]}, {},
         "the caption column 'sentences' holds lists of int64"),
        ("parquet", {"image_path": ["a.png", "b.png"], "caption_0": ["a dog", "a cat"], "caption_1": [1.5, 2.5]}, {},
         "the caption column 'caption_1' holds float64"),
    ],
    ids=["int_image", "struct_image", "int_caption", "int_caption_named", "struct_caption", "int_list_captions",
         "float_numbered_caption"],
)
def test_columns_of_the_wrong_type_are_named_with_their_type(tmp_path, cache_dir, file_type, columns, arguments,
                                                            message):
    path = str(tmp_path / f"bad.{file_type}")
    table = Dataset.from_dict(columns)
    {"parquet": table.to_parquet, "jsonl": table.to_json, "csv": table.to_csv}[file_type](path)
    with pytest.raises(ValueError, match=rf"bad\.{file_type}: {message}"):
        load_image_caption_dataset(train_file=path, cache_dir=cache_dir, **arguments)


def test_imagefolder_with_captions_in_metadata(tmp_path, cache_dir):
    folder = tmp_path / "folder"
    write_imagefolder(folder, 5)

    loaded = load_image_caption_dataset(data_dir=str(folder), validation_fraction=0.2, cache_dir=cache_dir)

    assert (len(loaded["train"]), len(loaded["validation"])) == (4, 1)
    captions = sorted(captions for split in loaded.values() for captions in split["captions"][:])
    assert captions == sorted([captions_of(n)[2]] for n in range(5))


# ----------------------------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def messy_dataset(tmp_path) -> Dataset:
    """Good images in every colour mode, and each kind of broken sample, as files and as inline bytes."""
    folder = tmp_path / "messy"
    files = write_messy_images(folder)
    images = [{"path": str(folder / name), "bytes": None} for name in files]
    images.append({"path": "inline.jpg", "bytes": b"\xff\xd8\xff\xe0 garbage"})
    captions = [["a dog", "", "  ", "a cat"]] + [["a dog"]] * 8 + [["", " "], ["a dog"]]
    return Dataset.from_dict({"image": images, "captions": captions}).cast_column("image", Image())


EXPECTED_DROPS = {"corrupt_image": 3, "not_an_image": 1, "missing_file": 1, "no_caption": 1}


def test_unusable_samples_are_dropped_counted_and_logged(messy_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger=DATA_LOGGER):
        usable, dropped = drop_unusable_samples(messy_dataset, "train")

    assert dropped == EXPECTED_DROPS
    kept = [image["path"] for image in without_image_decoding(usable)["image"]]
    assert [os.path.basename(path) for path in kept] == ["good.jpg", "gray.png", "rgba.png", "cmyk.jpg", "palette.png"]
    assert usable["captions"][0] == ["a dog", "a cat"], "empty strings inside a caption list are dropped"
    [message] = [record.getMessage() for record in caplog.records if record.name == DATA_LOGGER]
    assert "train: dropped 6 of 11 samples" in message
    for name in ["truncated.jpg", "corrupt.png", "notes.jpg", "inline.jpg", "missing.jpg", "uncaptioned.jpg"]:
        assert name in message
    assert "3 corrupt_image (truncated.jpg, corrupt.png, inline.jpg)" in message and "1 no_caption" in message

    modes = [image.mode for image in usable["image"]]
    assert modes == ["RGB", "L", "RGBA", "CMYK", "P"], "other colour modes are kept (the transforms convert them)"


def test_unusable_samples_check_runs_on_several_processes(messy_dataset):
    usable, dropped = drop_unusable_samples(messy_dataset, "train", num_proc=2)
    assert dropped == EXPECTED_DROPS and len(usable) == 5


def test_nothing_usable_is_an_error_naming_split_and_reasons(messy_dataset):
    broken = messy_dataset.select([6, 8, 9])
    with pytest.raises(ValueError, match=r"No usable samples remain in split 'validation'.*corrupt_image"):
        drop_unusable_samples(broken, "validation")


@pytest.mark.parametrize("layout", ["kaggle", "csv"])
def test_image_paths_outside_the_data_folder_are_skipped_and_counted(tmp_path, cache_dir, caplog, layout):
    """A captions file naming `../` or absolute paths must not make training read files from elsewhere on the disk.
    The data folder is `data_dir`, or the folder of a `--train_file`; an image folder linked into it is part of it."""
    write_images(tmp_path / "private", ["secret.jpg"])
    secret = tmp_path / "private" / "secret.jpg"
    data, store = tmp_path / "data", tmp_path / "store"
    if layout == "kaggle":
        write_kaggle_flickr8k(store, count=4)
        escaping = ["../../private/secret.jpg", str(secret)]  # image names are relative to data/Images
        data.mkdir()
        (data / "captions.txt").write_text(
            (store / "captions.txt").read_text() + "".join(f"{path},a secret\n" for path in escaping)
        )
        (data / "Images").symlink_to(store / "Images")
        arguments = {"data_dir": str(data)}
    else:
        write_csv_one_caption_per_row(store, 4)
        escaping = ["../private/secret.jpg", str(secret)]
        rows = Dataset.from_csv(str(store / "train.csv")).to_dict()
        rows = {"image_path": rows["image_path"] + escaping, "caption": rows["caption"] + ["a secret"] * 2}
        data.mkdir()
        Dataset.from_dict(rows).to_csv(str(data / "train.csv"))
        (data / "pictures").symlink_to(store / "pictures")
        arguments = {"train_file": str(data / "train.csv")}

    with caplog.at_level(logging.WARNING, logger=DATA_LOGGER):
        loaded = load_image_caption_dataset(validation_fraction=0.25, cache_dir=cache_dir, **arguments)

    assert loaded.dropped_samples["train"] == {"outside_data_folder": 2}
    captions = sorted(captions for split in loaded.values() for captions in split["captions"][:])
    assert captions == [captions_of(n) for n in range(4)], "the images of the linked folder are all kept"
    [message] = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert f"2 outside_data_folder ({secret}, {secret})" in message


def test_imagefolder_metadata_naming_a_file_outside_the_folder_is_a_clear_error(tmp_path, cache_dir):
    write_imagefolder(tmp_path / "folder", 2)
    write_images(tmp_path, ["secret.png"], image_format="PNG")
    with open(tmp_path / "folder" / "metadata.csv", "a") as file:
        file.write("../secret.png,a secret\n")
    with pytest.raises(ValueError, match=r"folder: could not be read as an imagefolder: .*'\.\./secret\.png'"):
        load_image_caption_dataset(data_dir=str(tmp_path / "folder"), cache_dir=cache_dir)


def test_loader_drops_unusable_rows_before_numbering_images(tmp_path, cache_dir):
    write_images(tmp_path, [f"{n}.png" for n in range(4)], image_format="PNG")
    (tmp_path / "3.png").write_text("not an image")
    rows = {"image_path": [f"{n}.png" for n in range(5)], "caption": [captions_of(n)[0] for n in range(4)] + [""]}
    Dataset.from_dict(rows).to_json(str(tmp_path / "train.jsonl"))
    Dataset.from_dict({"image_path": ["0.png"], "caption": ["a dog"]}).to_json(str(tmp_path / "validation.jsonl"))

    loaded = load_image_caption_dataset(
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "validation.jsonl"),
        cache_dir=cache_dir,
    )

    assert loaded.dropped_samples == {"train": {"not_an_image": 1, "no_caption": 1}, "validation": {}}
    assert loaded["train"]["image_id"][:] == [0, 1, 2]
    assert loaded["train"]["captions"][:] == [[captions_of(n)[0]] for n in range(3)]


# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Views for training and evaluation
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned_images() -> Dataset:
    features = Features({"image": Image(), "captions": List(Value("string")), "image_id": Value("int64")})
    table = {"image": [picture(n) for n in range(3)], "captions": [captions_of(n)[: n + 1] for n in range(3)],
             "image_id": list(range(3))}
    return Dataset.from_dict(table, features=features)


def test_flatten_captions_gives_one_row_per_caption_with_its_image(captioned_images):
    flat = flatten_captions(captioned_images)
    assert flat.column_names == ["image_id", "caption"]
    assert flat["image_id"][:] == [0, 1, 1, 2, 2, 2]
    assert flat["caption"][:] == captions_of(0)[:1] + captions_of(1)[:2] + captions_of(2)[:3]


def test_without_image_decoding_gives_the_encoded_file(captioned_images):
    [row] = without_image_decoding(captioned_images.select([1]))
    assert set(row["image"]) == {"bytes", "path"}
    assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(row["image"]["bytes"]))), np.asarray(picture(1)))
