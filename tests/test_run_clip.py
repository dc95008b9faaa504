"""run_clip.py end to end on tiny generated data. In-process runs (`run_clip.main(argv)`) cover every data format,
pretrained towers with a zero-shot dataset, mixed precision, frozen towers, bad data and failures; real
`accelerate launch` runs only what a launch shows: a compiled run end to end, two processes against one (with bad
samples filtered by the main process first), and kill -9 then resume."""

import json
import logging
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, pipeline

import run_clip
from modeling_ndclip import NdClipModel
from ndclip.hub import HUB_IGNORE_PATTERNS
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
from ndclip.tiny_towers import tiny_config, tiny_processor
from ndclip.training import checkpoint_dirs
from run_clip import default_dataloader_workers

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


def launch_command(args: list[str], num_processes: int = 1) -> tuple[list[str], dict]:
    """`accelerate launch` on the CPU: one process, or several talking through gloo (accelerate's multi-CPU mode,
    selected by ACCELERATE_USE_CPU with the multi-process launcher)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", str(num_processes)]  # fmt: skip
    if num_processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        launcher += ["--cpu"]
    return launcher + [RUN_CLIP, *args], env


def launch(args: list[str], num_processes: int = 1, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, env = launch_command(args, num_processes)
    env.update(extra_env or {})
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
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
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
        assert 0 <= results[key] <= 1 if "recall@" in key else results[key] > 0, key
    for plot in ("loss.png", "retrieval_recall.png"):
        with Image.open(output_dir / plot) as image:
            assert image.size[0] > 300
    return results


@pytest.fixture
def train(caplog):
    """`train(args)`: `run_clip.main(args)` in this process, loading data in it (no worker processes); returns the
    log so far. accelerate's state is reset after each test (tests/conftest.py), so runs do not share settings."""
    caplog.set_level(logging.INFO)

    def run(args: list[str]) -> str:
        run_clip.main([*args, *SMALL_RUN, "--dataloader_num_workers", "0"])
        return caplog.text

    return run


# ----- launched runs: compiled end to end, two processes against one ---------------------------------------------


def write_messy_kaggle(root: Path, good_images: int = 12) -> None:
    """A Kaggle-layout folder whose captions.txt also names every kind of broken image, and has empty captions."""
    write_kaggle_flickr8k(root, good_images)
    bad = write_messy_images(root / "Images")
    lines = [f"{name},a picture that may be broken" for name in bad if name != "uncaptioned.jpg"]
    lines.append('uncaptioned.jpg,""')
    with open(root / "captions.txt", "a") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_without_dropout) -> tuple[list[str], Path]:
    """One eager process at batch 8, in this process, on Kaggle-layout data with broken images and empty captions:
    the run that the launched runs (two processes, compiled) must reproduce. Returns the arguments shared by all of
    them (all but the batch size and output folder) and its folder."""
    root = tmp_path_factory.mktemp("reference_run")
    write_messy_kaggle(root / "data")
    common = ["--model_name_or_path", str(tiny_model_without_dropout), "--data_dir", str(root / "data"),
              "--max_train_steps", "2", "--logging_steps", "1", "--per_device_eval_batch_size", "4",
              "--learning_rate", "1e-3"]  # fmt: skip
    run_clip.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(root / "one"),
                   "--dataloader_num_workers", "0"])  # fmt: skip
    return common, root / "one"


def losses(output_dir) -> list[float]:
    return [r["loss"] for r in history(output_dir) if "loss" in r]


def test_a_launched_compiled_run_trains_to_the_losses_of_an_eager_one_and_saves_a_hub_ready_folder(
    tmp_path, reference_run
):
    """`accelerate launch` end to end, with `--torch_compile` through accelerate's TorchDynamoPlugin (dynamic shapes:
    captions are padded per batch) and the default loader workers. The `aot_eager` backend traces the model as
    inductor does but runs the traced aten ops instead of generating kernels (inductor's C++ compilation takes
    minutes on a small CPU), so the losses match the eager run's."""
    common, eager_dir = reference_run
    out = tmp_path / "compiled"
    compiled = launch([*common, "--per_device_train_batch_size", "8", "--output_dir", str(out),
                       "--torch_compile", "--torch_compile_backend", "aot_eager"],
                      extra_env={"TORCH_LOGS": "recompiles"})  # fmt: skip

    assert "Recompiling function forward" in compiled.stderr, "the model ran through torch.compile"
    assert f"{default_dataloader_workers()} data loader workers per process" in compiled.stderr  # the default
    assert losses(out) == pytest.approx(losses(eager_dir), rel=1e-5)
    assert [r["step"] for r in history(out) if "loss" in r] == [1, 2]
    # Loads, so saved without the compile wrapper's `_orig_mod.` prefixes.
    assert assert_hub_ready_output(out)["step"] == 2


