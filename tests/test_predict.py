"""`ndclip predict`: zero-shot labels (equal to the pipeline's), caption matching, the table, predictions.json, the
contact sheet, and a clear error for each bad input. In-process through `ndclip.cli.main`."""

import json
import logging
import math
import os
import random

import pytest
import torch
from conftest import CAPTIONS, random_images, write_unreadable_images
from PIL import Image, ImageDraw, ImageFont
from transformers import BertConfig, BertModel, pipeline

from ndclip.cli import main
from ndclip.inference import LINE_HEIGHT, PAD, BadInputError, fit_text, load_ndclip
from ndclip.predict import parse_labels, predict

LABELS = ["dog", "cat", "red square", "bicycle"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Five images of several sizes and modes (one in a subfolder, one CMYK JPEG), plus two files that are not."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    for i, image in enumerate(random_images(3, size=(40, 64), seed=1)):
        image.save(folder / f"rgb_{i}.png")
    random_images(1, size=(50, 30), mode="L", seed=2)[0].save(folder / "gray.png")
    random_images(1, size=(33, 33), mode="CMYK", seed=3)[0].save(folder / "more" / "cmyk.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.jpg").write_text("not an image either, whatever its name says")
    return folder


def test_parse_labels_from_a_list_and_a_file(tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("bicycle\n\n  a red car \n")
    assert parse_labels(" dog, cat ,") == ["dog", "cat"]
    assert parse_labels(None, labels_file) == ["bicycle", "a red car"]
    assert parse_labels("dog", labels_file) == ["dog", "bicycle", "a red car"]


@pytest.mark.parametrize(
    "labels, file_text, message",
    [
        (" , ,", None, "label list is empty"),
        (None, "\n  \n", "label list is empty"),
        ("dog,cat,dog", None, "duplicates: 'dog'"),
        ("bicycle,cat", "dog\nbicycle\n", "duplicates: 'bicycle'"),
    ],
)
def test_bad_label_lists(tmp_path, labels, file_text, message):
    labels_file = None
    if file_text is not None:
        labels_file = tmp_path / "labels.txt"
        labels_file.write_text(file_text)
    with pytest.raises(BadInputError, match=message):
        parse_labels(labels, labels_file)


def test_probabilities_equal_the_zero_shot_pipeline(saved_model_dir, image_folder):
    model, processor = load_ndclip(str(saved_model_dir), "cpu")
    images = sorted(image_folder.glob("*.png"))
    template = "a photo of a {}."
    results, skipped = predict(model, processor, images, LABELS, template, top_k=len(LABELS), batch_size=2)
    assert skipped == []
    classify = pipeline("zero-shot-image-classification", model=str(saved_model_dir), trust_remote_code=True)
    for image, result in zip(images, results):
        expected = classify(str(image), candidate_labels=LABELS, hypothesis_template=template)
        assert [m["label"] for m in result["labels"]] == [e["label"] for e in expected]
        torch.testing.assert_close(
            torch.tensor([m["score"] for m in result["labels"]]),
            torch.tensor([e["score"] for e in expected]),
            atol=1e-5,
            rtol=0,
        )


def test_main_prints_a_table_and_writes_json_and_contact_sheet(saved_model_dir, image_folder, tmp_path, capsys, caplog):
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--model",
        str(saved_model_dir),
        "--images",
        str(image_folder),
        "--labels",
        ",".join(LABELS),
        "--captions",
        str(captions_file),
        "--top_k",
        "2",
        "--batch_size",
        "2",
        "--output_dir",
        str(out),
    ]
    with caplog.at_level(logging.INFO):
        main(argv)
    assert "skipped 2 file(s)" in caplog.text

    report = json.loads((out / "predictions.json").read_text())
    names = [os.path.relpath(p["image"], image_folder) for p in report["predictions"]]
    assert names == ["gray.png", os.path.join("more", "cmyk.jpg"), "rgb_0.png", "rgb_1.png", "rgb_2.png"]
    assert report["labels"] == LABELS and report["template"] == "a photo of a {}."
    for p in report["predictions"]:
        scores = [m["score"] for m in p["labels"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert {m["label"] for m in p["labels"]} <= set(LABELS)
        assert len(p["captions"]) == 2 and {m["caption"] for m in p["captions"]} <= set(CAPTIONS)
        assert all(-1 <= m["score"] <= 1 for m in p["captions"])

    table = capsys.readouterr().out
    assert "top labels (probability)" in table and "best caption (cosine)" in table
    first = report["predictions"][0]
    assert f"{first['labels'][0]['label']} {first['labels'][0]['score']:.3f}" in table
    assert all(name in table for name in ("gray.png", "cmyk.jpg", "rgb_2.png"))

    # 5 cells in one row; each a 160-pixel thumbnail over 3 lines of text (file name and two labels).
    with Image.open(out / "contact_sheet.png") as sheet:
        sheet.load()
    cell = 160 + 2 * PAD
    assert sheet.format == "PNG" and sheet.size == (5 * cell, cell + 3 * LINE_HEIGHT)
    for i in range(5):  # every thumbnail is drawn (random noise, not the white background)
        assert len(sheet.crop((i * cell + PAD, PAD, i * cell + PAD + 160, PAD + 160)).getcolors(10_000) or []) != 1


def test_bad_model_folders_and_image_folders(saved_model_dir, tmp_path, image_folder, ndclip_error):
    def error(model=saved_model_dir, images=image_folder) -> str:
        return ndclip_error(
            "predict", "--model", model, "--images", images, "--labels", "dog,cat", "--output_dir", tmp_path / "o"
        )

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(bert)
    assert "holds a 'bert' model, not an NdCLIP" in error(model=bert)
    (tmp_path / "no_config").mkdir()
    assert "has no config.json" in error(model=tmp_path / "no_config")
    assert error(model=tmp_path / "missing_model").endswith("missing_model does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images (0 other file" in error(images=empty)
    (empty / "readme.md").write_text("# not a picture")
    assert "holds no images (1 other file" in error(images=empty)
    assert error(images=tmp_path / "missing").endswith("image folder " + str(tmp_path / "missing") + " does not exist")
    assert not (tmp_path / "o").exists()


def test_unreadable_images_are_skipped_and_counted(saved_model_dir, tmp_path, caplog, ndclip_error):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(random_images(2, seed=4)):
        image.save(folder / f"good_{i}.png")
    unreadable = write_unreadable_images(folder)
    out = tmp_path / "out"
    argv = ["predict", "--model", str(saved_model_dir), "--labels", "dog,cat", "--output_dir", str(out)]
    with caplog.at_level(logging.INFO):
        main([*argv, "--images", str(folder)])

    assert "skipped 3 unreadable image(s)" in caplog.text and all(name in caplog.text for name in unreadable)
    report = json.loads((out / "predictions.json").read_text())
    assert [os.path.basename(p["image"]) for p in report["predictions"]] == ["good_0.png", "good_1.png"]
    skipped = {os.path.basename(s["image"]): s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == unreadable
    assert "decompression bomb" in skipped["bomb.png"] and "truncated" in skipped["truncated.jpg"]
    with Image.open(out / "contact_sheet.png") as sheet:  # the two readable images only
        assert sheet.width == 2 * (160 + 2 * PAD)

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    write_unreadable_images(only_bad)
    assert f"none of the 3 images in {only_bad} could be read" in ndclip_error(*argv, "--images", only_bad)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--top_k", "0", "must be a positive integer, got 0"),
        ("--top_k", "-2", "must be a positive integer, got -2"),
        ("--batch_size", "0", "must be a positive integer, got 0"),
        ("--template", "a photo", "needs exactly one '{}' where the label goes, found none"),
        ("--template", "{} or {}", "needs exactly one '{}' where the label goes, found 2 fields"),
        ("--template", "a photo of {label}", "found the field '{label}'"),
        ("--template", "a {0} photo", "found the field '{0}'"),
        ("--template", "a { photo", "is not a valid format string"),
    ],
)
def test_bad_flags_are_errors_naming_the_flag(
    saved_model_dir, image_folder, tmp_path, ndclip_error, flag, value, message
):
    argv = ["predict", "--model", saved_model_dir, "--images", image_folder, "--labels", "dog,cat"]
    error = ndclip_error(*argv, "--output_dir", tmp_path / "out", flag, value)
    assert error.startswith(f"ndclip predict: error: argument {flag}: ") and message in error
    assert not (tmp_path / "out").exists()


def test_templates_with_escaped_braces_are_fine(make_model, processor):
    model = make_model()
    results, _ = predict(model, processor, random_images(1), ["dog", "cat"], template="{{{}}}", top_k=1)
    assert results[0]["labels"][0]["label"] in ("dog", "cat")
    for template in ("no placeholder", "{} and {}", "{name}"):
        with pytest.raises(BadInputError, match="exactly one"):
            predict(model, processor, random_images(1), ["dog"], template=template)
    with pytest.raises(BadInputError, match="top_k must be at least 1, got 0"):
        predict(model, processor, random_images(1), ["dog"], top_k=0)


class CountingDraw:
    """A real `ImageDraw` whose text measurements are counted; more than `budget` of them fail the test at once
    (the quadratic version would otherwise run for many minutes)."""

    def __init__(self, budget: int):
        self.draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
        self.budget, self.calls = budget, 0

    def textlength(self, text, font=None):
        self.calls += 1
        assert self.calls <= self.budget, f"more than {self.budget} text measurements"
        return self.draw.textlength(text, font=font)


def longest_fitting_prefix(draw, text: str, font, width: int) -> str:
    """The reference: the whole text if it fits, else the longest prefix that fits with "..." after it."""
    if draw.textlength(text, font=font) <= width:
        return text
    fitting = [n for n in range(len(text) + 1) if draw.textlength(text[:n] + "...", font=font) <= width]
    return text[: max(fitting)] + "..." if fitting else "..."


def test_fit_text_measures_a_long_caption_a_logarithmic_number_of_times():
    font = ImageFont.load_default()
    caption = ("a dog runs on the grass near a river, " * 2700)[:100_000]
    budget = 2 * math.ceil(math.log2(len(caption) + 1)) + 4
    draw = CountingDraw(budget)
    fitted = fit_text(draw, caption, font, 160)
    assert draw.calls <= budget
    assert fitted.endswith("...") and caption.startswith(fitted[:-3])
    assert draw.draw.textlength(fitted, font=font) <= 160
    assert draw.draw.textlength(caption[: len(fitted) - 2] + "...", font=font) > 160  # one more character: too wide


def test_fit_text_is_the_longest_prefix_that_fits():
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    rng = random.Random(0)
    alphabet = "iIl.WMmw  a0-é漢"
    texts = ["", "...", "W" * 40, "i" * 90] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50))) for _ in range(60)
    ]
    for width in (0, 12, 40, 160):
        for text in texts:
            assert fit_text(draw, text, font, width) == longest_fitting_prefix(draw, text, font, width), (text, width)
