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


def test_readme_documents_every_setting() -> None:
    from webapp.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert missing == []


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")
    test_command = blocks[2].split("\n")[1]
    assert test_command == "bash scripts/install-test-deps.sh && python -m pytest"
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
