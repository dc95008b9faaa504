"""The code base passes ruff with the configuration in pyproject.toml (line length, import order, pyflakes)."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
