"""Zero-shot prompt ensembles (ndclip.prompts): the built-in set, template files and their errors, the class
embedding of an ensemble (against an independent computation), and the ensemble in `ndclip predict` and in
run_clip.py's zero-shot evaluation, in-process on tiny models."""

import json
import logging
import math

import pytest
import torch
from conftest import random_images

import run_clip
from ndclip.evaluation import embed_class_prompts, zero_shot_templates_of
from ndclip.inference import BadInputError, embed_texts
from ndclip.layouts import write_hub_parquet
from ndclip.predict import predict
from ndclip.prompts import (
    BUILTIN_TEMPLATES,
    DEFAULT_TEMPLATE,
    check_template,
    class_embeddings,
    ensemble_embeddings,
    load_templates,
    read_templates,
)

LABELS = ["dog", "cat", "red square"]
TEMPLATES = ["a photo of a {}.", "a blue {} in the sky", "{} on a sofa"]


def model_text_embeds(model, processor, texts: list[str]) -> torch.Tensor:
    """The model's own `text_embeds` of `texts`, one text at a time (no padding, no batching)."""
    with torch.no_grad():
        return torch.cat([model(**processor(text=[text], return_tensors="pt")).text_embeds for text in texts])


def by_hand_ensemble(model, processor, labels: list[str], templates: list[str]) -> torch.Tensor:
    """CLIP's recipe written out: per label, the sum of the unit-length embeddings of its prompts, divided by its
    norm (the norm of the mean and of the sum point the same way), in float64."""
    rows = []
    for label in labels:
        total = torch.zeros(model.config.projection_dim, dtype=torch.float64)
        for template in templates:
            vector = model_text_embeds(model, processor, [template.format(label)])[0].double()
            total += vector / math.sqrt(float((vector * vector).sum()))
        rows.append(total / math.sqrt(float((total * total).sum())))
    return torch.stack(rows).float()


def test_builtin_set_is_checked_distinct_and_starts_with_the_default():
    assert load_templates("builtin") == list(BUILTIN_TEMPLATES)
    assert BUILTIN_TEMPLATES[0] == DEFAULT_TEMPLATE and 8 <= len(BUILTIN_TEMPLATES) <= 16
    assert len(set(BUILTIN_TEMPLATES)) == len(BUILTIN_TEMPLATES)
    assert all(check_template(template) == template for template in BUILTIN_TEMPLATES)


def test_template_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# prompts for shapes\n\n  a photo of a {}.  \n   # indented comment\na {{drawn}} {}\n\n")
    assert read_templates(path) == ["a photo of a {}.", "a {{drawn}} {}"]
    assert load_templates(str(path)) == read_templates(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("a photo of a {}.\n\na photo\n", r"templates.txt, line 3: the template 'a photo' needs exactly one '\{\}'"),
        ("{} and {}\n", r"line 1: .* found 2 fields"),
        ("a {label}\n", r"line 1: .* found the field '\{label\}'"),
        ("a { photo\n", r"line 1: .* is not a valid format string"),
        ("a {}.\n# a comment\na {}.\n", r"templates.txt, line 3: repeats the template 'a \{\}.' of line 1"),
        ("\n# only a comment\n  \n", r"templates.txt holds no template"),
    ],
)
def test_bad_template_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "templates.txt"
    path.write_text(content)
    with pytest.raises(BadInputError, match=message):
        read_templates(path)


def test_missing_and_binary_template_files(tmp_path):
    with pytest.raises(BadInputError, match=r"template file .*nowhere.txt does not exist .*`builtin`"):
        load_templates(tmp_path / "nowhere.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe{}\x00")
    with pytest.raises(BadInputError, match="binary.txt is not UTF-8 text"):
        read_templates(tmp_path / "binary.txt")


def test_ensemble_of_one_template_is_the_single_template_exactly(make_model, processor):
    model = make_model()
    single = embed_texts(model, processor, [DEFAULT_TEMPLATE.format(label) for label in LABELS])
    ensemble = class_embeddings(lambda texts: embed_texts(model, processor, texts), LABELS, [DEFAULT_TEMPLATE])
    assert torch.equal(ensemble, single)


