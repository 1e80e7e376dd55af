"""What a request makes: its images, their timings, its live previews, and an engine's outcome."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from sd_pipeline.contract.request import GenerationRequest

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Preview:
    """What a request's image looks like so far: a small encoded picture (PNG or JPEG, never the
    latents), made where the latents are and carried up beside the step reports."""

    step: int
    total: int
    image: bytes
    size: tuple[int, int]  # the final image's width and height

    def picture(self) -> Image.Image:
        """The preview at the final image's size (the page shows it in its place)."""
        with Image.open(io.BytesIO(self.image)) as encoded:
            return encoded.convert("RGB").resize(self.size, Image.Resampling.BILINEAR)


PreviewCallback = Callable[[Preview], None]


@dataclass(frozen=True)
class Timings:
    """How long the engine worked on the request that made an image, and its largest batch."""

    generation_seconds: float
    batch_images: int


@dataclass(frozen=True)
class GenerationResult:
    """One image with everything needed to reproduce it."""

    image: Image.Image
    request: GenerationRequest
    seed: int
    index: int
    model: str
    timings: Timings
    nsfw: bool = False
    model_version: str = ""  # the published version that drew it ("" for a Hub id or a plain folder)
    model_hash: str = ""
    lora_hashes: str = ""  # the LoRA adapters that drew it, as AUTOMATIC1111 writes them: "NAME: HASH, ..."


@dataclass
class JobOutcome:
    """What happened to one job: its images, or the error that ended it."""

    results: list[GenerationResult] = field(default_factory=list)
    error: Exception | None = None


# Step reports on a Ray replica's request stream: the first and the last of a request, and in
# between at most one per interval (the page refreshes progress every 0.25 s). At a GPU's 20-40 ms
# steps this sends a few per request instead of one per step: each streamed item costs the replica
# and the front end CPU (measured: bench.scaleout --simulate). The local worker's pipe carries every
# step: a pipe message is cheap, and its supervisor hears the worker progress.
STEP_REPORT_INTERVAL = 0.2


def coalesced_steps(
    report: StepCallback, *, interval: float = STEP_REPORT_INTERVAL, clock: Callable[[], float] = time.monotonic
) -> StepCallback:
    """``report`` called for the first and the last step, and otherwise at most once per ``interval``."""
    last = -float("inf")

    def on_step(step: int, total: int) -> None:
        nonlocal last
        now = clock()
        if step <= 1 or step >= total or now - last >= interval:
            last = now
            report(step, total)

    return on_step
