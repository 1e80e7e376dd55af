"""Start-up waits on Ray are bounded: a deployment no node can place ends with a clear error, not a hang."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from sd_pipeline.backends.ray.backend import RayBackend
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.plans import RayPlan, ReplicaPlan
from sd_pipeline.contract.request import RequestLimits
from sd_pipeline.contract.settings import PipelineSettings
from tests.needs import needed_module

needed_module("ray.serve")


def test_a_replica_that_cannot_be_placed_stops_start_up_within_the_timeout(tiny_model_dir: Path) -> None:
    settings = PipelineSettings(model=str(tiny_model_dir), device="cpu", cpu_threads=1, warmup=False)
    needs_a_gpu = ReplicaPlan(replicas=1, max_batch_images=1, gpus_per_replica=1)  # this machine has none
    backend = RayBackend(
        settings, RayPlan(address="local", deployment=needs_a_gpu, start_timeout=15), limits=RequestLimits()
    )
    earlier = {child.pid for child in psutil.Process().children(recursive=True)}  # not Ray's
    children: list[psutil.Process] = []
    try:
        with pytest.raises(ModelLoadError, match=r"was not running within 15s \(PIPELINE_START_TIMEOUT\)"):
            backend.start()
        children = [child for child in psutil.Process().children(recursive=True) if child.pid not in earlier]
    finally:
        backend.close()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"Ray processes outlived the backend: {alive}"
