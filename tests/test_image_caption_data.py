"""Tests for the image-caption data layer, on tiny data written in the test in the formats the real sources use:
the `jxie/flickr8k` parquet layout, the Kaggle and the original Flickr8k folders, csv/json files, an imagefolder."""

import logging
import os
import re

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from transformers import CLIPImageProcessor, ViTImageProcessor

from ndclip.data import (
    CaptionCollator,
    DatasetDownloadError,
    DecodeImage,
    TextCollator,
    drop_unusable_samples,
    eval_image_transform,
    flatten_captions,
    load_image_caption_dataset,
    train_image_transform,
    with_image_transform,
    without_image_decoding,
)
from ndclip.layouts import (
    BOGUS_FLICKR8K_NAME,
    captions_of,
    encoded,
    picture,
    write_hub_parquet,
    write_images,
    write_csv_one_caption_per_row,
    write_imagefolder,
    write_jsonl_caption_lists,
    write_kaggle_flickr8k,
    write_messy_images,
    write_original_flickr8k,
)
from ndclip.inference import open_image
from ndclip.tiny_towers import train_wordpiece_tokenizer

datasets.disable_progress_bars()

@pytest.fixture(scope="module")
def tokenizer():
    texts = [caption for number in range(16) for caption in captions_of(number)]
    return train_wordpiece_tokenizer(texts, vocab_size=200)


@pytest.fixture(scope="module")
def image_processor():
    return ViTImageProcessor(size={"height": 30, "width": 30})


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
    paths = {split: {image["path"] for image in loaded[split].cast_column("image", Image(decode=False))["image"]}
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

    with caplog.at_level(logging.WARNING, logger="image_caption_data"):
        loaded = load_image_caption_dataset(data_dir=str(tmp_path), cache_dir=cache_dir)

    assert {split: len(loaded[split]) for split in loaded} == {"train": 4, "validation": 2, "test": 2}
    for split in loaded.values():
        assert_one_row_per_image(split)
    test_paths = [image["path"] for image in loaded["test"].cast_column("image", Image(decode=False))["image"]]
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


def test_unusable_samples_are_dropped_counted_and_logged(messy_dataset, caplog, image_processor):
    with caplog.at_level(logging.WARNING, logger="image_caption_data"):
        usable, dropped = drop_unusable_samples(messy_dataset, "train")

    assert dropped == EXPECTED_DROPS
    kept = [image["path"] for image in usable.cast_column("image", Image(decode=False))["image"]]
    assert [os.path.basename(path) for path in kept] == ["good.jpg", "gray.png", "rgba.png", "cmyk.jpg", "palette.png"]
    assert usable["captions"][0] == ["a dog", "a cat"], "empty strings inside a caption list are dropped"
    [message] = [record.getMessage() for record in caplog.records if record.name == "image_caption_data"]
    assert "train: dropped 6 of 11 samples" in message
    for name in ["truncated.jpg", "corrupt.png", "notes.jpg", "inline.jpg", "missing.jpg", "uncaptioned.jpg"]:
        assert name in message
    assert "3 corrupt_image (truncated.jpg, corrupt.png, inline.jpg)" in message and "1 no_caption" in message

    modes = [image.mode for image in usable["image"]]
    assert modes == ["RGB", "L", "RGBA", "CMYK", "P"], "other colour modes are kept, not converted on load"
    encoded = without_image_decoding(usable)  # how run_clip.py reads training rows: decoded by the transform
    for transform in (eval_image_transform(image_processor), train_image_transform(image_processor)):
        for view in (usable, encoded):
            for row in with_image_transform(view, transform):
                assert row["pixel_values"].shape == (3, 30, 30) and row["pixel_values"].dtype == torch.float32
    evaluate = eval_image_transform(image_processor)
    for decoded_row, encoded_row in zip(usable, encoded):
        assert isinstance(encoded_row["image"], dict)
        torch.testing.assert_close(evaluate(encoded_row["image"]), evaluate(decoded_row["image"]), rtol=0, atol=0)


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

    with caplog.at_level(logging.WARNING, logger="image_caption_data"):
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
# Transforms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_eval_transform_matches_the_image_processor(mode):
    image_processor = ViTImageProcessor(size={"height": 30, "width": 30}, do_convert_rgb=True)
    image = picture(0, size=(40, 48), mode=mode)
    expected = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(eval_image_transform(image_processor)(image), expected, atol=1e-5, rtol=0)


def test_eval_transform_with_shortest_edge_and_center_crop_matches_the_image_processor():
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    image = picture(0, size=(40, 60))
    expected = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    actual = eval_image_transform(image_processor)(image)
    assert actual.shape == (3, 28, 28)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_train_transform_is_random_but_keeps_left_right_and_colours(image_processor):
    """Red left half, blue right half: no crop, flip or colour change may move red to the right or alter it."""
    array = np.zeros((36, 48, 3), dtype=np.uint8)
    array[:, :24, 0] = 255
    array[:, 24:, 2] = 255
    image = PILImage.fromarray(array)
    transform = train_image_transform(image_processor)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(30)]

    assert not all(torch.equal(outputs[0], output) for output in outputs[1:]), "training crops are random"
    for pixels in outputs:
        assert pixels.shape == (3, 30, 30)
        left, right = pixels[:, :, :4], pixels[:, :, -4:]
        red, blue = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
        torch.testing.assert_close(left, red.expand_as(left))
        torch.testing.assert_close(right, blue.expand_as(right))


