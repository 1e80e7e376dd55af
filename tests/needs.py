"""Test dependencies that a developer's machine may lack: skipped there, required in CI.

In CI (``CI`` set, as ``.ci/run`` runs) a missing or broken install must fail the run, not pass
as a row of skipped tests; ``scripts/install-test-deps.sh`` installs all of them.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def needed_module(name: str) -> ModuleType:
    """``name`` imported; the test is skipped without it, except in CI, where the import error is raised."""
    if in_ci():
        return importlib.import_module(name)
    return pytest.importorskip(name)


def needed_program(name: str) -> str:
    """The path of program ``name``; skipped without it, except in CI, where the test fails."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/install-test-deps.sh installs it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path
