"""run_clip.py end to end: real `accelerate launch` runs in subprocesses on tiny generated data in every supported
format, two processes against one, kill-and-resume, bad data, offline failure."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ndclip.layouts import (
    BOGUS_FLICKR8K_NAME,
    captions_of,
    write_csv_one_caption_per_row,
    write_hub_parquet,
    write_imagefolder,
    write_images,
    write_jsonl_caption_lists,
    write_kaggle_flickr8k,
    write_messy_images,
    write_original_flickr8k,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from modeling_ndclip import NdClipModel
from run_clip import default_dataloader_workers
from ndclip.tiny_towers import tiny_config, tiny_processor

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_CLIP = str(REPO_ROOT / "run_clip.py")
EVAL_KEYS = {
    "image_to_text_recall@1", "image_to_text_recall@5", "image_to_text_recall@10",
    "text_to_image_recall@1", "text_to_image_recall@5", "text_to_image_recall@10",
    "image_to_text_median_rank", "text_to_image_median_rank", "eval_loss", "split", "step", "epoch",
}  # fmt: skip
SMALL_RUN = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args: list[str], num_processes: int = 1, mixed_precision: str = "no") -> tuple[list[str], dict]:
    """`accelerate launch` on the CPU: one process, or several talking through gloo (accelerate's multi-CPU mode,
    selected by ACCELERATE_USE_CPU with the multi-process launcher)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", mixed_precision,
                "--dynamo_backend", "no", "--num_processes", str(num_processes)]  # fmt: skip
    if num_processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        launcher += ["--cpu"]
    return launcher + [RUN_CLIP, *args], env


def launch(args: list[str], num_processes: int = 1, check: bool = True, extra_env: dict | None = None,
           **launch_options) -> subprocess.CompletedProcess:
    cmd, env = launch_command(args, num_processes, **launch_options)
    env.update(extra_env or {})
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result


def history(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def save_tiny_ndclip(folder, dropout: float = 0.1, seed: int = 0) -> Path:
    texts = [caption for n in range(40) for caption in captions_of(n)]
    processor = tiny_processor(texts, vocab_size=300)
    config = tiny_config(len(processor.tokenizer))
    config.text_config.dropout = config.text_config.attention_dropout = dropout
    config.vision_config.hidden_dropout_prob = dropout
    torch.manual_seed(seed)
    NdClipModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_ndclip(tmp_path_factory.mktemp("tiny_ndclip"))


@pytest.fixture(scope="module")
def tiny_model_without_dropout(tmp_path_factory) -> Path:
    return save_tiny_ndclip(tmp_path_factory.mktemp("tiny_ndclip_no_dropout"), dropout=0.0)


def assert_hub_ready_output(output_dir) -> dict:
    output_dir = Path(output_dir)
    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True)
    assert type(model).__name__ == "NdClipModel"
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "README.md").is_file()
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert EVAL_KEYS <= set(results)
    for key in EVAL_KEYS - {"split", "step", "epoch"}:
        assert isinstance(results[key], float)
    for plot in ("loss.png", "retrieval_recall.png"):
        with Image.open(output_dir / plot) as image:
            assert image.size[0] > 300
    return results


# ----- every supported data format, end to end -------------------------------------------------------------------


def write_format(kind: str, root: Path) -> list[str]:
    """Write tiny data in one of the supported layouts; return the run_clip.py arguments that read it."""
    if kind == "hub_parquet":
        write_hub_parquet(root / "hub", {"train": 12, "validation": 4, "test": 4})
        return ["--dataset_name", str(root / "hub"), "--eval_split", "test"]
    if kind == "kaggle":
        write_kaggle_flickr8k(root, 16)
        return ["--data_dir", str(root)]
    if kind == "original_misspelled":
        write_original_flickr8k(root, "Flicker8k_Dataset", split_sizes=(8, 4, 4))
        return ["--data_dir", str(root)]
    if kind == "csv":
        return ["--train_file", write_csv_one_caption_per_row(root, 16), "--validation_fraction", "0.25"]
    if kind == "jsonl":
        paths = write_jsonl_caption_lists(root, {"train": range(12), "validation": range(12, 16)})
        return ["--train_file", paths["train"], "--validation_file", paths["validation"]]
    if kind == "imagefolder":
        write_imagefolder(root / "folder", 16)
        return ["--data_dir", str(root / "folder"), "--validation_fraction", "0.25"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["hub_parquet", "kaggle", "original_misspelled", "csv", "jsonl", "imagefolder"])
