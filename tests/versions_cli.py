"""Running ``python -m sd_pipeline.versions`` as the operator or the compose stack does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from harness.app_server import ROOT

MODULE = ("-m", "sd_pipeline.versions")


def versions_cli(endpoint_url: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The versions command against the S3 endpoint at ``endpoint_url``."""
    command = [sys.executable, *MODULE, "--endpoint-url", endpoint_url, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def compose_step(service: str, swaps: Mapping[str, str]) -> list[str]:
    """The command the stack's one-shot ``service`` runs (it must be the versions command), each
    argument in ``swaps`` replaced (the stack's endpoint, paths and bucket by the test's)."""
    step = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"][service]
    assert step["entrypoint"] == ["python", *MODULE]
    return [sys.executable, *MODULE, *(swaps.get(arg, arg) for arg in step["command"])]


def run_compose_step(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