def test_two_processes_skip_the_same_bad_samples_and_compute_the_loss_and_weights_of_one(
    tmp_path, tiny_model_without_dropout, reference_run
):
    """The main process checks the images first and the other reads datasets' cache: both drop the same samples,
    so each global batch of 8 (4 per process) holds the images of the one-process batch of 8."""
    common, one_dir = reference_run
    two_dir = tmp_path / "two"
    two = launch([*common, "--per_device_train_batch_size", "4", "--output_dir", str(two_dir)], num_processes=2)

    assert "skipped unusable samples" in two.stderr and "truncated.jpg" in two.stderr
    for reason in ("corrupt_image", "not_an_image", "missing_file", "no_caption"):
        assert reason in two.stderr, reason
    assert_hub_ready_output(two_dir)
    assert len(losses(one_dir)) == 2
    assert losses(two_dir) == pytest.approx(losses(one_dir), rel=1e-5), "the loss is over the global batch of 8"
    weights_one = load_file(one_dir / "model.safetensors")
    weights_two = load_file(two_dir / "model.safetensors")
    initial = load_file(tiny_model_without_dropout / "model.safetensors")
    assert not torch.equal(weights_one["visual_projection.ndlinear.align_layers.0.weight"],
                           initial["visual_projection.ndlinear.align_layers.0.weight"])  # fmt: skip
    # Summation order differs (one matmul over 8 rows vs two halves plus an all-reduce), and Adam divides each
    # gradient by its own running magnitude, so near-zero gradients can move a weight by a small fraction of the
    # learning rate (1e-3) differently: a tenth of it is the tolerance, far below what a wrong loss would give.
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-4, msg=name)