def test_ensemble_is_the_renormalised_mean_of_normalised_embeddings(make_model, processor):
    model = make_model()
    ensemble = class_embeddings(lambda texts: embed_texts(model, processor, texts), LABELS, TEMPLATES)
    torch.testing.assert_close(ensemble, by_hand_ensemble(model, processor, LABELS, TEMPLATES), atol=1e-5, rtol=0)
    assert not torch.allclose(ensemble, embed_texts(model, processor, [TEMPLATES[0].format(x) for x in LABELS]))


def test_ensemble_normalises_each_template_before_averaging():
    """A template whose embeddings happen to be longer does not weigh more: each is normalised first."""
    generator = torch.Generator().manual_seed(0)
    per_template = torch.nn.functional.normalize(torch.randn(3, 4, 8, generator=generator), dim=-1)
    scaled = per_template * torch.tensor([10.0, 1.0, 0.1])[:, None, None]
    expected = ensemble_embeddings(per_template)
    torch.testing.assert_close(ensemble_embeddings(scaled), expected)
    torch.testing.assert_close(expected.norm(dim=-1), torch.ones(4))


def test_predict_with_an_ensemble_scores_the_ensemble_embeddings(make_model, processor):
    model, images = make_model(), random_images(3)
    results, _ = predict(model, processor, images, LABELS, TEMPLATES, top_k=len(LABELS))
    image_embeds = model(**processor(images=images, return_tensors="pt")).image_embeds.detach()
    label_embeds = by_hand_ensemble(model, processor, LABELS, TEMPLATES)
    expected = (model.clamped_logit_scale().detach() * image_embeds @ label_embeds.t()).softmax(dim=-1)
    for result, row in zip(results, expected):
        got = {match["label"]: match["score"] for match in result["labels"]}
        torch.testing.assert_close(torch.tensor([got[label] for label in LABELS]), row, atol=2e-5, rtol=0)
    # A list of one template is the single template.
    assert (
        predict(model, processor, images, LABELS, [TEMPLATES[1]])[0]
        == predict(model, processor, images, LABELS, TEMPLATES[1])[0]
    )


def test_predict_gives_a_sigmoid_models_probabilities(make_model, processor):
    """A model trained with the sigmoid loss scores each label on its own: sigmoid(scale * cosine + bias)."""
    model, images = make_model(contrastive_loss="sigmoid"), random_images(2)
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
    results, _ = predict(model, processor, images, LABELS, TEMPLATES, top_k=len(LABELS))
    image_embeds = model(**processor(images=images, return_tensors="pt")).image_embeds.detach()
    label_embeds = by_hand_ensemble(model, processor, LABELS, TEMPLATES)
    expected = torch.sigmoid(model.clamped_logit_scale().detach() * image_embeds @ label_embeds.t() - 1.5)
    for result, row in zip(results, expected):
        got = {match["label"]: match["score"] for match in result["labels"]}
        torch.testing.assert_close(torch.tensor([got[label] for label in LABELS]), row, atol=2e-5, rtol=0)


def test_predict_command_with_templates(saved_model_dir, tmp_path, ndclip_error):
    from ndclip.cli import main

    for i, image in enumerate(random_images(2, seed=4)):
        image.save(tmp_path / f"{i}.png")
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("# mine\n" + "\n".join(TEMPLATES) + "\n")
    common = ["predict", "--model", saved_model_dir, "--images", tmp_path, "--labels", ",".join(LABELS)]
    main([str(arg) for arg in [*common, "--templates", "builtin", "--output_dir", tmp_path / "builtin"]])
    main([str(arg) for arg in [*common, "--templates", templates_file, "--output_dir", tmp_path / "file"]])
    builtin = json.loads((tmp_path / "builtin" / "predictions.json").read_text())
    from_file = json.loads((tmp_path / "file" / "predictions.json").read_text())
    assert builtin["templates"] == list(BUILTIN_TEMPLATES) and "template" not in builtin
    assert from_file["templates"] == TEMPLATES
    assert builtin["predictions"] != from_file["predictions"]  # other prompts, other scores

    templates_file.write_text("a photo of a {}.\nno placeholder\n")
    error = ndclip_error(*common, "--templates", templates_file, "--output_dir", tmp_path / "bad")
    assert "argument --templates" in error and "templates.txt, line 2: the template 'no placeholder'" in error
    error = ndclip_error(*common, "--template", "a {}", "--templates", "builtin", "--output_dir", tmp_path / "bad")
    assert "argument --templates: not allowed with argument --template" in error