def deep_grey(grey: PILImage.Image, mode: str, values: str) -> PILImage.Image:
    """The 8-bit greyscale picture `grey` as PIL gives it from a deeper file: `values` "16-bit" (v * 257, as an 8-bit
    value is widened), "8-bit" (v), "unit" (v / 255) or "offset" (1000 v - 100000, a range to stretch)."""
    v = np.asarray(grey).astype(np.int64)
    array = {"16-bit": v * 257, "8-bit": v, "unit": v / 255, "offset": 1000 * v - 100000}[values]
    if mode == "I;16B":
        return PILImage.frombytes(mode, grey.size, array.astype(">u2").tobytes())
    return PILImage.fromarray(array.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))


def full_range_grey() -> PILImage.Image:
    grey = np.asarray(picture(0, size=(40, 48), mode="L")).copy()
    grey[0, :2] = [0, 255]  # the full 8-bit range, so that a stretched range maps back onto it exactly
    return PILImage.fromarray(grey)


@pytest.mark.parametrize(
    "mode, values",
    [("I;16", "16-bit"), ("I;16B", "16-bit"), ("I", "16-bit"), ("I", "8-bit"), ("I", "offset"), ("F", "unit"),
     ("F", "offset")],
)
def test_high_bit_depth_greyscale_gives_the_pixels_of_its_8_bit_rendering(image_processor, mode, values):
    grey = full_range_grey()
    deep = deep_grey(grey, mode, values)
    assert deep.mode == mode

    evaluate = eval_image_transform(image_processor)
    torch.testing.assert_close(evaluate(deep), evaluate(grey), rtol=0, atol=0)
    assert np.array_equal(np.asarray(open_image(deep)), np.asarray(grey.convert("RGB")))