def test_every_data_format_trains_end_to_end(kind, tmp_path, tiny_model):
    data_args = write_format(kind, tmp_path / "data")
    out = tmp_path / "out"
    result = launch(["--model_name_or_path", str(tiny_model), *data_args, "--output_dir", str(out),
                     "--max_train_steps", "2", *SMALL_RUN])  # fmt: skip
    results = assert_hub_ready_output(out)
    assert results["step"] == 2
    assert f"{default_dataloader_workers()} data loader workers per process" in result.stderr  # the default
    assert [r["step"] for r in history(out) if "loss" in r] == [1, 2]
    if kind == "hub_parquet":
        assert results["split"] == "test"
    if kind == "original_misspelled":  # the token file's line for an image that does not exist
        assert BOGUS_FLICKR8K_NAME in result.stderr


def test_training_from_pretrained_towers_with_zero_shot_dataset(tmp_path):
    """`--vision_model_name_or_path` / `--text_model_name_or_path` (folders standing in for the Hub ids), the towers'
    own image processor and tokenizer, and `--zero_shot_dataset` with an imagefolder of labelled classes."""
    from transformers import ViTImageProcessor

    from ndclip.tiny_towers import tiny_text_config, tiny_vision_config, train_wordpiece_tokenizer

    vision, text = tmp_path / "vit", tmp_path / "distilbert"
    AutoModel.from_config(tiny_vision_config()).save_pretrained(vision)
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(vision)
    tokenizer = train_wordpiece_tokenizer([c for n in range(40) for c in captions_of(n)], vocab_size=300)
    AutoModel.from_config(tiny_text_config(len(tokenizer))).save_pretrained(text)
    tokenizer.save_pretrained(text)
    for label in ("cats", "dogs"):
        write_images(tmp_path / "zero_shot" / label, [f"{label}{n}.png" for n in range(3)], image_format="PNG")
    data_args = write_format("kaggle", tmp_path / "data")
    out = tmp_path / "out"

    launch(["--vision_model_name_or_path", str(vision), "--text_model_name_or_path", str(text),
            "--projection_dim", "16", "--text_pooling", "cls", *data_args, "--output_dir", str(out),
            "--max_train_steps", "2", "--zero_shot_dataset", str(tmp_path / "zero_shot"),
            "--zero_shot_template", "a photo of {}.", "--with_tracking", "--checkpointing_steps", "1",
            *SMALL_RUN])  # fmt: skip

    results = assert_hub_ready_output(out)
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0 and results["zero_shot_chance"] == 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["projection_dim"] == 16 and config["text_pooling"] == "cls"
    assert any((out / "runs").rglob("events.out.tfevents*")), "tensorboard logs from --with_tracking"
    assert_push_selection_is_self_contained(out, tmp_path / "as_pushed")


