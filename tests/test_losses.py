"""The contrastive losses (`ndclip.losses`, `modeling_ndclip.pair_loss`) and several captions per image in a batch.

The losses are checked against references written here with plain loops over pairs, independently of the
implementation; the batch of N captions per image against the collator's documented draw; training runs in process
(`run_clip.main`) with the sigmoid loss, several captions per image, the feature cache and the NaN guard; and one real
two-process `accelerate launch` (tests/two_process_losses.py) shows that 2 processes x b train exactly as 1 x 2b for
both losses, with one caption per image and with several."""

import argparse
import json
import math
import random
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from test_run_clip import RUN_CLIP, launch_command, save_tiny_ndclip, write_format
from test_run_clip_guards import with_nan_word_embedding
from transformers import AutoTokenizer

import run_clip
from modeling_ndclip import NdClipModel, pair_loss
from ndclip.data import flatten_captions
from ndclip.feature_cache import CachedTowerCollator, caption_offsets
from ndclip.layouts import captions_of, write_jsonl_caption_lists
from ndclip.losses import global_loss
from ndclip.metrics import chunked_contrastive_loss
from ndclip.tiny_towers import tiny_config, tiny_processor, train_wordpiece_tokenizer
from ndclip.transforms import CaptionCollator

IN_PROCESS = ["--per_device_eval_batch_size", "4", "--logging_steps", "1", "--dataloader_num_workers", "0"]


# ----- references: the formulas, one pair at a time ---------------------------------------------------------------


def log_softmax_at(values: list[float], index: int) -> float:
    return values[index] - math.log(sum(math.exp(v) for v in values))


