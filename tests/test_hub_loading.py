"""Hub-ready folders: save_pretrained / from_pretrained round trips, and loading with trust_remote_code in a fresh
process started in another directory (as a user of the Hub would), including the zero-shot pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import CAPTIONS, random_images
from safetensors.torch import load_file

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
    reloaded = NdClipModel.from_pretrained(saved_model_dir).eval()
    assert isinstance(reloaded.config, NdClipConfig)
    with torch.no_grad():
        a, b = original(**batch, return_loss=True), reloaded(**batch, return_loss=True)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


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


def test_trust_remote_code_loading_and_pipeline_in_a_fresh_process(saved_model_dir, tmp_path, batch):
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
        print(json.dumps({{
            "config": type(config).__name__, "model": type(model).__name__,
            "zero_shot": type(zero_shot).__name__, "processor": type(processor).__name__,
            "module": type(model).__module__, "result": result,
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
