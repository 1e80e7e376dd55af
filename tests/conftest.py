"""Shared fixtures: a tiny random pipeline saved to disk and loaded through the real loader."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.servers import S3Server, running_s3_server
from sd_pipeline.backends.ray.loopback import LOOPBACK_SWITCH
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.random import write_random_lora
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import LoadedPipeline, load_pipeline
from sd_pipeline.tiny import build_tiny_pipeline

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_configure(config: pytest.Config) -> None:
    """Ray reads its loopback switch when first imported; the app sets it before it imports Ray, and so
    does the suite, whose modules import Ray in this process (the Serve builder, the Ray backend)."""
    os.environ.setdefault(LOOPBACK_SWITCH, "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline written with save_pretrained, shared by the whole run."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path) -> LoadedPipeline:
    return load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline (two text encoders, size ids) written with save_pretrained."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), family="sdxl")


@pytest.fixture(scope="session")
def sdxl_loaded(tiny_sdxl_dir: Path) -> LoadedPipeline:
    return load_pipeline(PipelineSettings(model=str(tiny_sdxl_dir), device="cpu"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline (MMDiT transformer, flow matching, no T5) written with save_pretrained."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd3"), family="sd3")


@pytest.fixture(scope="session")
def sd3_loaded(tiny_sd3_dir: Path) -> LoadedPipeline:
    return load_pipeline(PipelineSettings(model=str(tiny_sd3_dir), device="cpu"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev pipeline (packed latents, guidance embedding, T5) written with save_pretrained."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), family="flux")


@pytest.fixture(scope="session")
def flux_loaded(tiny_flux_dir: Path) -> LoadedPipeline:
    return load_pipeline(PipelineSettings(model=str(tiny_flux_dir), device="cpu"))


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two adapters for the tiny SD model: ``style`` (kohya keys, UNet incl. a conv + text encoder,
    alpha != rank) and ``subject`` (diffusers/PEFT keys, UNet only)."""
    folder = tmp_path_factory.mktemp("loras")
    write_random_lora(tiny_model_dir, folder / "style.safetensors", seed=1, extra_targets=("proj_in",))
    write_random_lora(tiny_model_dir, folder / "subject.safetensors", seed=2, file_format="peft", text_encoder=False)
    return folder


@pytest.fixture(scope="session")
def lora_oracle(tiny_model_dir: Path, tiny_lora_dir: Path) -> LoadedPipeline:
    """The tiny SD pipeline with both adapters loaded diffusers' own way (``load_lora_weights``)."""
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    for name in ("style", "subject"):
        loaded.pipeline.load_lora_weights(str(tiny_lora_dir / f"{name}.safetensors"), adapter_name=name)
    return loaded


@pytest.fixture()
def engine(tiny_loaded: LoadedPipeline) -> StepEngine:
    return StepEngine(tiny_loaded)


@pytest.fixture(scope="session", autouse=True)
def fake_aws_credentials() -> Iterator[None]:
    """Credentials for the loopback S3 server; never real ones."""
    saved = {name: os.environ.get(name) for name in AWS_TEST_ENV}
    os.environ.update(AWS_TEST_ENV)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3 server for the session; tests use their own buckets."""
    with running_s3_server() as server:
        yield server


@pytest.fixture()
def bucket(s3_server: S3Server) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name