def reference_softmax_loss(logits: list[list[float]], captions_per_image: int) -> float:
    """CLIP's loss with several captions per image, from the definition: each caption (row) picks its own image
    (column) among all images; each image picks among all captions, with a target spread uniformly over its N own."""
    texts, images = len(logits), len(logits[0])
    text_to_image = -sum(log_softmax_at(logits[t], t // captions_per_image) for t in range(texts)) / texts
    image_to_text = 0.0
    for i in range(images):
        column = [logits[t][i] for t in range(texts)]
        own = [t for t in range(texts) if t // captions_per_image == i]
        image_to_text -= sum(log_softmax_at(column, t) for t in own) / len(own)
    return (text_to_image + image_to_text / images) / 2


def reference_sigmoid_loss(logits: list[list[float]], captions_per_image: int) -> float:
    """SigLIP: -log sigmoid(z * logit) over every (caption, image) pair, z = +1 for a caption of the image and -1
    otherwise, summed and divided by the number of images."""
    total = 0.0
    for t, row in enumerate(logits):
        for i, logit in enumerate(row):
            z = 1.0 if t // captions_per_image == i else -1.0
            total += math.log(1 + math.exp(-z * logit))
    return total / len(logits[0])


REFERENCES = {"softmax": reference_softmax_loss, "sigmoid": reference_sigmoid_loss}


def random_embeddings(rows: int, seed: int, dim: int = 8) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("captions_per_image", [1, 3])
def test_losses_match_the_pairwise_references(kind, captions_per_image):
    logits = 4 * torch.randn(5 * captions_per_image, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = REFERENCES[kind](logits.tolist(), captions_per_image)
    assert pair_loss(logits, kind).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_global_loss_on_one_process_is_the_loss_of_the_scaled_biased_logits_in_float32(kind):
    images, texts = random_embeddings(4, seed=2), random_embeddings(8, seed=3)
    scale, bias = torch.tensor(7.0), torch.tensor(-2.5)
    logits = (7.0 * texts.double() @ images.double().t() + (-2.5 if kind == "sigmoid" else 0.0)).tolist()
    expected = REFERENCES[kind](logits, captions_per_image=2)
    # bf16 embeddings, as under mixed precision: the loss is computed in float32 all the same.
    loss = global_loss(images.bfloat16(), texts.bfloat16(), scale, bias, kind=kind, captions_per_image=2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=2e-2)  # bf16 rounding of the embeddings
    assert global_loss(images, texts, scale, bias, kind=kind, captions_per_image=2).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_the_evaluation_loss_of_a_sigmoid_model_is_its_sigmoid_loss_per_chunk():
    images, texts = random_embeddings(6, seed=6), random_embeddings(6, seed=7)
    chunks = [(0, 4), (4, 6)]
    expected = (
        sum(
            reference_sigmoid_loss((9.0 * texts[a:b].double() @ images[a:b].double().t() - 3.0).tolist(), 1) * (b - a)
            for a, b in chunks
        )
        / 6
    )
    loss = chunked_contrastive_loss(images, texts, 9.0, batch_size=4, logit_bias=torch.tensor(-3.0), kind="sigmoid")
    assert loss == pytest.approx(expected, rel=1e-5)


def test_global_loss_rejects_mismatched_captions_and_a_sigmoid_loss_without_bias():
    images, texts = random_embeddings(4, seed=4), random_embeddings(8, seed=5)
    with pytest.raises(ValueError, match=r"8 caption embeddings for 4 images: expected 3 captions per image"):
        global_loss(images, texts, torch.tensor(10.0), captions_per_image=3)
    with pytest.raises(ValueError, match="sigmoid loss needs the model's `logit_bias`"):
        global_loss(images, texts, torch.tensor(10.0), kind="sigmoid", captions_per_image=2)
    with pytest.raises(ValueError, match="unknown contrastive loss 'hinge'"):
        global_loss(images, texts, torch.tensor(10.0), kind="hinge", captions_per_image=2)


def test_every_caption_of_an_image_is_a_positive_for_it():
    """An image whose 3 captions score alike, far above every other image's captions, is at the softmax loss's
    optimum: image->text is at its floor, the entropy log 3 of the uniform target, and no gradient pushes one of its
    captions below another. With one positive per image (a caption's siblings taken as negatives), the same logits
    would be pushed apart."""
    images = torch.eye(4)
    logits = (50.0 * images.repeat_interleave(3, dim=0) @ images.t()).requires_grad_()
    loss = pair_loss(logits, "softmax")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(3) / 2, abs=1e-6)  # text->image is ~0
    assert logits.grad.abs().max().item() < 1e-6
    one_positive = torch.nn.functional.cross_entropy(logits.t(), torch.arange(4) * 3)  # first caption only
    (sibling_gradient,) = torch.autograd.grad(one_positive, logits)
    assert sibling_gradient[1, 0].item() > 0.01, "a sibling caption would be pushed down"


# ----- several captions per image in a batch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer([caption for n in range(8) for caption in captions_of(n)], vocab_size=200)


def examples(count: int = 4, captions: int = 5) -> list[dict]:
    return [{"image_id": n, "captions": captions_of(n)[:captions], "pixel_values": torch.zeros(3, 2, 2)} for n in
            range(count)]  # fmt: skip


def decoded(tokenizer, batch: dict) -> list[str]:
    return tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)


def normalised(tokenizer, texts: list[str]) -> list[str]:
    """The texts as the tokenizer gives them back (lower case, its spacing)."""
    return tokenizer.batch_decode(tokenizer(texts)["input_ids"], skip_special_tokens=True)


def test_one_caption_per_image_is_the_draw_of_every_earlier_run(tokenizer):
    """N = 1 keeps the caption that `random.Random(f"{seed}-{epoch}-{image_id}").choice(captions)` gave before
    several captions existed: the demo's numbers do not move."""
    collator = CaptionCollator(tokenizer, seed=3)
    for epoch in (0, 1, 7):
        collator.set_epoch(epoch)
        expected = [random.Random(f"3-{epoch}-{e['image_id']}").choice(e["captions"]) for e in examples()]
        assert decoded(tokenizer, collator(examples())) == normalised(tokenizer, expected)


def test_several_captions_per_image_are_image_major_and_repeat_only_when_an_image_has_fewer(tokenizer):
    collator = CaptionCollator(tokenizer, seed=3, captions_per_image=5)
    collator.set_epoch(2)
    batch = collator(examples())
    texts = decoded(tokenizer, batch)
    assert batch["input_ids"].shape[0] == 20 and batch["pixel_values"].shape[0] == 4
    for n in range(4):
        assert sorted(texts[5 * n : 5 * n + 5]) == sorted(normalised(tokenizer, captions_of(n))), n  # each once
    assert (
        collator(examples()[::-1])["input_ids"].tolist()
        == [  # the draw is per image, not per batch position
            row for n in (3, 2, 1, 0) for row in batch["input_ids"][5 * n : 5 * n + 5].tolist()
        ]
    )
    collator.set_epoch(3)
    assert decoded(tokenizer, collator(examples())) != texts, "another epoch, another order"

    short = CaptionCollator(tokenizer, seed=3, captions_per_image=5)(examples(count=2, captions=2))
    texts = decoded(tokenizer, short)
    for n in range(2):
        own = texts[5 * n : 5 * n + 5]
        assert set(own) == set(normalised(tokenizer, captions_of(n)[:2])) and sorted(map(own.count, set(own))) == [2, 3]

    evaluation = CaptionCollator(tokenizer, train=False, captions_per_image=2)(examples(count=2))
    assert decoded(tokenizer, evaluation) == normalised(tokenizer, [c for n in range(2) for c in captions_of(n)[:2]])


def test_the_caption_feature_cache_feeds_the_captions_the_collator_draws(tokenizer):
    """The cached collator's text features are the rows of the very captions the plain collator tokenizes: a cache
    whose row r holds the number r names them."""
    from datasets import Dataset

    split = Dataset.from_list([{"image_id": e["image_id"], "captions": e["captions"]} for e in examples(3, 4)])
    flat = flatten_captions(split)["caption"]
    cache = torch.arange(len(flat), dtype=torch.float32)[:, None]
    offsets = caption_offsets([len(captions) for captions in split["captions"]])
    collator = CaptionCollator(tokenizer, seed=5, captions_per_image=6)
    cached = CachedTowerCollator(collator, torch.zeros(3, 2), caption_features=cache, offsets=offsets)
    cached.set_epoch(4)
    rows = cached(list(split))["text_tower_features"][:, 0].long().tolist()
    assert normalised(tokenizer, [flat[row] for row in rows]) == decoded(tokenizer, collator(examples(3, 4)))
    assert len(rows) == 18


# ----- training runs ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kaggle_data(tmp_path_factory) -> list[str]:
    return write_format("kaggle", tmp_path_factory.mktemp("losses_data"))


@pytest.fixture(scope="module")
def sigmoid_model(tmp_path_factory) -> Path:
    """The tiny model of test_run_clip.py, built for the sigmoid loss."""
    folder = tmp_path_factory.mktemp("sigmoid_model")
    processor = tiny_processor([caption for n in range(40) for caption in captions_of(n)], vocab_size=300)
    torch.manual_seed(0)
    NdClipModel(tiny_config(len(processor.tokenizer), contrastive_loss="sigmoid")).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_sigmoid_model_trains_with_all_its_captions_from_the_feature_cache_and_keeps_its_loss(
    sigmoid_model, kaggle_data, tmp_path, caplog
):
    """Continuing a sigmoid model (no --loss: the model's own) with every caption of each image (`all`: 5 here) and a
    frozen text tower read from the feature cache; the saved model, its evaluation and its card say sigmoid."""
    caplog.set_level("INFO")
    out = tmp_path / "out"
    results = run_clip.main(["--model_name_or_path", str(sigmoid_model), *kaggle_data, "--output_dir", str(out),
                             "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--captions_per_image",
                             "all", "--freeze_text_model", *IN_PROCESS])  # fmt: skip
    assert "cached frozen tower features" in caplog.text and "5 captions per image" in caplog.text
    saved = NdClipModel.from_pretrained(out)
    assert saved.config.contrastive_loss == "sigmoid"
    assert json.loads((out / "config.json").read_text())["custom_pipelines"]
    assert load_file(out / "model.safetensors")["logit_bias"].item() != -10.0, "the bias is trained"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # At SigLIP's start (bias -10) the negatives cost nearly nothing and each of the 5 positives about 10 - cos x 10:
    # a loss of tens per image, where one caption per image would give about 10.
    assert [r["loss"] > 25 for r in records if "loss" in r] == [True, True]
    # The evaluation loss is the sigmoid loss too: about 10 per image at SigLIP's start, where the softmax loss of
    # these barely trained embeddings would be near ln 2.
    assert results["eval_loss"] > 5
    card = (out / "README.md").read_text()
    assert "pairwise sigmoid (SigLIP) loss" in card and "torch.sigmoid(outputs.logits_per_image)" in card


def test_new_models_are_built_with_the_loss_asked_for(tmp_path):
    """`--loss` reaches the config of a model built from towers and of the demo's; a sigmoid model starts at SigLIP's
    temperature and bias, the softmax demo at its own temperature."""
    from transformers import AutoModel, ViTImageProcessor

    from ndclip.demo import DEMO_LOGIT_SCALE_INIT, demo_model_and_processor, make_demo_dataset
    from ndclip.tiny_towers import tiny_text_config, tiny_vision_config

    tokenizer = train_wordpiece_tokenizer(captions_of(0), vocab_size=100)
    AutoModel.from_config(tiny_vision_config()).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(tmp_path / "vit")
    AutoModel.from_config(tiny_text_config(len(tokenizer))).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    args = run_clip.parse_args(["--output_dir", str(tmp_path / "out"), "--loss", "sigmoid", "--projection_dim", "16",
                                "--vision_model_name_or_path", str(tmp_path / "vit"),
                                "--text_model_name_or_path", str(tmp_path / "bert")])  # fmt: skip
    model, _ = run_clip.build_model(args)
    assert model.config.contrastive_loss == args.loss == "sigmoid" and model.logit_bias.item() == -10.0
    assert model.logit_scale.item() == pytest.approx(math.log(10))

    demo = make_demo_dataset(num_train=4, num_validation=2)
    sigmoid, _ = demo_model_and_processor(demo, contrastive_loss="sigmoid")
    softmax, _ = demo_model_and_processor(demo)
    assert sigmoid.logit_scale.item() == pytest.approx(math.log(10)) and sigmoid.logit_bias.item() == -10.0
    assert softmax.logit_scale.item() == pytest.approx(math.log(DEMO_LOGIT_SCALE_INIT)) and softmax.logit_bias is None


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_captions_per_image_is_a_positive_number_or_all(value, capsys):
    with pytest.raises(SystemExit):
        run_clip.parse_args(["--output_dir", "out", "--captions_per_image", value])
    assert f"--captions_per_image: must be a positive integer or `all`, got '{value}'" in capsys.readouterr().err
    assert run_clip.parse_args(["--output_dir", "out", "--captions_per_image", "all"]).captions_per_image == "all"


def test_all_captions_are_counted_on_the_training_split_and_not_on_a_stream():
    from datasets import Dataset

    split = Dataset.from_list([{"captions": ["a", "b"]}, {"captions": ["a", "b", "c"]}, {"captions": ["a"]}])
    args = argparse.Namespace(captions_per_image="all", streaming=False)
    run_clip.resolve_captions_per_image(args, split)
    assert args.captions_per_image == 3
    with pytest.raises(SystemExit, match="--captions_per_image all counts the captions .* give the number"):
        run_clip.resolve_captions_per_image(argparse.Namespace(captions_per_image="all", streaming=True), None)


def test_continuing_a_model_with_another_loss_is_refused(sigmoid_model, kaggle_data, tmp_path):
    with pytest.raises(SystemExit, match=r"--loss softmax: the model .* was trained with the sigmoid loss"):
        run_clip.main(["--model_name_or_path", str(sigmoid_model), *kaggle_data, "--output_dir", str(tmp_path / "o"),
                       "--loss", "softmax", *IN_PROCESS])  # fmt: skip


def test_the_nan_guard_names_the_image_one_of_whose_captions_is_non_finite(tmp_path):
    """Five captions per image, one caption of image 5 reaching a NaN word embedding: the run stops at step 1 and
    names image 5 (its five caption rows are one sample)."""
    model = with_nan_word_embedding(save_tiny_ndclip(tmp_path / "model"), "[UNK]", tmp_path / "nan_model")
    assert AutoTokenizer.from_pretrained(model).tokenize("zebra") == ["[UNK]"]
    paths = write_jsonl_caption_lists(tmp_path / "data", {"train": range(8), "validation": range(8, 10)})
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    rows[5]["sentences"][3] = "photo 5 a zebra"
    Path(paths["train"]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match=r"training loss is nan at step 1 .*1 of 8 samples .*image_id 5\)"):
        run_clip.main(["--model_name_or_path", str(model), "--train_file", paths["train"], "--validation_file",
                       paths["validation"], "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
                       "--per_device_train_batch_size", "8", "--captions_per_image", "5", *IN_PROCESS])  # fmt: skip


# ----- two processes train as one ---------------------------------------------------------------------------------


def test_two_processes_train_as_one_with_each_loss_and_several_captions(tmp_path):
    """`accelerate launch` of tests/two_process_losses.py: 2 processes x 4 images against 1 x 8, for the softmax and
    the sigmoid loss with 1 and 3 captions per image (see the script)."""
    output = tmp_path / "results.json"
    script = REPO_ROOT / "tests" / "two_process_losses.py"
    command, env = launch_command([str(output)], num_processes=2)
    command[command.index(RUN_CLIP)] = str(script)  # the launcher of run_clip.py's own launched tests
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(output.read_text())
    assert sorted(results) == ["sigmoid-1", "sigmoid-3", "softmax-1", "softmax-3"]
    for name, variant in results.items():
        assert variant["processes"] == 2
        assert variant["distributed_loss"] == pytest.approx(variant["reference_loss"], rel=1e-5), name
        # Without the gather each process would see its own half only: a different loss.
        assert variant["own_half_loss"] != pytest.approx(variant["reference_loss"], rel=1e-2), name
        assert variant["gradient_difference"] < 1e-4, name
        # AdamW's first step moves every weight by about the learning rate (1e-3); the two runs differ by float
        # summation order only, which Adam's per-weight normalisation can magnify for near-zero gradients (as in
        # test_run_clip.py's two-process test): a tenth of the learning rate is far below what a wrong loss gives.
        assert variant["weights_moved"] > 5e-4 and variant["weight_difference"] < 1e-4, name