def test_run_clip_zero_shot_with_an_ensemble(tmp_path, saved_model_dir, processor, caplog):
    """`--zero_shot_templates FILE` in run_clip's evaluation (zero-shot on the split's labels): the results list the
    templates, and the accuracy is that of the by-hand ensemble embeddings of the saved (untrained) model."""
    write_hub_parquet(tmp_path / "hub", {"train": 4, "validation": 6})
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("\n".join(TEMPLATES) + "\n")
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    results = run_clip.main(["--dataset_name", str(tmp_path / "hub"), "--model_name_or_path", str(saved_model_dir),
                             "--zero_shot_templates", str(templates_file), "--max_train_steps", "0",
                             "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
                             "--dataloader_num_workers", "0", "--output_dir", str(out)])  # fmt: skip
    assert results["zero_shot_templates"] == TEMPLATES
    assert json.loads((out / "eval_results.json").read_text())["zero_shot_templates"] == TEMPLATES
    assert "prompts: an ensemble of 3 templates" in caplog.text

    from datasets import load_dataset

    from modeling_ndclip import NdClipModel

    model = NdClipModel.from_pretrained(out).eval()
    validation = load_dataset(str(tmp_path / "hub"), split="validation")
    names = validation.features["label"].names
    with torch.no_grad():
        pixels = processor(images=[image.convert("RGB") for image in validation["image"]], return_tensors="pt")
        image_embeds = model(**pixels).image_embeds
    class_embeds = by_hand_ensemble(model, processor, names, TEMPLATES)
    predicted = (image_embeds @ class_embeds.t()).argmax(dim=-1)
    expected = (predicted == torch.tensor(validation["label"])).float().mean().item()
    assert results["zero_shot_accuracy"] == pytest.approx(expected)


def test_evaluation_embeds_the_ensemble_in_batches(make_model, processor):
    """The class embeddings of run_clip's zero-shot evaluation, with prompts split over batches of several lengths."""
    model = make_model()
    embedded = embed_class_prompts(model, processor.tokenizer, LABELS, TEMPLATES, torch.device("cpu"), batch_size=2)
    torch.testing.assert_close(embedded, by_hand_ensemble(model, processor, LABELS, TEMPLATES), atol=1e-5, rtol=0)
    args = type("Args", (), {"zero_shot_template": "a {}", "zero_shot_templates": None})()
    assert zero_shot_templates_of(args) == ["a {}"]
    args.zero_shot_templates = TEMPLATES  # overrides the single template
    assert zero_shot_templates_of(args) == TEMPLATES


def test_run_clip_rejects_bad_template_flags(tmp_path, capsys):
    bad = tmp_path / "templates.txt"
    bad.write_text("a {}\na {}\n")
    for flag, value, message in [
        ("--zero_shot_templates", str(bad), "templates.txt, line 2: repeats the template 'a {}' of line 1"),
        ("--zero_shot_templates", str(tmp_path / "none.txt"), "none.txt does not exist"),
        ("--zero_shot_template", "a photo", "needs exactly one '{}'"),
    ]:
        with pytest.raises(SystemExit):
            run_clip.parse_args(["--preset", "demo", "--output_dir", str(tmp_path / "out"), flag, value])
        error = capsys.readouterr().err
        assert f"argument {flag}: " in error and message in error
