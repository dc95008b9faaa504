"""The `ndclip` command itself: the installed console script runs a tool in a fresh process, `python -m ndclip` is
the same command, and a bad input is one line naming the subcommand. What each tool does is tested in-process in
test_predict.py, test_search.py and test_model_card.py."""

import json
import os
import runpy
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import random_images

from ndclip.cli import main


def test_installed_console_script_runs_predict(saved_model_dir, tmp_path):
    script = Path(sysconfig.get_path("scripts")) / "ndclip"
    assert script.is_file(), f"no {script}: install the package with `pip install -e .`"
    (tmp_path / "photos").mkdir()
    for i, image in enumerate(random_images(2, seed=7)):
        image.save(tmp_path / "photos" / f"photo_{i}.png")
    command = [str(script), "predict", "--model", str(saved_model_dir), "--images", "photos", "--labels", "dog,cat",
               "--template", "{}", "--output_dir", "out"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "photo_1.png" in done.stdout and "custom code" not in done.stdout + done.stderr
    )  # no trust_remote_code prompt
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(report["predictions"]) == 2 and report["labels"] == ["dog", "cat"] and report["template"] == "{}"


def test_python_m_ndclip_is_the_same_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [sys.executable, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("ndclip", run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: ndclip [-h] <command> ...")
    assert all(f"\n    {command} " in help_text for command in ("predict", "search", "card"))


def test_bad_input_is_one_line_naming_the_subcommand(saved_model_dir, tmp_path, capsys):
    argv = ["--model", str(saved_model_dir), "--images", str(tmp_path), "--labels", "dog,cat,dog"]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "ndclip predict: error: the label list has duplicates: 'dog'\n"
