"""The one embedding loop (`ndclip.embedding.embed`) and the evaluation of a training run (`ndclip.evaluation`),
in-process on a tiny model; the evaluation across two processes is tested by a real launch in test_run_clip.py."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import CAPTIONS, random_images
from torch.utils.data import DataLoader

from ndclip.embedding import IMAGE_INPUTS, embed
from ndclip.evaluation import evaluate
from ndclip.metrics import chunked_contrastive_loss, retrieval_metrics, zero_shot_accuracy
from ndclip.transforms import CaptionCollator, TextCollator

NUM_IMAGES = 5
CAPTIONS_PER_IMAGE = 2


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def split(processor):
    """Images with `pixel_values` already made, two captions each, ids 10, 20, ... and labels."""
    pixels = processor(images=random_images(NUM_IMAGES, seed=3), return_tensors="pt")["pixel_values"]
    return [
        {
            "image_id": 10 * (i + 1),
            "pixel_values": pixels[i],
            "captions": [CAPTIONS[i], CAPTIONS[(i + 1) % len(CAPTIONS)] + " again"],
            "label": i % 2,
        }
        for i in range(NUM_IMAGES)
    ]


def eval_loaders(split, tokenizer, accelerator):
    captions = [{"image_id": row["image_id"], "caption": caption} for row in split for caption in row["captions"]]
    loaders = {
        "images": DataLoader(split, batch_size=2, collate_fn=CaptionCollator(tokenizer, train=False)),
        "captions": DataLoader(captions, batch_size=3, collate_fn=TextCollator(tokenizer)),
    }
    return {name: accelerator.prepare(loader) for name, loader in loaders.items()}


def test_embed_concatenates_outputs_and_fields_like_one_forward(make_model, processor, split):
    model = make_model()
    batches = list(DataLoader(split, batch_size=2, collate_fn=CaptionCollator(processor.tokenizer, train=False)))
    embedded = embed(model, batches, ["image_embeds", "vision_model_output.pooler_output"], fields=["image_ids"])
    whole = CaptionCollator(processor.tokenizer, train=False)(split)
    with torch.no_grad():
        output = model(pixel_values=whole["pixel_values"])
    torch.testing.assert_close(embedded["image_embeds"], output.image_embeds)
    torch.testing.assert_close(embedded["vision_model_output.pooler_output"], output.vision_model_output.pooler_output)
    assert embedded["image_ids"].tolist() == [10, 20, 30, 40, 50]


def test_embed_runs_only_the_towers_of_the_inputs_asked_for(make_model, processor, split):
    batches = DataLoader(split, batch_size=2, collate_fn=CaptionCollator(processor.tokenizer, train=False))
    embedded = embed(make_model(), batches, ["image_embeds", "text_embeds"], fields=["labels"], inputs=IMAGE_INPUTS)
    assert set(embedded) == {"image_embeds", "labels"}  # the batches' captions were not embedded


def test_embed_restores_each_modules_mode_and_keeps_no_graph(make_model, processor):
    model = make_model().train()
    model.vision_model.eval()  # a frozen tower during training
    inputs = processor(text=CAPTIONS[:2], return_tensors="pt")
    embedded = embed(model, [inputs], ["text_embeds"])
    assert not embedded["text_embeds"].requires_grad
    assert model.training and model.text_model.training and not model.vision_model.training
    # In eval mode (no dropout): the same as the model's eval-mode output.
    with torch.no_grad():
        expected = model.eval()(**inputs).text_embeds
    torch.testing.assert_close(embedded["text_embeds"], expected)


def test_evaluate_scores_the_split_as_the_metrics_do_on_its_embeddings(make_model, processor, split, accelerator):
    model = make_model().train()
    args = type("Args", (), {"per_device_eval_batch_size": 2, "zero_shot_template": "a photo of a {}."})()
    metrics = evaluate(model, eval_loaders(split, processor.tokenizer, accelerator), processor, accelerator, args,
                       class_names=["red", "blue"])  # fmt: skip
    assert model.training  # training goes on after an evaluation

    model.eval()
    with torch.no_grad():
        images = torch.stack([row["pixel_values"] for row in split])
        first = processor(text=[row["captions"][0] for row in split], return_tensors="pt")
        every = processor(text=[caption for row in split for caption in row["captions"]], return_tensors="pt")
        prompts = processor(text=["a photo of a red.", "a photo of a blue."], padding=True, return_tensors="pt")
        image_embeds = model(pixel_values=images).image_embeds
        first_embeds, text_embeds = model(**first).text_embeds, model(**every).text_embeds
        prompt_embeds = model(**prompts).text_embeds
    image_ids = torch.tensor([row["image_id"] for row in split])
    caption_ids = image_ids.repeat_interleave(CAPTIONS_PER_IMAGE)
    expected = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    scale = model.clamped_logit_scale().item()
    assert metrics["eval_loss"] == pytest.approx(chunked_contrastive_loss(image_embeds, first_embeds, scale, 2))
    labels = torch.tensor([row["label"] for row in split])
    assert metrics["zero_shot_accuracy"] == pytest.approx(zero_shot_accuracy(image_embeds, labels, prompt_embeds))
    assert metrics["zero_shot_chance"] == 0.5
