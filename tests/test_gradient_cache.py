"""Exact contrastive accumulation (ndclip/gradient_cache.py, `run_clip.py --contrastive_accumulation`): k micro-batches
of b give the loss, gradients and weights of one batch of k x b -- for both losses and several captions per image, with
dropout replayed, gradient checkpointing, bf16 autocast, frozen towers from the feature cache, the NaN guard, a resume,
and 2 launched processes against one.

Direct calls on a tiny model check the gradients; in-process `run_clip.main` runs check the weights after optimizer
steps; one real `accelerate launch` checks 2 processes x k x b against 1 x k*2b; the benchmark runs at the tiny size."""

import json
import logging
from pathlib import Path

import pytest
import torch
from benchmark_runs import check_hardware, positive, run_benchmark
from conftest import CAPTIONS, random_images
from safetensors.torch import load_file
from test_run_clip import history, launch, losses, save_tiny_ndclip, write_format
from test_run_clip_guards import with_nan_word_embedding

import run_clip
from modeling_ndclip import NdClipModel
from ndclip.gradient_cache import backward_through_cache, embed_without_gradients, split_batch
from ndclip.layouts import write_jsonl_caption_lists
from ndclip.losses import global_loss
from ndclip.tiny_towers import tiny_config

K, B = 4, 2  # micro-batches of b pairs: one batch of k * b = 8


# ----- direct calls: gradients ----------------------------------------------------------------------------------------


def tiny_model(processor, dropout: float, contrastive_loss: str = "softmax", seed: int = 0):
    """A tiny NdCLIP in training mode, with `dropout` in both towers."""
    config = tiny_config(len(processor.tokenizer), contrastive_loss=contrastive_loss)
    config.text_config.dropout = config.text_config.attention_dropout = dropout
    config.vision_config.hidden_dropout_prob = config.vision_config.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    return NdClipModel(config).train()


def batch_inputs(processor, images: int, captions_per_image: int = 1) -> dict:
    """Model inputs of `images` pairs with `captions_per_image` captions each, image-major."""
    texts = [CAPTIONS[(i + j) % len(CAPTIONS)] for i in range(images) for j in range(captions_per_image)]
    inputs = processor(text=texts, images=random_images(images, seed=3), return_tensors="pt", padding=True)
    return dict(inputs)


def loss_of(outputs, kind: str = "softmax", captions_per_image: int = 1) -> torch.Tensor:
    return global_loss(
        outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias,
        kind=kind, captions_per_image=captions_per_image,
    )  # fmt: skip


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def gradient_cache_step(model, inputs: dict, kind: str = "softmax", captions_per_image: int = 1) -> torch.Tensor:
    micro_batches = split_batch(inputs, K)
    cache = embed_without_gradients(model, micro_batches, torch.device("cpu"))
    loss = loss_of(cache, kind, captions_per_image)
    backward_through_cache(model, micro_batches, cache, loss)
    return loss


