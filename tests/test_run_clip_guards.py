"""run_clip.py's guards: a non-finite loss or model stops every process with a message naming the step, and nothing
of it is saved or pushed; numeric flags are checked up front, naming the flag; the Hub folder is always saved from the
state dict that accelerate gathers. In-process runs (`run_clip.main`) on the tiny Kaggle-layout data of
test_run_clip.py; one real two-process `accelerate launch`, where stopping every process together is the point."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_run_clip import REPO_ROOT, SMALL_RUN, history, launch_command, save_tiny_ndclip, write_format
from transformers import AutoTokenizer

import run_clip
from modeling_ndclip import NdClipModel
from ndclip.layouts import write_jsonl_caption_lists

IN_PROCESS_RUN = [*SMALL_RUN, "--dataloader_num_workers", "0"]
WORD_EMBEDDINGS = "text_model.embeddings.word_embeddings.weight"
FINAL_FILES = ("model.safetensors", "config.json", "eval_results.json", "README.md")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_ndclip(tmp_path_factory.mktemp("guards_model"))


@pytest.fixture(scope="module")
def kaggle_data(tmp_path_factory) -> list[str]:
    return write_format("kaggle", tmp_path_factory.mktemp("guards_data"))


def with_nan_word_embedding(model_dir: Path, token: str, folder: Path) -> Path:
    """A copy of the saved tiny NdCLIP whose embedding row of `token` is NaN: only captions with that token reach it."""
    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    token_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)
    weights[WORD_EMBEDDINGS][token_id] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def all_finite(weights: dict) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in weights.values())


# ----- a non-finite loss or model stops the run -------------------------------------------------------------------


def test_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing_final(tiny_model, kaggle_data, tmp_path):
    """The issue's reproduction: the loss is NaN from step 2. `--push_to_hub` in offline mode: had the run reached the
    push, huggingface_hub's offline error would have ended it, not this message."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"training loss is nan at step 2 .*--learning_rate") as stop:
        run_clip.main(["--model_name_or_path", str(tiny_model), *kaggle_data, "--output_dir", str(out),
                       "--max_train_steps", "3", "--learning_rate", "1e8", "--lr_scheduler_type", "constant",
                       "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "nobody/diverged",
                       *IN_PROCESS_RUN])  # fmt: skip
    assert "every sample" in str(stop.value), "all embeddings are NaN: the weights diverged, not one sample"
    assert not [name for name in FINAL_FILES if (out / name).exists()]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"], "the good checkpoint is kept"
    assert all_finite(load_file(out / "checkpoints" / "step_1" / "model.safetensors"))
    records = history(out)
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert records[-1]["step"] == 2 and "nan" in records[-1]["stopped"]


def test_non_finite_weights_are_never_checkpointed_or_saved(tiny_model, kaggle_data, tmp_path):
    """NaN in a weight that no caption reaches (the [MASK] embedding): the loss stays finite, the model does not."""
    model = with_nan_word_embedding(tiny_model, "[MASK]", tmp_path / "model")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"after step 1 .*{WORD_EMBEDDINGS}"):
        run_clip.main(["--model_name_or_path", str(model), *kaggle_data, "--output_dir", str(out),
                       "--max_train_steps", "2", "--checkpointing_steps", "1", *IN_PROCESS_RUN])  # fmt: skip
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not [name for name in FINAL_FILES if (out / name).exists()]
    assert all(r["loss"] == r["loss"] for r in history(out) if "loss" in r), "the loss itself was finite"


