"""Hub-ready folders: save_pretrained / from_pretrained round trips, and loading with trust_remote_code in a fresh
process started in another directory (as a user of the Hub would), including the zero-shot pipeline."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CAPTIONS, random_images
from PIL import Image
from safetensors.torch import load_file, save_file
from test_modeling_ndclip import assert_heads_follow_documented_init
from transformers import PreTrainedModel

from configuration_ndclip import NdClipConfig
from modeling_ndclip import NdClipModel
from processing_ndclip import NdClipProcessor


def test_saved_folder_is_hub_ready(saved_model_dir):
    files = set(os.listdir(saved_model_dir))
    assert {"config.json", "model.safetensors", "configuration_ndclip.py", "modeling_ndclip.py"} <= files
    assert {"processing_ndclip.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only
    config = json.loads((saved_model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ndclip.NdClipConfig",
        "AutoModel": "modeling_ndclip.NdClipModel",
        "AutoModelForZeroShotImageClassification": "modeling_ndclip.NdClipModel",
    }
    assert config["vision_config"]["model_type"] == "vit" and config["text_config"]["model_type"] == "distilbert"
    processor_config = json.loads((saved_model_dir / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_ndclip.NdClipProcessor"
    weights = load_file(saved_model_dir / "model.safetensors")
    assert "visual_projection.ndlinear.align_layers.0.weight" in weights and "logit_scale" in weights


def test_save_load_round_trip_gives_identical_outputs(saved_model_dir, make_model, batch):
    original = make_model()
    reloaded, info = NdClipModel.from_pretrained(saved_model_dir, output_loading_info=True)
    reloaded.eval()
    assert isinstance(reloaded.config, NdClipConfig)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert original.state_dict().keys() == reloaded.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    with torch.no_grad():
        a, b = original(**batch, return_loss=True), reloaded(**batch, return_loss=True)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


HEAD_KEYS = ("visual_projection.", "text_projection.", "logit_scale")


@pytest.fixture
def seeded_weight_init(monkeypatch):
    """Reseed before each module's initialisation (the trick of transformers' own `test_can_init_all_missing_weights`),
    so that a module gets the same random weights whether `__init__` initialises it or `from_pretrained` does
    because the checkpoint lacks it: the two paths can then be compared value for value."""
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        torch.manual_seed(0)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)


def drop_from_checkpoint(folder, prefixes: tuple[str, ...]) -> set[str]:
    """Rewrite `folder/model.safetensors` without the keys starting with `prefixes`; returns the dropped keys."""
    path = folder / "model.safetensors"
    weights = load_file(path)
    kept = {key: tensor for key, tensor in weights.items() if not key.startswith(prefixes)}
    save_file(kept, path, metadata={"format": "pt"})
    return set(weights) - set(kept)


def assert_heads_equal(a: NdClipModel, b: NdClipModel) -> None:
    heads = {k: v for k, v in a.state_dict().items() if k.startswith(HEAD_KEYS)}
    assert heads and heads.keys() == {k for k in b.state_dict() if k.startswith(HEAD_KEYS)}
    for name, tensor in heads.items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_heads_missing_from_a_checkpoint_are_initialised_as_fresh_ones(
    saved_model_dir, tmp_path, make_model, batch, seeded_weight_init
):
    folder = shutil.copytree(saved_model_dir, tmp_path / "model")
    dropped = drop_from_checkpoint(folder, HEAD_KEYS)
    loaded, info = NdClipModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == dropped and len(dropped) == 9  # 2 heads x 2 layers x (weight, bias), logit_scale
    assert_heads_equal(loaded, make_model())
    complete = NdClipModel.from_pretrained(saved_model_dir)
    for name, tensor in complete.state_dict().items():
        if not name.startswith(HEAD_KEYS):
            assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**batch, return_loss=True).loss)


def test_heads_of_another_projection_type_are_initialised_as_documented(saved_model_dir, batch):
    """An ndlinear checkpoint loaded as `projection_type="linear"`: the linear heads are missing, the ndlinear ones
    unexpected; the new heads get the documented init (not uninitialised memory)."""
    loaded, info = NdClipModel.from_pretrained(
        saved_model_dir, projection_type="linear", initializer_factor=3.0, output_loading_info=True
    )
    heads = ("visual_projection", "text_projection")
    assert info["missing_keys"] == {f"{h}.linear.{p}" for h in heads for p in ("weight", "bias")}
    assert {k.split(".")[1] for k in info["unexpected_keys"]} == {"ndlinear"} and len(info["unexpected_keys"]) == 8
    assert_heads_follow_documented_init(loaded, tolerance=0.2)
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**batch).logits_per_image).all()


def test_heads_resized_with_ignore_mismatched_sizes_are_initialised_as_fresh_ones(
    saved_model_dir, make_model, batch, seeded_weight_init
):
    loaded, info = NdClipModel.from_pretrained(
        saved_model_dir, projection_dim=36, projection_grid=None, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert loaded.config.projection_grid == [6, 6]
    assert len(info["mismatched_keys"]) == 8 and not info["missing_keys"]  # 16 = 4 x 4 -> 36 = 6 x 6: every layer
    assert_heads_equal(loaded, make_model(projection_dim=36))
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**batch).logits_per_image).all()


def test_new_projection_dim_with_the_stored_grid_is_an_error(saved_model_dir):
    """config.json stores the resolved grid (4 x 4 for 16): a new `projection_dim` alone must not build the old head
    under a config that claims the new size."""
    with pytest.raises(ValueError, match=r"projection_grid` \[4, 4\] has 16 cells.*must have 36"):
        NdClipModel.from_pretrained(saved_model_dir, projection_dim=36, ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match=r"unknown `projection_type` 'mlp'"):
        NdClipModel.from_pretrained(saved_model_dir, projection_type="mlp")


def test_a_model_loaded_without_any_weights_equals_a_fresh_one(make_model, seeded_weight_init):
    """transformers' `test_can_init_all_missing_weights`: with nothing loaded, `from_pretrained` must initialise every
    parameter exactly as `__init__` does (towers, heads and logit_scale)."""
    fresh = make_model()
    empty = NdClipModel.from_pretrained(None, config=fresh.config, state_dict={})
    assert fresh.state_dict().keys() == empty.state_dict().keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, empty.state_dict()[name]), name


def test_processor_round_trip(saved_model_dir, processor):
    reloaded = NdClipProcessor.from_pretrained(saved_model_dir)
    images = random_images(2)
    a = processor(text=CAPTIONS[:2], images=images, return_tensors="pt")
    b = reloaded(text=CAPTIONS[:2], images=images, return_tensors="pt")
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "pixel_values"}
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert reloaded.batch_decode(b["input_ids"], skip_special_tokens=True) == [c.lower() for c in CAPTIONS[:2]]


def test_processor_pads_per_batch_not_to_a_fixed_length(processor):
    short = processor(text=["a dog"], return_tensors="pt")["input_ids"]
    longer = processor(text=["a dog", CAPTIONS[4]], return_tensors="pt")["input_ids"]
    assert short.shape[1] < longer.shape[1] < 64


def run_fresh_python(code: str, cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # nothing of this repository on the path
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def sigmoid_model_dir(tmp_path_factory, make_model, processor):
    """A tiny NdCLIP trained (as it were) with the sigmoid loss, its bias moved from its initial -10 to 0, so that
    each label's probability is far from both 0 and 1 and a softmax (they would sum to one) is told apart."""
    folder = tmp_path_factory.mktemp("ndclip_sigmoid")
    model = make_model(contrastive_loss="sigmoid")
    with torch.no_grad():
        model.logit_bias.fill_(0.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def expected_pipeline_scores(folder, image, labels: list[str], template: str = "This is a photo of {}.") -> dict:
    """What the zero-shot pipeline must score: the model's own probabilities of the prompts, computed here with this
    repository's model and processor (the stock pipeline's default template)."""
    model, processor = NdClipModel.from_pretrained(folder).eval(), NdClipProcessor.from_pretrained(folder)
    inputs = processor(text=[template.format(label) for label in labels], images=[image], return_tensors="pt")
    with torch.no_grad():
        probabilities = model.logits_to_probabilities(model(**inputs).logits_per_image)[0]
    return dict(zip(labels, probabilities.tolist()))


def test_a_sigmoid_model_keeps_its_loss_and_bias_through_save_and_load(sigmoid_model_dir, batch):
    reloaded, info = NdClipModel.from_pretrained(sigmoid_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.contrastive_loss == "sigmoid" and reloaded.logit_bias.item() == 0.0  # not re-initialised
    with torch.no_grad():
        out = reloaded.eval()(**batch, return_loss=True)
    cosine = out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, reloaded.clamped_logit_scale() * cosine)  # bias 0
    config = json.loads((sigmoid_model_dir / "config.json").read_text())
    assert config["contrastive_loss"] == "sigmoid" and config["logit_bias_init_value"] == -10.0
    pipeline_class = config["custom_pipelines"]["zero-shot-image-classification"]["impl"]
    assert pipeline_class == "modeling_ndclip.NdClipZeroShotImageClassificationPipeline"


def test_a_checkpoint_saved_before_the_loss_choice_loads_as_a_softmax_model(saved_model_dir, tmp_path, batch):
    """config.json written before `contrastive_loss` existed: the same model, with nothing missing."""
    old = tmp_path / "old"
    shutil.copytree(saved_model_dir, old)
    config = json.loads((old / "config.json").read_text())
    for key in ("contrastive_loss", "logit_bias_init_value"):
        del config[key]
    config["logit_scale_init_value"] = 2.6592600369327779
    (old / "config.json").write_text(json.dumps(config))
    model, info = NdClipModel.from_pretrained(old, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.contrastive_loss == "softmax" and model.logit_bias is None
    assert "custom_pipelines" not in json.loads((saved_model_dir / "config.json").read_text())


def test_trust_remote_code_loading_and_pipeline_in_a_fresh_process(saved_model_dir, sigmoid_model_dir, tmp_path, batch):
    """Both kinds of model through the real pipeline: a softmax model's label scores sum to one, a sigmoid model's
    are a sigmoid per label (its config.json names the package's pipeline in `custom_pipelines`)."""
    expected = NdClipModel.from_pretrained(saved_model_dir).eval()(**batch).logits_per_image
    torch.save(dict(batch), tmp_path / "batch.pt")
    out = run_fresh_python(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, pipeline
        folder = {str(saved_model_dir)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        batch = torch.load("batch.pt")
        with torch.no_grad():
            logits = model(**batch).logits_per_image
        torch.save(logits, "logits.pt")
        classify = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        image = Image.new("L", (37, 41), color=90)  # grayscale: the image processor converts it to RGB
        result = classify(image, candidate_labels=["dog", "cat", "red square"])
        sigmoid = pipeline("zero-shot-image-classification", model={str(sigmoid_model_dir)!r}, trust_remote_code=True)
        sigmoid_result = sigmoid(image, candidate_labels=["dog", "cat", "red square"])
        print(json.dumps({{
            "config": type(config).__name__, "model": type(model).__name__,
            "zero_shot": type(zero_shot).__name__, "processor": type(processor).__name__,
            "module": type(model).__module__, "result": result, "sigmoid_result": sigmoid_result,
            "sigmoid_pipeline": type(sigmoid).__name__,
        }}))
        """,
        cwd=tmp_path,
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["config"] == "NdClipConfig" and report["model"] == report["zero_shot"] == "NdClipModel"
    assert report["processor"] == "NdClipProcessor"
    assert report["module"].startswith("transformers_modules.")  # the folder's copy of the code, not this repo's
    assert sorted(r["label"] for r in report["result"]) == ["cat", "dog", "red square"]
    assert abs(sum(r["score"] for r in report["result"]) - 1.0) < 1e-5
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)
    image, labels = Image.new("L", (37, 41), color=90), ["dog", "cat", "red square"]
    assert report["sigmoid_pipeline"] == "NdClipZeroShotImageClassificationPipeline"
    scores = {r["label"]: r["score"] for r in report["sigmoid_result"]}
    assert scores == pytest.approx(expected_pipeline_scores(sigmoid_model_dir, image, labels), abs=1e-5)
    assert [r["score"] for r in report["sigmoid_result"]] == sorted(scores.values(), reverse=True)
    assert abs(sum(scores.values()) - 1.0) > 0.1, "independent sigmoids, not a softmax"