# ----- checkpoints: kill -9 and resume ------------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_model, train):
    """A launched run killed (launcher and training process) after its second checkpoint, resumed in this process,
    ends with the weights of an uninterrupted run bit for bit. The launched run loads data in its own process and uses
    this process's number of threads, as the in-process runs do, so that the two compute alike."""
    data_args = write_format("kaggle", tmp_path / "data")
    common = ["--model_name_or_path", str(tiny_model), *data_args, "--max_train_steps", "9",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]  # fmt: skip
    killed = tmp_path / "killed"
    cmd, env = launch_command([*common, "--output_dir", str(killed), *SMALL_RUN, "--dataloader_num_workers", "0"])
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    process = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_4").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training process, mid-run
    process.wait()
    assert not (killed / "model.safetensors").exists()
    steps_logged_before = max(r["step"] for r in history(killed))

    train([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    reference = tmp_path / "reference"
    train([*common, "--output_dir", str(reference)])

    expected, resumed = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    steps = [r["step"] for r in history(killed) if "loss" in r]
    assert steps == list(range(1, 10)), f"each step logged once (the killed run had logged {steps_logged_before})"
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step_6", "step_8"], "at most --checkpoints_total_limit complete checkpoints, no temporary ones"


def test_latest_checkpoint_ignores_an_interrupted_save(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_10", ".tmp-step_12", "step_x"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in checkpoint_dirs(str(tmp_path))] == ["step_2", "step_10"]


# ----- every supported data format, end to end, in process -------------------------------------------------------


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
def test_every_data_format_trains_end_to_end(kind, tmp_path, tiny_model, train):
    data_args = write_format(kind, tmp_path / "data")
    out = tmp_path / "out"
    log = train(["--model_name_or_path", str(tiny_model), *data_args, "--output_dir", str(out),
                 "--max_train_steps", "2"])  # fmt: skip
    results = assert_hub_ready_output(out)
    assert results["step"] == 2
    assert [r["step"] for r in history(out) if "loss" in r] == [1, 2]
    if kind == "hub_parquet":
        assert results["split"] == "test"
    if kind == "original_misspelled":  # the token file's line for an image that does not exist
        assert BOGUS_FLICKR8K_NAME in log


def test_training_from_pretrained_towers_with_zero_shot_dataset(tmp_path, train):
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

    train(["--vision_model_name_or_path", str(vision), "--text_model_name_or_path", str(text),
           "--projection_dim", "16", "--text_pooling", "cls", *data_args, "--output_dir", str(out),
           "--max_train_steps", "2", "--zero_shot_dataset", str(tmp_path / "zero_shot"),
           "--zero_shot_template", "a photo of {}.", "--with_tracking", "--checkpointing_steps", "1"])  # fmt: skip

    results = assert_hub_ready_output(out)
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0 and results["zero_shot_chance"] == 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["projection_dim"] == 16 and config["text_pooling"] == "cls"
    assert any((out / "runs").rglob("events.out.tfevents*")), "tensorboard logs from --with_tracking"
    assert_push_selection_is_self_contained(out, tmp_path / "as_pushed")


def assert_push_selection_is_self_contained(out: Path, pushed: Path) -> None:
    """What `--push_to_hub` uploads (the folder minus `HUB_IGNORE_PATTERNS`, selected by huggingface_hub's own
    filter) is a complete model repository: copied alone, it loads through the zero-shot pipeline."""
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    selected = sorted(filter_repo_objects(files, ignore_patterns=HUB_IGNORE_PATTERNS))
    assert not any(f.startswith(("checkpoints/", "runs/")) for f in selected)
    assert {"README.md", "config.json", "model.safetensors", "modeling_ndclip.py", "configuration_ndclip.py",
            "processing_ndclip.py", "processor_config.json", "tokenizer.json", "eval_results.json"} <= set(selected)
    for name in selected:
        (pushed / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, pushed / name)
    classify = pipeline("zero-shot-image-classification", model=str(pushed), trust_remote_code=True)
    scores = classify(Image.new("RGB", (40, 30), "red"), candidate_labels=["dog", "cat"])
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-5


def test_bf16_mixed_precision_and_gradient_checkpointing(tmp_path, tiny_model, train, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    data_args = write_format("kaggle", tmp_path / "data")
    out = tmp_path / "out"
    train(["--model_name_or_path", str(tiny_model), *data_args, "--output_dir", str(out), "--max_train_steps", "2",
           "--gradient_checkpointing"])  # fmt: skip
    assert AcceleratorState().mixed_precision == "bf16"
    assert_hub_ready_output(out)
    assert torch.isfinite(torch.tensor(losses(out))).all()
    weights = load_file(out / "model.safetensors")
    assert weights["logit_scale"].dtype == torch.float32, "autocast computes in bf16, the weights stay fp32"


def test_default_dataloader_workers_leave_a_core_to_each_training_process(monkeypatch):
    """On a 16-core machine: one worker per core beyond the training processes' own, at most 8 per process."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for processes, workers in ((1, 8), (2, 7), (4, 3), (16, 0)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert default_dataloader_workers() == workers, processes


# ----- frozen towers train from cached features -------------------------------------------------------------------


@pytest.mark.parametrize("frozen", ["both", "vision"])
def test_frozen_towers_train_from_cached_features_like_without(frozen, tmp_path, tiny_model, train):
    flags = ["--freeze_vision_model", "--freeze_text_model"] if frozen == "both" else ["--freeze_vision_model"]
    data_args = write_format("kaggle", tmp_path / "data")
    common = ["--model_name_or_path", str(tiny_model), *data_args, *flags, "--max_train_steps", "6",
              "--learning_rate", "1e-3"]  # fmt: skip
    log = train([*common, "--output_dir", str(tmp_path / "cached")])
    assert "cached frozen tower features" in log
    train([*common, "--output_dir", str(tmp_path / "uncached"), "--disable_feature_cache"])

    run_losses = {run: losses(tmp_path / run) for run in ("cached", "uncached")}
    assert len(run_losses["cached"]) == 6 and run_losses["cached"] == pytest.approx(run_losses["uncached"], rel=1e-4)
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


# ----- bad data, wrong arguments and failures ---------------------------------------------------------------------


def test_push_to_hub_needs_a_repository_id():
    with pytest.raises(SystemExit, match="--hub_model_id"):
        run_clip.parse_args(["--output_dir", "out", "--push_to_hub"])


def test_malformed_captions_file_names_file_and_line(tmp_path, tiny_model, train):
    write_kaggle_flickr8k(tmp_path / "data", 8)
    with open(tmp_path / "data" / "captions.txt", "a") as f:
        f.write("1000_abc.jpg,a dog , running\n")  # an unquoted comma: three fields
    with pytest.raises(ValueError, match=r"captions\.txt, line 42: expected 2 fields"):
        train(["--model_name_or_path", str(tiny_model), "--data_dir", str(tmp_path / "data"),
               "--output_dir", str(tmp_path / "out")])  # fmt: skip


def test_nothing_usable_is_a_clear_error(tmp_path, tiny_model, train):
    root = tmp_path / "data"
    write_messy_images(root / "Images")
    (root / "captions.txt").write_text("image,caption\nnotes.jpg,a note\nmissing.jpg,a ghost\n")
    with pytest.raises(ValueError, match=r"No usable samples remain.*not_an_image.*missing_file"):
        train(["--model_name_or_path", str(tiny_model), "--data_dir", str(root), "--output_dir", str(tmp_path / "out")])


def run_script(argv: list[str], monkeypatch) -> SystemExit:
    """Run run_clip.py as `python run_clip.py argv` would, in this process; return how it exited."""
    monkeypatch.setattr(sys, "argv", [RUN_CLIP, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(RUN_CLIP, run_name="__main__")
    return exit_info.value


def test_offline_without_local_data_fails_fast_with_one_message(tmp_path, monkeypatch):
    """One line on stderr instead of a traceback: a SystemExit with a message (python prints it, exit status 1)."""
    message = str(run_script(["--output_dir", str(tmp_path / "out")], monkeypatch).code)
    assert "jxie/flickr8k" in message and "--preset demo" in message and "--data_dir" in message


def test_offline_model_download_fails_fast_with_one_message(tmp_path, monkeypatch):
    data_args = write_format("kaggle", tmp_path / "data")
    message = str(run_script([*data_args, "--output_dir", str(tmp_path / "out")], monkeypatch).code)
    assert "google/vit-base-patch16-224" in message and "--preset demo" in message