def test_one_process_with_a_non_finite_loss_stops_both(tiny_model, tmp_path):
    """Two processes; one image's captions all hold a word the tokenizer does not know, and the model's [UNK]
    embedding is NaN. The global batch (8 images, 4 per process) holds that image once, so the NaN starts on one
    process; both must stop at step 1 with the message, and neither may wait for the other in a collective."""
    model = with_nan_word_embedding(tiny_model, "[UNK]", tmp_path / "model")
    assert AutoTokenizer.from_pretrained(model).tokenize("zebra") == ["[UNK]"]
    paths = write_jsonl_caption_lists(tmp_path / "data", {"train": range(8), "validation": range(8, 10)})
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    rows[5]["sentences"] = [f"photo 5 a zebra {n}" for n in range(5)]
    Path(paths["train"]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    cmd, env = launch_command(["--model_name_or_path", str(model), "--train_file", paths["train"],
                               "--validation_file", paths["validation"], "--output_dir", str(out),
                               "--max_train_steps", "2", *SMALL_RUN], num_processes=2)  # fmt: skip
    process = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("a process hung after the other one stopped")
    assert process.returncode != 0
    stops = [line for line in stderr.splitlines() if "training loss is nan at step 1 " in line]
    assert len(stops) == 2, f"each process stops with the message:\n{stderr[-4000:]}"
    assert "1 of 8 samples" in stops[0] and "image_id 5" in stops[0]
    assert not [name for name in FINAL_FILES if (out / name).exists()]


# ----- numeric flags ------------------------------------------------------------------------------------------------


BAD_FLAGS = [
    ("--per_device_train_batch_size", "0"), ("--per_device_eval_batch_size", "0"), ("--learning_rate", "0"),
    ("--learning_rate", "-0.0001"), ("--learning_rate", "nan"), ("--learning_rate", "inf"), ("--weight_decay", "-0.1"),
    ("--weight_decay", "nan"), ("--num_train_epochs", "0"), ("--max_train_steps", "-1"),
    ("--gradient_accumulation_steps", "0"), ("--max_grad_norm", "-1"), ("--max_grad_norm", "inf"),
    ("--num_warmup_steps", "-1"), ("--eval_steps", "0"), ("--logging_steps", "0"), ("--checkpoints_total_limit", "-1"),
    ("--checkpoints_total_limit", "0"), ("--max_seq_length", "0"), ("--validation_fraction", "0"),
    ("--validation_fraction", "1"), ("--validation_fraction", "nan"), ("--max_train_samples", "0"),
    ("--max_eval_samples", "0"), ("--dataloader_num_workers", "-1"), ("--preprocessing_num_workers", "0"),
    ("--projection_dim", "0"), ("--seed", "-1"), ("--seed", str(2**32)),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_numeric_flags_out_of_range_are_refused_naming_the_flag(flag, value):
    with pytest.raises(SystemExit, match=rf"^{flag} must be .*got {value}"):
        run_clip.parse_args(["--output_dir", "out", flag, value])


def test_numeric_flags_at_their_limits_are_accepted():
    limits = ["--max_train_steps", "0", "--num_warmup_steps", "0", "--dataloader_num_workers", "0",
              "--max_grad_norm", "0", "--weight_decay", "0", "--validation_fraction", "0.5", "--seed", "0"]  # fmt: skip
    args = run_clip.parse_args(["--output_dir", "out", *limits])
    assert args.max_train_steps == 0 and args.max_grad_norm == 0.0


def test_max_seq_length_beyond_the_text_tower_is_refused(tiny_model, kaggle_data, tmp_path):
    """The tiny text tower has 64 positions: a longer caption would crash mid-epoch in its position embeddings."""
    with pytest.raises(SystemExit, match=r"--max_seq_length 65 .* 64 positions"):
        run_clip.main(["--model_name_or_path", str(tiny_model), *kaggle_data, "--output_dir", str(tmp_path / "out"),
                       "--max_seq_length", "65", *IN_PROCESS_RUN])  # fmt: skip


# ----- the Hub folder at a checkpoint -------------------------------------------------------------------------------


def test_checkpoint_hub_folder_is_saved_from_the_gathered_state_dict(tiny_model, kaggle_data, tmp_path, monkeypatch):
    """`--push_checkpoints` writes the Hub folder from `accelerator.get_state_dict` of the prepared model -- the
    collective that gathers FSDP / ZeRO-3 shards, which accelerate runs only on GPUs -- then pushes. Offline, the push
    fails after the folder is written, which then holds the checkpoint's weights. Without sharding the unwrapped model
    saves the same weights, so the state dict handed to `save_pretrained` is recorded (the real save runs)."""
    handed = []
    real_save_pretrained = NdClipModel.save_pretrained

    def recording_save_pretrained(self, *args, **kwargs):
        handed.append(kwargs.get("state_dict"))
        return real_save_pretrained(self, *args, **kwargs)

    monkeypatch.setattr(NdClipModel, "save_pretrained", recording_save_pretrained)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="offline"):
        run_clip.main(["--model_name_or_path", str(tiny_model), *kaggle_data, "--output_dir", str(out),
                       "--max_train_steps", "2", "--checkpointing_steps", "1", "--learning_rate", "1e-3",
                       "--push_to_hub", "--hub_model_id", "nobody/checkpoints", "--push_checkpoints",
                       *IN_PROCESS_RUN])  # fmt: skip
    checkpoint = load_file(out / "checkpoints" / "step_1" / "model.safetensors")
    assert len(handed) == 1 and handed[0] is not None, "the Hub folder's weights are the gathered state dict"
    saved = NdClipModel.from_pretrained(out).state_dict()  # the checkpoint has the model's names, the Hub folder not
    assert saved.keys() == checkpoint.keys()
    for name, tensor in checkpoint.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(handed[0][name], tensor, rtol=0, atol=0, msg=name)
    initial = NdClipModel.from_pretrained(tiny_model).state_dict()
    assert not torch.equal(saved["logit_scale"], initial["logit_scale"]), "the trained weights, not the initial ones"
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