def test_16_bit_png_gives_the_same_pixels_in_training_and_prediction(tmp_path, image_processor):
    """A real 16-bit greyscale PNG, read from its file as training (encoded rows, decoded by the transforms; decoded
    rows) and prediction (`open_image`) read it: the pixels of the same picture saved with 8 bits, not white."""
    grey = full_range_grey()
    deep_grey(grey, "I;16", "16-bit").save(tmp_path / "deep.png")
    grey.save(tmp_path / "grey.png")
    assert PILImage.open(tmp_path / "deep.png").mode == "I;16"
    rows = Dataset.from_dict({"image": [str(tmp_path / "deep.png"), str(tmp_path / "grey.png")]})
    deep_row, grey_row = rows.cast_column("image", Image())
    deep_encoded, grey_encoded = rows.cast_column("image", Image(decode=False))

    assert np.array_equal(np.asarray(open_image(tmp_path / "deep.png")), np.asarray(open_image(tmp_path / "grey.png")))
    evaluate, train = eval_image_transform(image_processor), train_image_transform(image_processor)
    torch.testing.assert_close(evaluate(deep_row["image"]), evaluate(grey_row["image"]), rtol=0, atol=0)
    torch.testing.assert_close(evaluate(deep_encoded["image"]), evaluate(grey_encoded["image"]), rtol=0, atol=0)
    torch.manual_seed(0)
    deep_crop = train(deep_encoded["image"])
    torch.manual_seed(0)
    torch.testing.assert_close(deep_crop, train(grey_encoded["image"]), rtol=0, atol=0)


def red_left_blue_right(height: int, width: int) -> PILImage.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2 :, 2] = 255
    return PILImage.fromarray(array)


def test_training_transform_decodes_large_jpegs_at_reduced_size(image_processor):
    """A 400x300 JPEG for a 30 px model is decoded at 1/4 scale (100x75, the smallest DCT scale still at least twice
    the output), and the crop from it still keeps left and right and the colours."""
    photo = {"bytes": encoded(red_left_blue_right(300, 400), "JPEG"), "path": "photo.jpg"}
    transform = train_image_transform(image_processor)
    [decode] = [step for step in transform.transforms if isinstance(step, DecodeImage)]
    assert decode.draft_size == (60, 60)
    assert decode(photo).size == (100, 75)
    assert DecodeImage()(photo).size == (400, 300), "the evaluation transform decodes at full size"
    assert eval_image_transform(image_processor).transforms[0](photo).size == (400, 300)
    png = {"bytes": encoded(red_left_blue_right(300, 400), "PNG"), "path": "photo.png"}
    assert decode(png).size == (400, 300), "only JPEGs have reduced-size decoding"

    torch.manual_seed(0)
    for pixels in [transform(photo) for _ in range(10)]:
        assert pixels.shape == (3, 30, 30)
        red, blue = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
        torch.testing.assert_close(pixels[:, :, :4], red.expand(3, 30, 4), atol=0.05, rtol=0)  # JPEG's own error
        torch.testing.assert_close(pixels[:, :, -4:], blue.expand(3, 30, 4), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned_images() -> Dataset:
    features = Features(
        {
            "image": Image(),
            "captions": List(Value("string")),
            "image_id": Value("int64"),
            "label": ClassLabel(num_classes=2),
        }
    )
    table = {"image": [picture(n) for n in range(8)], "captions": [captions_of(n) for n in range(8)],
             "image_id": list(range(8)), "label": [n % 2 for n in range(8)]}
    return Dataset.from_dict(table, features=features)


def decoded_captions(tokenizer, batch) -> list[str]:
    return tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)


def round_trip(tokenizer, captions: list[str]) -> list[str]:
    """The captions as `decoded_captions` gives them back (lower case, the tokenizer's spacing)."""
    return tokenizer.batch_decode(tokenizer(captions)["input_ids"], skip_special_tokens=True)


def test_with_image_transform_gives_pixel_values_captions_ids_and_label(captioned_images, image_processor):
    row = with_image_transform(captioned_images, eval_image_transform(image_processor))[3]
    assert set(row) == {"pixel_values", "captions", "image_id", "label"}
    assert row["pixel_values"].shape == (3, 30, 30)
    assert (row["captions"], row["image_id"], row["label"]) == (captions_of(3), 3, 1)