def assert_push_selection_is_self_contained(out: Path, pushed: Path) -> None:
    """What `--push_to_hub` uploads (the folder minus `HUB_IGNORE_PATTERNS`, selected by huggingface_hub's own
    filter) is a complete model repository: copied alone, it loads through the zero-shot pipeline."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects
    from transformers import pipeline

    from run_clip import HUB_IGNORE_PATTERNS

    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    selected = sorted(filter_repo_objects(files, ignore_patterns=HUB_IGNORE_PATTERNS))
    assert not any(f.startswith(("checkpoints/", "runs/")) for f in selected)
    assert {"README.md", "config.json", "model.safetensors", "modeling_ndclip.py", "configuration_ndclip.py",
            "processing_ndclip.py", "processor_config.json", "tokenizer.json", "eval_results.json"} <= set(selected)  # fmt: skip
    for name in selected:
        (pushed / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, pushed / name)
    classify = pipeline("zero-shot-image-classification", model=str(pushed), trust_remote_code=True)
    scores = classify(Image.new("RGB", (40, 30), "red"), candidate_labels=["dog", "cat"])
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-5


def test_push_to_hub_needs_a_repository_id():
    from run_clip import parse_args

    with pytest.raises(SystemExit, match="--hub_model_id"):
        parse_args(["--output_dir", "out", "--push_to_hub"])


def test_bf16_mixed_precision_and_gradient_checkpointing(tmp_path, tiny_model):
    data_args = write_format("kaggle", tmp_path / "data")
    out = tmp_path / "out"
    launch(["--model_name_or_path", str(tiny_model), *data_args, "--output_dir", str(out), "--max_train_steps", "2",
            "--gradient_checkpointing", *SMALL_RUN], mixed_precision="bf16")  # fmt: skip
    assert_hub_ready_output(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history(out) if "loss" in r)
    weights = load_file(out / "model.safetensors")
    assert weights["logit_scale"].dtype == torch.float32, "autocast computes in bf16, the weights stay fp32"


def test_default_dataloader_workers_leave_a_core_to_each_training_process(monkeypatch):
    from run_clip import MAX_DEFAULT_DATALOADER_WORKERS

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_dataloader_workers() == min(cores - 1, MAX_DEFAULT_DATALOADER_WORKERS)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one core per process: load in the training process
    assert default_dataloader_workers() == 0


# ----- the global batch: 2 processes x b == 1 process x 2b ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_without_dropout) -> tuple[list[str], Path]:
    """One eager process at batch 8 on Kaggle-layout data: the run that other process counts and compilation must
    reproduce. Returns the arguments shared by all of them (all but the batch size and output folder) and its folder."""
    root = tmp_path_factory.mktemp("reference_run")
    common = ["--model_name_or_path", str(tiny_model_without_dropout), *write_format("kaggle", root / "data"),
              "--max_train_steps", "2", "--logging_steps", "1", "--per_device_eval_batch_size", "4",
              "--learning_rate", "1e-3"]  # fmt: skip
    launch([*common, "--per_device_train_batch_size", "8", "--output_dir", str(root / "one")])
    return common, root / "one"


def test_two_processes_compute_the_same_loss_and_weights_as_one(tmp_path, tiny_model_without_dropout, reference_run):
    common, one_dir = reference_run
    launch([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two")], num_processes=2)

    one = [r["loss"] for r in history(one_dir) if "loss" in r]
    two = [r["loss"] for r in history(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 2
    assert one == pytest.approx(two, rel=1e-5), "the loss is over the global batch of 8 in both runs"
    weights_one = load_file(one_dir / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "model.safetensors")
    initial = load_file(tiny_model_without_dropout / "model.safetensors")
    assert not torch.equal(weights_one["visual_projection.ndlinear.align_layers.0.weight"],
                           initial["visual_projection.ndlinear.align_layers.0.weight"])  # fmt: skip
    # Summation order differs (one matmul over 8 rows vs two halves plus an all-reduce), and Adam divides each
    # gradient by its own running magnitude, so near-zero gradients can move a weight by a small fraction of the
    # learning rate (1e-3) differently: a tenth of it is the tolerance, far below what a wrong loss would give.
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_torch_compile_trains_to_the_same_losses(tmp_path, reference_run):
    """`--torch_compile` through accelerate's TorchDynamoPlugin (dynamic shapes: captions are padded per batch). The
    `aot_eager` backend traces the model as inductor does but runs the traced aten ops instead of generating kernels
    (inductor's C++ compilation takes minutes on a small CPU), so the losses match the eager run's."""
    common, eager_dir = reference_run
    compiled = launch([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "compiled"),
                       "--torch_compile", "--torch_compile_backend", "aot_eager"],
                      extra_env={"TORCH_LOGS": "recompiles"})  # fmt: skip

    assert "Recompiling function forward" in compiled.stderr, "the model ran through torch.compile"
    eager = [r["loss"] for r in history(eager_dir) if "loss" in r]
    assert [r["loss"] for r in history(tmp_path / "compiled") if "loss" in r] == pytest.approx(eager, rel=1e-5)
    assert_hub_ready_output(tmp_path / "compiled")  # saved without the compile wrapper's `_orig_mod.` prefixes


# ----- frozen towers train from cached features -------------------------------------------------------------------


@pytest.mark.parametrize("frozen", ["both", "vision"])
def test_frozen_towers_train_from_cached_features_like_without(frozen, tmp_path, tiny_model):
    flags = ["--freeze_vision_model", "--freeze_text_model"] if frozen == "both" else ["--freeze_vision_model"]
    data_args = write_format("kaggle", tmp_path / "data")
    common = ["--model_name_or_path", str(tiny_model), *data_args, *flags, "--max_train_steps", "6",
              "--learning_rate", "1e-3", *SMALL_RUN]  # fmt: skip
    cached = launch([*common, "--output_dir", str(tmp_path / "cached")])
    launch([*common, "--output_dir", str(tmp_path / "uncached"), "--disable_feature_cache"])

    assert "cached frozen tower features" in cached.stderr
    losses = {run: [r["loss"] for r in history(tmp_path / run) if "loss" in r] for run in ("cached", "uncached")}
    assert len(losses["cached"]) == 6 and losses["cached"] == pytest.approx(losses["uncached"], rel=1e-4)
    weights = {run: load_file(tmp_path / run / "model.safetensors") for run in ("cached", "uncached")}
    initial = load_file(tiny_model / "model.safetensors")
    for name, tensor in weights["uncached"].items():
        # Same tolerance argument as the two-process test: batch composition changes float summation order.
        torch.testing.assert_close(weights["cached"][name], tensor, rtol=0, atol=1e-4, msg=name)
        if name.startswith("vision_model.") or (frozen == "both" and name.startswith("text_model.")):
            assert torch.equal(tensor, initial[name]), f"{name} is frozen"
    if frozen == "vision":
        assert not torch.equal(weights["cached"]["text_model.embeddings.word_embeddings.weight"],
                               initial["text_model.embeddings.word_embeddings.weight"])  # fmt: skip


# ----- checkpoints: kill -9 and resume ------------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_model):
    data_args = write_format("kaggle", tmp_path / "data")
    common = ["--model_name_or_path", str(tiny_model), *data_args, "--max_train_steps", "9",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", *SMALL_RUN]  # fmt: skip
    reference = tmp_path / "reference"
    launch([*common, "--output_dir", str(reference)])

    killed = tmp_path / "killed"
    cmd, env = launch_command([*common, "--output_dir", str(killed)])
    process = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_4").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training process, mid-run
    process.wait()
    assert not (killed / "model.safetensors").exists()
    steps_logged_before = max(r["step"] for r in history(killed))

    launch([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])

    expected, resumed = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in history(killed) if "loss" in r]
    assert steps == list(range(1, 10)), f"each step logged once (the killed run had logged {steps_logged_before})"
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step_6", "step_8"], "at most --checkpoints_total_limit complete checkpoints, no temporary ones"


def test_latest_checkpoint_ignores_an_interrupted_save(tmp_path):
    from run_clip import checkpoint_dirs

    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_10", ".tmp-step_12", "step_x"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in checkpoint_dirs(str(tmp_path))] == ["step_2", "step_10"]


# ----- bad data and failures ----------------------------------------------------------------------------------------


def write_messy_kaggle(root: Path, good_images: int = 12) -> None:
    """A Kaggle-layout folder whose captions.txt also names every kind of broken image, and has empty captions."""
    write_kaggle_flickr8k(root, good_images)
    bad = write_messy_images(root / "Images")
    lines = [f"{name},a picture that may be broken" for name in bad if name != "uncaptioned.jpg"]
    lines.append('uncaptioned.jpg,""')
    with open(root / "captions.txt", "a") as f:
        f.write("\n".join(lines) + "\n")


def test_bad_samples_are_skipped_and_counted_with_two_processes(tmp_path, tiny_model):
    write_messy_kaggle(tmp_path / "data")
    out = tmp_path / "out"
    result = launch(["--model_name_or_path", str(tiny_model), "--data_dir", str(tmp_path / "data"),
                     "--output_dir", str(out), "--num_train_epochs", "2", *SMALL_RUN], num_processes=2)  # fmt: skip
    log = result.stderr
    assert "skipped unusable samples" in log
    for reason in ("corrupt_image", "not_an_image", "missing_file", "no_caption"):
        assert reason in log, reason
    assert "truncated.jpg" in log
    assert_hub_ready_output(out)


def test_malformed_captions_file_names_file_and_line(tmp_path, tiny_model):
    write_kaggle_flickr8k(tmp_path / "data", 8)
    with open(tmp_path / "data" / "captions.txt", "a") as f:
        f.write("1000_abc.jpg,a dog , running\n")  # an unquoted comma: three fields
    result = subprocess.run(
        [sys.executable, RUN_CLIP, "--model_name_or_path", str(tiny_model), "--data_dir", str(tmp_path / "data"),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "captions.txt" in result.stderr and "line 42" in result.stderr


def test_nothing_usable_is_a_clear_error(tmp_path, tiny_model):
    root = tmp_path / "data"
    write_messy_images(root / "Images")
    (root / "captions.txt").write_text("image,caption\nnotes.jpg,a note\nmissing.jpg,a ghost\n")
    result = subprocess.run(
        [sys.executable, RUN_CLIP, "--model_name_or_path", str(tiny_model), "--data_dir", str(root),
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "nothing usable" in result.stderr.lower() or "no usable" in result.stderr.lower()


def test_offline_without_local_data_fails_fast_with_one_message(tmp_path):
    result = subprocess.run(
        [sys.executable, RUN_CLIP, "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "jxie/flickr8k" in result.stderr and "--preset demo" in result.stderr and "--data_dir" in result.stderr


def test_offline_model_download_fails_fast_with_one_message(tmp_path):
    data_args = write_format("kaggle", tmp_path / "data")
    result = subprocess.run(
        [sys.executable, RUN_CLIP, *data_args, "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "google/vit-base-patch16-224" in result.stderr and "--preset demo" in result.stderr
