"""The model card written before upload (by run_clip.py, or by `ndclip card`): metadata and results parse back with
huggingface_hub, the body describes the heads, and the folder still loads through the zero-shot pipeline. The upload
itself is the only untested step."""

import json
import re
import shutil
from importlib.metadata import requires

import pytest
from conftest import random_images
from huggingface_hub import ModelCard
from packaging.requirements import Requirement
from transformers import pipeline

from modeling_ndclip import NdClipModel
from ndclip.cli import main
from ndclip.hub import write_card, write_model_card
from ndclip.inference import BadInputError
from run_clip import parse_args

EVAL_RESULTS = {
    "image_to_text_recall@1": 0.125,
    "image_to_text_recall@5": 0.4375,
    "image_to_text_recall@10": 0.625,
    "text_to_image_recall@1": 0.1,
    "text_to_image_recall@5": 0.35,
    "text_to_image_recall@10": 0.55,
    "image_to_text_median_rank": 7.0,
    "text_to_image_median_rank": 9.5,
    "eval_loss": 2.0794,
    "zero_shot_accuracy": 0.3125,
    "zero_shot_dataset": "cifar10",
    "split": "test",
    "step": 120,
    "epoch": 3.0,
}
TOWERS = ["google/vit-base-patch16-224", "distilbert-base-uncased"]