def test_training_caption_depends_only_on_seed_epoch_and_image(captioned_images, image_processor, tokenizer):
    examples = list(with_image_transform(captioned_images, eval_image_transform(image_processor)))
    collator = CaptionCollator(tokenizer, seed=7)
    collator.set_epoch(3)
    batch = collator(examples)
    resumed = CaptionCollator(tokenizer, seed=7)  # a restarted run, seeing the images in another order
    resumed.set_epoch(3)
    reordered = resumed(examples[::-1])

    chosen = decoded_captions(tokenizer, batch)
    assert chosen == decoded_captions(tokenizer, reordered)[::-1]
    assert batch["image_ids"].tolist() == list(range(8))
    assert all(caption in round_trip(tokenizer, captions_of(n)) for n, caption in enumerate(chosen))
    collator.set_epoch(4)
    assert decoded_captions(tokenizer, collator(examples)) != chosen, "another epoch draws other captions"
    other_seed = CaptionCollator(tokenizer, seed=8)
    other_seed.set_epoch(3)
    assert decoded_captions(tokenizer, other_seed(examples)) != chosen
    choices = set()
    for epoch in range(40):
        collator.set_epoch(epoch)
        choices.add(collator.choose_caption(captions_of(0), image_id=0))
    assert choices == set(captions_of(0)), "over epochs every caption of an image is used"


def test_training_crop_depends_only_on_seed_epoch_and_image(captioned_images, image_processor, tokenizer):
    """The collator applies the random crop per sample from (seed, epoch, image_id), so a resumed run crops the same
    way, and it leaves torch's global random stream (which dropout uses) exactly where it was."""
    examples = [captioned_images[n] for n in range(6)]
    collator = CaptionCollator(tokenizer, seed=7, image_transform=train_image_transform(image_processor))
    collator.set_epoch(2)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    pixels = collator(examples)["pixel_values"]
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(123)  # another global state: same crops
    torch.testing.assert_close(collator(examples[::-1])["pixel_values"], pixels.flip(0), rtol=0, atol=0)
    collator.set_epoch(3)
    assert not torch.allclose(collator(examples)["pixel_values"], pixels), "another epoch crops differently"
    plain = CaptionCollator(tokenizer, train=False, image_transform=eval_image_transform(image_processor))(examples)
    assert plain["pixel_values"].shape == pixels.shape == (6, 3, 30, 30)


def test_evaluation_takes_the_first_caption_and_pads_to_the_longest(captioned_images, image_processor, tokenizer):
    dataset = with_image_transform(captioned_images, eval_image_transform(image_processor))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=CaptionCollator(tokenizer, train=False))
    batch = next(iter(loader))

    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids", "labels"}
    assert batch["labels"].tolist() == captioned_images["label"][:4]
    assert batch["pixel_values"].shape == (4, 3, 30, 30)
    assert decoded_captions(tokenizer, batch) == round_trip(tokenizer, [captions_of(n)[0] for n in range(4)])
    lengths = [len(tokenizer(captions_of(n)[0])["input_ids"]) for n in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and max(lengths) < 64
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths

    truncated = CaptionCollator(tokenizer, max_seq_length=4, train=False)([dataset[0], dataset[1]])
    assert truncated["input_ids"].shape == (2, 4)


def test_flatten_captions_and_text_collator(captioned_images, tokenizer):
    flat = flatten_captions(captioned_images)
    assert len(flat) == 40 and flat.column_names == ["image_id", "caption"]
    assert flat["image_id"][:] == [n for n in range(8) for _ in range(5)]
    assert flat["caption"][5:10] == captions_of(1)

    batch = TextCollator(tokenizer, max_seq_length=64)([flat[5], flat[9]])
    assert batch["image_ids"].tolist() == [1, 1]
    assert decoded_captions(tokenizer, batch) == round_trip(tokenizer, [captions_of(1)[0], captions_of(1)[4]])
    assert batch["input_ids"].shape[1] == len(tokenizer(captions_of(1)[0])["input_ids"])
