"""CUDA-only failure paths, reproduced on the CPU: OOM recovery, error classes, compile, warm-up, memory facts."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from harness.images import assert_same_image
from sd_pipeline.backends import engine_loop
from sd_pipeline.backends.engine_loop import EngineLoop
from sd_pipeline.contract.errors import ModelLoadError, OutOfMemoryError
from sd_pipeline.contract.jobs import JobOutcome
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model import loading
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.failures import DeviceFailedError, is_out_of_memory, is_sticky_device_error
from sd_pipeline.model.loading import LoadedPipeline, apply_speedups, load_pipeline, resolve_device
from sd_pipeline.model.schedulers import SCHEDULER_NAMES

SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5}


def test_out_of_memory_retries_run_after_the_failed_call_is_freed(
    engine: StepEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = engine.loaded.pipeline.unet
    real_forward = unet.forward
    failed_inputs: list[weakref.ref[torch.Tensor]] = []
    alive_at_retry: list[int] = []

    def forward_with_memory_limit(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] > 2:  # more than one image (guidance doubles the batch) does not fit
            failed_inputs.append(weakref.ref(sample))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        alive_at_retry.append(sum(ref() is not None for ref in failed_inputs))
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_with_memory_limit)
    results = engine.generate([check_inputs({"prompt": f"p{i}", "seed": i, **SMALL}) for i in range(2)])
    assert [rs[0].timings.batch_images for rs in results] == [1, 1]
    assert failed_inputs and alive_at_retry and max(alive_at_retry) == 0, "the failed call's tensors were still alive"


def test_a_failed_call_keeps_no_traceback(engine: StepEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in a custom scheduler")

    monkeypatch.setattr(engine.loaded.pipeline.unet, "forward", broken)
    (outcome,) = engine.run([Request(check_inputs({"prompt": "x", **SMALL}))])
    assert isinstance(outcome.error, ValueError) and outcome.error.__traceback__ is None


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    ],
)
def test_every_flavour_of_out_of_memory_is_recognised(error: BaseException) -> None:
    assert is_out_of_memory(error) and not is_sticky_device_error(error)


def test_out_of_memory_while_compiling_is_recognised_through_the_wrapper() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory while autotuning")
        except torch.OutOfMemoryError as cause:
            raise RuntimeError("backend='inductor' raised: compilation failed") from cause
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
    ],
)
def test_sticky_cuda_errors_end_the_worker_instead_of_failing_one_request(
    engine: StepEngine, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    assert is_sticky_device_error(RuntimeError(message)) and not is_out_of_memory(RuntimeError(message))

    def poisoned(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    monkeypatch.setattr(engine.loaded.pipeline.unet, "forward", poisoned)
    with pytest.raises(DeviceFailedError, match="needs a new process"):
        engine.run([Request(check_inputs({"prompt": "x", **SMALL}))])


def test_a_plain_error_is_neither() -> None:
    error = RuntimeError("Expected all tensors to be on the same device")
    assert not is_out_of_memory(error) and not is_sticky_device_error(error)


def test_single_image_out_of_memory_names_the_size(engine: StepEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def always(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(engine.loaded.pipeline.unet, "forward", always)
    with pytest.raises(OutOfMemoryError, match="out of GPU memory generating 64x64 images"):
        engine.generate([check_inputs({"prompt": "x", **SMALL})])


@pytest.fixture()
def compiled(tiny_model_dir: Any) -> Iterator[LoadedPipeline]:
    """The tiny pipeline with its UNet compiled by dynamo (the eager backend: dynamo's guards without inductor)."""
    torch._dynamo.reset()
    settings = PipelineSettings(model=str(tiny_model_dir), device="cpu", compile_unet=True, compile_backend="eager")
    yield load_pipeline(settings)
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def unet_shapes(loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    unet = loaded.pipeline.unet
    real_forward = unet.forward

    def recording(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(sample.shape))
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", recording)
    return shapes


def test_warmup_compiles_the_served_size_with_and_without_guidance(
    compiled: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = unet_shapes(compiled, monkeypatch)
    StepEngine(compiled).warmup()
    latent = (4, 64, 64)  # 512x512, the default size, in latents
    assert sorted(set(shapes)) == [(1, *latent), (2, *latent), (4, *latent)]  # no guidance; guidance x1, x2


def test_compiled_unet_serves_more_shapes_than_the_recompile_limit(compiled: LoadedPipeline) -> None:
    compiled_engine = StepEngine(compiled)
    compiled_engine.warmup()
    compiles_after_warmup = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    variants = [
        {"width": width, "height": height, "scheduler": scheduler, "guidance_scale": guidance, "num_images": images}
        for width, height in ((64, 64), (96, 64), (64, 128), (128, 128))
        for scheduler, guidance, images in (("Euler", 7.5, 1), ("DPM++ 2M", 1.0, 2), ("DDIM", 3.0, 3))
    ]
    assert len(variants) > torch._dynamo.config.recompile_limit
    for variant in variants:
        (outcome,) = compiled_engine.run([Request(check_inputs({"prompt": "v", "steps": 2, **variant}))])
        assert outcome.error is None and len(outcome.results) == variant["num_images"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles_after_warmup  # none blocked serving


def test_compiled_and_eager_give_the_same_image(compiled: LoadedPipeline, engine: StepEngine) -> None:
    compiled_engine = StepEngine(compiled)
    compiled_engine.warmup()
    for scheduler in SCHEDULER_NAMES[:2]:
        request = check_inputs({"prompt": "same", "seed": 3, "scheduler": scheduler, **SMALL})
        assert_same_image(compiled_engine.generate([request])[0][0].image, engine.generate([request])[0][0].image)


def test_cudnn_benchmark_is_opt_in(tiny_loaded: LoadedPipeline) -> None:
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        cuda = torch.device("cuda")  # the settings are applied; nothing runs on the device here
        apply_speedups(tiny_loaded.family, PipelineSettings(), cuda)
        assert torch.backends.cudnn.benchmark is False
        apply_speedups(tiny_loaded.family, PipelineSettings(cudnn_benchmark=True), cuda)
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


class MemoryFacts:
    """The facts a worker or replica relays, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.memory: dict[str, int] = {}

    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self.seen.append("pipeline_call")

    def denoising_step(self, *, seconds: float) -> None:
        self.seen.append("denoising_step")

    def first_step_wait(self, *, seconds: float) -> None:
        self.seen.append("first_step_wait")

    def out_of_memory(self) -> None:
        self.seen.append("out_of_memory")

    def gpu_memory(self, *, allocated: int, reserved: int) -> None:
        self.seen.append("gpu_memory")
        self.memory = {"allocated": allocated, "reserved": reserved}


def test_gpu_memory_is_the_runs_peak_and_travels_before_its_result(
    tiny_loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    resets: list[bool] = []
    monkeypatch.setattr(engine_loop, "cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(True))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 123)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 456)
    facts = MemoryFacts()
    loop = EngineLoop(StepEngine(tiny_loaded, observer=facts))
    outcomes: list[JobOutcome] = []
    loop.submit(Request(check_inputs({"prompt": "m", **SMALL})), lambda outcome: facts.seen.append("done"))
    loop.submit(Request(check_inputs({"prompt": "n", **SMALL})), outcomes.append)
    loop.stop()  # the stop waits for the jobs already submitted
    loop.run()
    assert loop.failure is None and len(outcomes) == 1 and outcomes[0].error is None
    assert facts.seen.count("gpu_memory") == 1 and facts.seen[-2:] == ["done", "gpu_memory"]  # after both, once
    assert facts.memory == {"allocated": 123, "reserved": 456}
    assert resets == [True]  # after reporting: the next run's peak is its own


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without usable CUDA gives")
def test_asking_for_cuda_without_it_names_the_driver_and_gpu_needed() -> None:
    with pytest.raises(ModelLoadError, match=r"driver >= 580 and a Turing \(compute capability 7.5\) or newer GPU"):
        resolve_device("cuda")


def test_compile_without_a_c_compiler_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(loading.shutil, "which", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"SD_COMPILE=true needs a C compiler .* apt-get install gcc"):
        loading.require_compiler_toolchain()
    monkeypatch.setenv("CC", "/usr/bin/gcc")
    loading.require_compiler_toolchain()  # with a compiler and this interpreter's headers it passes
