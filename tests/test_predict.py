"""predict.py: zero-shot labels (equal to the pipeline's), caption matching, the table, predictions.json, the contact
sheet, and a clear error for each bad input."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import CAPTIONS, REPO_ROOT, random_images
from PIL import Image
from transformers import BertConfig, BertModel, pipeline

from ndclip_inference import LINE_HEIGHT, PAD, BadInputError, load_ndclip, run_cli
from predict import main, parse_labels, predict

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
    results = predict(model, processor, images, LABELS, template=template, top_k=len(LABELS), batch_size=2)
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


def test_bad_model_folders_and_image_folders(saved_model_dir, tmp_path, image_folder):
    def run(model=saved_model_dir, images=image_folder):
        main(
            ["--model", str(model), "--images", str(images), "--labels", "dog,cat", "--output_dir", str(tmp_path / "o")]
        )

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(bert)
    with pytest.raises(BadInputError, match="holds a 'bert' model, not an NdCLIP"):
        run(model=bert)
    (tmp_path / "no_config").mkdir()
    with pytest.raises(BadInputError, match="has no config.json"):
        run(model=tmp_path / "no_config")
    with pytest.raises(BadInputError, match="model folder .* does not exist"):
        run(model=tmp_path / "missing_model")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match=r"holds no images \(0 other file"):
        run(images=empty)
    (empty / "readme.md").write_text("# not a picture")
    with pytest.raises(BadInputError, match=r"holds no images \(1 other file"):
        run(images=empty)
    with pytest.raises(BadInputError, match="does not exist"):
        run(images=tmp_path / "missing")
    assert not (tmp_path / "o").exists()


def test_command_line(saved_model_dir, image_folder, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("dog\ncat\ncar\n")
    command = [
        sys.executable,
        str(REPO_ROOT / "predict.py"),
        "--model",
        str(saved_model_dir),
        "--images",
        str(image_folder),
        "--labels_file",
        str(labels_file),
        "--template",
        "{}",
        "--output_dir",
        "out",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rgb_2.png" in done.stdout and "custom code" not in done.stdout + done.stderr  # no trust_remote_code prompt
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(report["predictions"]) == 5 and report["labels"] == ["dog", "cat", "car"]


def test_command_line_reports_bad_input_in_one_line(saved_model_dir, image_folder, tmp_path, capsys):
    argv = [
        "--model",
        str(saved_model_dir),
        "--images",
        str(image_folder),
        "--labels",
        "dog,cat,dog",
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, "predict.py", argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "predict.py: error: the label list has duplicates: 'dog'\n"