@pytest.fixture
def model_folder(saved_model_dir, tmp_path):
    """A copy of the saved tiny NdCLIP with run_clip's eval_results.json beside it."""
    folder = tmp_path / "ndclip-flickr8k"
    shutil.copytree(saved_model_dir, folder)
    (folder / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    return folder


def metrics_by_type(card: ModelCard) -> dict:
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


def test_card_metadata_and_results_parse_back(model_folder):
    model = NdClipModel.from_pretrained(model_folder)
    training_args = {"learning_rate": 5e-4, "per_device_train_batch_size": 64, "num_train_epochs": 3}
    written = write_model_card(
        model_folder,
        model,
        training_args=training_args,
        dataset_name="jxie/flickr8k",
        base_models=TOWERS,
        repo_id="someone/ndclip-flickr8k",
    )
    card = ModelCard.load(model_folder / "README.md")
    assert card.content == written.content

    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "zero-shot-image-classification"
    assert {"ndlinear", "clip", "custom_code"} <= set(data.tags)
    assert data.datasets == ["jxie/flickr8k"] and data.base_model == TOWERS
    assert data.model_name == "ndclip-flickr8k"
    assert data.widget and all(example["candidate_labels"] for example in data.widget)

    # Every metric comes from eval_results.json, unchanged; eval_loss and the bookkeeping keys are not metrics.
    expected = {key: value for key, value in EVAL_RESULTS.items() if "recall" in key or "median_rank" in key}
    expected["accuracy"] = EVAL_RESULTS["zero_shot_accuracy"]
    assert metrics_by_type(card) == expected
    by_task = {result.task_type: result for result in data.eval_results}
    assert by_task["zero-shot-image-classification"].dataset_name == "cifar10"
    retrieval = by_task["image-text-retrieval"]
    assert (retrieval.dataset_type, retrieval.dataset_split) == ("jxie/flickr8k", "test")

    body = card.text
    counts = model.head_parameter_counts()
    for count in (counts["visual_projection"], counts["text_projection"], counts["linear_equivalent"]):
        assert f"| {count:,} |" in body
    assert "| `learning_rate` | 0.0005 |" in body and "| `per_device_train_batch_size` | 64 |" in body
    assert "| Text-to-image median rank | 9.5 |" in body and "| Zero-shot accuracy (cifar10) | 0.3125 |" in body
    assert 'AutoModel.from_pretrained("someone/ndclip-flickr8k", trust_remote_code=True)' in body
    assert 'pipeline("zero-shot-image-classification", model="someone/ndclip-flickr8k"' in body
    for section in ("## Projection heads", "## Training", "## Evaluation", "## Usage", "## Limitations"):
        assert section in body


def test_card_without_zero_shot_or_without_results(saved_model_dir, tmp_path, make_model):
    model = make_model()
    retrieval_only = {k: v for k, v in EVAL_RESULTS.items() if not k.startswith("zero_shot")}
    card = write_model_card(tmp_path / "a", model, eval_results=retrieval_only, dataset_name="jxie/flickr8k")
    parsed = ModelCard.load(tmp_path / "a" / "README.md")
    assert "accuracy" not in metrics_by_type(parsed) and len(parsed.data.eval_results) == 8
    assert "Zero-shot accuracy" not in card.text

    card = write_model_card(tmp_path / "b", model)  # no eval_results.json there: no model-index, no results table
    parsed = ModelCard.load(tmp_path / "b" / "README.md")
    assert parsed.data.eval_results is None and "model-index" not in card.content and "## Evaluation" not in card.text


def test_base_models_default_to_the_towers_the_config_remembers(make_model, tmp_path):
    model = make_model()
    model.config.vision_config._name_or_path, model.config.text_config._name_or_path = TOWERS
    write_model_card(tmp_path, model)
    assert ModelCard.load(tmp_path / "README.md").data.base_model == TOWERS


def test_folder_with_card_loads_through_the_pipeline(model_folder):
    main(["card", str(model_folder), "--dataset_name", "jxie/flickr8k", "--repo_id", "someone/ndclip-flickr8k"])
    assert metrics_by_type(ModelCard.load(model_folder / "README.md"))["text_to_image_recall@5"] == 0.35

    classify = pipeline("zero-shot-image-classification", model=str(model_folder), trust_remote_code=True)
    labels = ModelCard.load(model_folder / "README.md").data.widget[0]["candidate_labels"].split(", ")
    result = classify(random_images(1)[0], candidate_labels=labels)
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


def test_card_command_reports_bad_input_in_one_line(model_folder, tmp_path, ndclip_error):
    missing = tmp_path / "missing"
    assert ndclip_error("card", missing) == f"ndclip card: error: model folder {missing} does not exist"
    error = ndclip_error("card", model_folder, "--dataset_name", "my photos")
    assert error.startswith("ndclip card: error: dataset_name 'my photos' is not a Hub dataset id")
    assert not (model_folder / "README.md").exists()


@pytest.mark.parametrize(
    "data_argv, datasets, described",
    [
        (["--preset", "demo"], None, "Trained on the offline demo's generated data"),
        (["--data_dir", "{tmp}/my_flickr8k"], None, "Trained on local data: my_flickr8k"),
        (["--train_file", "{tmp}/pairs.csv"], None, "Trained on local data: pairs.csv"),
        (["--dataset_name", "{tmp}/saved_dataset"], None, "Trained on local data: saved_dataset"),
        ([], ["jxie/flickr8k"], "Trained on [jxie/flickr8k](https://huggingface.co/datasets/jxie/flickr8k)"),
    ],
)
def test_training_card_lists_only_hub_datasets(make_model, tmp_path, data_argv, datasets, described):
    (tmp_path / "saved_dataset").mkdir()  # a dataset saved locally, loaded by path
    output_dir = tmp_path / "out"
    args = parse_args([*(arg.format(tmp=tmp_path) for arg in data_argv), "--output_dir", str(output_dir)])
    write_card(args, make_model(), {**EVAL_RESULTS, "zero_shot_dataset": None, "zero_shot_accuracy": None})
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.datasets == datasets and described in card.text
    claimed = {result.dataset_type for result in card.data.eval_results or []}
    assert claimed == set(datasets or [])  # the model-index names no dataset that is not on the Hub
    assert "| Text-to-image R@5 | 0.35 |" in card.text  # the numbers are in the body either way


def test_model_index_names_only_hub_datasets(make_model, tmp_path):
    zero_shot_folder = tmp_path / "my_classes"
    zero_shot_folder.mkdir()
    results = {**EVAL_RESULTS, "zero_shot_dataset": str(zero_shot_folder)}
    card = write_model_card(tmp_path / "local", make_model(), eval_results=results, training_data="local data: x")
    assert card.data.eval_results is None and "model-index" not in card.content and "datasets:" not in card.content
    assert f"| Zero-shot accuracy ({zero_shot_folder.name}) | 0.3125 |" in card.text

    card = write_model_card(tmp_path / "hub_zero_shot", make_model(), eval_results=EVAL_RESULTS)
    assert {(r.task_type, r.dataset_type) for r in card.data.eval_results} == {
        ("zero-shot-image-classification", "cifar10")
    }
    with pytest.raises(BadInputError, match=r"dataset_name 'demo \(generated\)' is not a Hub dataset id"):
        write_model_card(tmp_path / "bad", make_model(), dataset_name="demo (generated)")


def test_card_states_the_versions_the_remote_code_needs(make_model, tmp_path):
    card = write_model_card(tmp_path, make_model(), dataset_name="jxie/flickr8k")
    usage = card.text.split("## Usage")[1].split("##")[0]
    stated = {Requirement(spec).name: Requirement(spec) for spec in re.findall(r'"([a-z]+[<>=][^"]*)"', usage)}
    installed = {Requirement(spec).name: Requirement(spec) for spec in requires("ndclip")}  # from setup.cfg
    assert {"transformers", "torch", "ndlinear"} <= set(stated)
    for name, requirement in stated.items():
        assert requirement.specifier == installed[name].specifier, name