def assert_same_gradients(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("kind, captions_per_image", [("softmax", 1), ("sigmoid", 2)])
def test_k_micro_batches_give_the_loss_and_gradients_of_one_big_batch(processor, kind, captions_per_image):
    """Without dropout (a big batch draws other masks): k x b through the cache == one batch of k*b; plain
    accumulation of the micro-batches' own losses is not (its negatives are the micro-batch's only)."""
    model = tiny_model(processor, dropout=0.0, contrastive_loss=kind)
    if kind == "sigmoid":  # from SigLIP's initial bias (-10) the negatives' gradients are tiny: make them count
        model.logit_bias.data.fill_(0.0)
    inputs = batch_inputs(processor, K * B, captions_per_image)

    big_loss = loss_of(model(**inputs), kind, captions_per_image)
    big_loss.backward()
    big = gradients(model)
    cached_loss = gradient_cache_step(model, inputs, kind, captions_per_image)
    cached = gradients(model)

    torch.testing.assert_close(cached_loss, big_loss)
    assert_same_gradients(cached, big)
    assert ("logit_bias" in cached) == (kind == "sigmoid") and cached["logit_scale"].abs() > 0
    for micro_batch in split_batch(inputs, K):  # plain accumulation, as accelerate scales it
        (loss_of(model(**micro_batch), kind, captions_per_image) / K).backward()
    plain = gradients(model)
    difference = torch.cat([(plain[name] - grad).flatten() for name, grad in big.items()]).norm()
    assert difference > 0.01 * torch.cat([grad.flatten() for grad in big.values()]).norm()


@pytest.mark.parametrize("checkpointing, autocast", [(False, False), (True, False), (False, True)])
def test_dropout_is_replayed(processor, checkpointing, autocast):
    """With dropout on, the cache's gradients equal those of the full graph: the k micro-batch forwards kept with
    autograd (drawing, in turn, from the same random stream), their embeddings concatenated, one backward. The random
    state ends where the full graph leaves it. Also with gradient checkpointing (which replays its own recomputation)
    and under bf16 autocast."""
    model = tiny_model(processor, dropout=0.2)
    if checkpointing:
        model.activation_checkpointing_enable()
    inputs = batch_inputs(processor, K * B)

    def forward(**micro_batch):  # the model's passes under autocast, the loss outside, as accelerate's prepared model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(**micro_batch)

    def full_graph(seed: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        torch.manual_seed(seed)
        parts = [forward(**micro_batch) for micro_batch in split_batch(inputs, K)]
        image_embeds = torch.cat([p.image_embeds.float() for p in parts])
        text_embeds = torch.cat([p.text_embeds.float() for p in parts])
        loss = global_loss(image_embeds, text_embeds, parts[-1].logit_scale)
        loss.backward()
        return loss, gradients(model), torch.get_rng_state()

    expected_loss, expected, expected_state = full_graph(seed=5)
    torch.manual_seed(5)
    loss = gradient_cache_step(forward, inputs)
    got = gradients(model)

    torch.testing.assert_close(loss, expected_loss)
    assert_same_gradients(got, expected, atol=1e-5 if autocast else 1e-6)
    assert torch.equal(torch.get_rng_state(), expected_state), "the rest of the run draws what it would have drawn"
    _, other_masks, _ = full_graph(seed=6)
    difference = torch.cat([(other_masks[name] - grad).flatten() for name, grad in expected.items()]).norm()
    assert difference > 0.01 * torch.cat([grad.flatten() for grad in expected.values()]).norm(), "dropout matters"


def test_split_batch_needs_equal_micro_batches(processor):
    inputs = batch_inputs(processor, 6)
    with pytest.raises(ValueError, match="'input_ids' has 6 rows, which do not split into 4 equal micro-batches"):
        split_batch(inputs, 4)


def test_contrastive_accumulation_needs_several_micro_batches(tmp_path):
    with pytest.raises(SystemExit, match="set --gradient_accumulation_steps to 2 or more"):
        run_clip.parse_args(["--output_dir", str(tmp_path), "--contrastive_accumulation"])


# ----- run_clip.py: weights after optimizer steps, frozen towers, resume, two processes ---------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Tiny Kaggle-layout data (14 training images), a model without dropout, and the arguments every run shares."""
    root = tmp_path_factory.mktemp("contrastive_accumulation")
    model = save_tiny_ndclip(root / "model", dropout=0.0)
    common = ["--model_name_or_path", str(model), *write_format("kaggle", root / "data"), "--max_train_steps", "2",
              "--logging_steps", "1", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
              "--dataloader_num_workers", "0"]  # fmt: skip
    return {"root": root, "model": model, "common": common}


def train(data: dict, name: str, *args: str) -> Path:
    out = data["root"] / name
    run_clip.main([*data["common"], *args, "--output_dir", str(out)])
    return out


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def big_batch_run(data) -> Path:
    """One process, one batch of 8 per step: what k = 4 micro-batches of 2 must reproduce."""
    out = train(data, "big", "--per_device_train_batch_size", str(K * B))
    reset_accelerate()
    return out


ACCUMULATED = ["--per_device_train_batch_size", str(B), "--gradient_accumulation_steps", str(K),
               "--contrastive_accumulation"]  # fmt: skip


def assert_same_weights(got: Path, expected: Path, atol: float) -> None:
    """Weights of two runs' final models. Summation orders differ (a matmul over 8 rows against 4 of 2), and Adam
    divides each gradient by its own running magnitude: `atol` is a small fraction of the learning rate (1e-3)."""
    weights, reference = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=atol, msg=name)


def test_run_with_contrastive_accumulation_trains_the_weights_of_the_big_batch_and_resumes_exactly(
    data, big_batch_run, tmp_path
):
    accumulated = train(data, "accumulated", *ACCUMULATED, "--checkpointing_steps", "1")
    assert [r["step"] for r in history(accumulated) if "loss" in r] == [1, 2]
    assert losses(accumulated) == pytest.approx(losses(big_batch_run), rel=1e-5)
    assert_same_weights(accumulated, big_batch_run, atol=1e-5)
    initial = load_file(data["model"] / "model.safetensors")["logit_scale"]
    assert not torch.equal(load_file(accumulated / "model.safetensors")["logit_scale"], initial)

    reset_accelerate()  # a resumed run in a fresh folder, from the checkpoint after step 1
    resumed = tmp_path / "resumed"
    checkpoint = accumulated / "checkpoints" / "step_1"
    run_clip.main([*data["common"], *ACCUMULATED, "--output_dir", str(resumed), "--resume_from_checkpoint",
                   str(checkpoint)])  # fmt: skip
    assert losses(resumed)[-1] == losses(accumulated)[-1]
    assert_same_weights(resumed, accumulated, atol=0)

    reset_accelerate()  # the same checkpoint without the setting: its loader batches held 8 pairs, not 2
    plain = ACCUMULATED[:-1]
    with pytest.raises(SystemExit, match=r"contrastive_accumulation: True → False \(a loader batch would hold"):
        run_clip.main([*data["common"], *plain, "--output_dir", str(tmp_path / "plain"), "--resume_from_checkpoint",
                       str(checkpoint)])  # fmt: skip


def test_frozen_vision_tower_from_the_feature_cache_with_gradient_checkpointing_and_two_captions_per_image(
    data, caplog
):
    """Batches carry the frozen tower's cached features instead of pixels, and 2 captions per image (image-major: a
    micro-batch holds its images' captions); the text tower trains with gradient checkpointing."""
    frozen = ["--freeze_vision_model", "--captions_per_image", "2"]
    big = train(data, "frozen_big", *frozen, "--per_device_train_batch_size", str(K * B))
    reset_accelerate()
    caplog.set_level(logging.INFO)
    accumulated = train(data, "frozen_accumulated", *frozen, *ACCUMULATED, "--gradient_checkpointing")
    assert "cached frozen tower features" in caplog.text
    assert losses(accumulated) == pytest.approx(losses(big), rel=1e-5)
    assert_same_weights(accumulated, big, atol=1e-5)


def test_the_nan_guard_checks_the_loss_of_the_whole_batch_before_any_backward(data, tmp_path):
    """One image's captions hold a word the tokenizer does not know, and the model's [UNK] embedding is NaN: the run
    stops at step 1, naming that image among all 8 of the step (4 micro-batches of 2), before any backward pass."""
    model = with_nan_word_embedding(data["model"], "[UNK]", tmp_path / "model")
    paths = write_jsonl_caption_lists(tmp_path / "data", {"train": range(8), "validation": range(8, 10)})
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    rows[5]["sentences"] = [f"photo 5 a zebra {n}" for n in range(5)]
    Path(paths["train"]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit, match=r"training loss is nan at step 1 .*1 of 8 samples .*image_id 5\)"):
        run_clip.main(["--model_name_or_path", str(model), "--train_file", paths["train"], "--validation_file",
                       paths["validation"], "--output_dir", str(tmp_path / "out"), "--dataloader_num_workers", "0",
                       *ACCUMULATED])  # fmt: skip


def test_two_launched_processes_of_k_micro_batches_train_like_one_process_of_the_whole_batch(
    data, big_batch_run, tmp_path
):
    """`accelerate launch --num_processes 2`, each process k = 2 micro-batches of 2: the global batch of 8 of the
    one-process run, its loss over all 8 pairs (gathered across processes), its weights."""
    two = tmp_path / "two"
    launch([*data["common"], "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--contrastive_accumulation", "--output_dir", str(two)], num_processes=2)  # fmt: skip
    assert len(losses(big_batch_run)) == 2
    assert losses(two) == pytest.approx(losses(big_batch_run), rel=1e-5)
    assert_same_weights(two, big_batch_run, atol=1e-4)


# ----- the benchmark, at the tiny size ------------------------------------------------------------------------------


def test_benchmark_measures_every_mode_and_the_cache_holds_fewer_activations(capsys):
    """benchmarks/bench_contrastive_accumulation.py: the timing rounds of the three modes, and two of the memory
    children as their fresh subprocesses run them (here in this process, for the profiler's peak of live tensors)."""
    sizes = "--size tiny --micro_batch_size 4 --accumulation_steps 2".split()
    result = run_benchmark(capsys, "bench_contrastive_accumulation", *sizes, "--rounds", "1", "--warmup", "0",
                           "--no_memory")  # fmt: skip
    check_hardware(result)
    assert result["pairs_per_step"] == 8 and "memory" not in result
    for mode in ("big_batch", "contrastive_accumulation", "plain_accumulation"):
        assert result["time"]["step"][mode]["samples"] == 1 and positive(result["time"]["step"][mode]["pairs_per_s"])
    child = [*sizes, "--memory_child", "--tensor_peak", "--mode"]
    big = run_benchmark(capsys, "bench_contrastive_accumulation", *child, "big_batch")
    cached = run_benchmark(capsys, "bench_contrastive_accumulation", *child, "contrastive_accumulation")
    activations = {
        name: run["tensor_peak_by_category_mib"]["activation"] for name, run in (("big", big), ("cached", cached))
    }
    assert 0 < activations["cached"] < 0.75 * activations["big"], activations  # one micro-batch of two at a time
