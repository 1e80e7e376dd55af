"""The linters the project is held to run as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_lint_and_format() -> None:
    for command in (["check", "."], ["format", "--check", "."]):
        finished = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stdout + finished.stderr


def test_mypy_strict() -> None:
    packages = ["app.py", "sd_pipeline", "storage", "monitoring", "webapp"]
    existing = [name for name in packages if (ROOT / name).exists()]
    finished = subprocess.run(
        [sys.executable, "-m", "mypy", *existing], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
