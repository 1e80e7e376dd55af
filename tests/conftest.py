"""Shared fixtures: a tiny random pipeline saved to disk and loaded through the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_pipeline.generator import Generator
from sd_pipeline.loading import LoadedPipeline, load_pipeline
from sd_pipeline.settings import PipelineSettings
from sd_pipeline.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline written with save_pretrained, shared by the whole run."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path) -> LoadedPipeline:
    return load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture()
def generator(tiny_loaded: LoadedPipeline) -> Generator:
    return Generator(tiny_loaded)
