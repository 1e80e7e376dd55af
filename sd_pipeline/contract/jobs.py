"""A request on its way through a backend (``GenerationJob``), and what comes back."""

from __future__ import annotations

import io
import threading
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


@dataclass
class GenerationJob:
    """A request on its way through a backend: progress out, cancellation in."""

    request: GenerationRequest
    on_step: StepCallback | None = None
    on_preview: PreviewCallback | None = None  # set only when the caller shows previews
    owner: str = ""  # whose request it is, for fair admission; "" when nobody is named
    address: str = ""  # an anonymous caller's client address (its limit and turns are shared); "" when logged in
    steps_done: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _on_cancel: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def steps_left(self) -> int:
        return max(0, self.request.steps - self.steps_done)

    def report_step(self, step: int, total: int) -> None:
        """Record that ``step`` of ``total`` is done and tell ``on_step``."""
        self.steps_done = step
        if self.on_step is not None:
            self.on_step(step, total)

    @property
    def wants_previews(self) -> bool:
        return self.on_preview is not None

    def report_preview(self, preview: Preview) -> None:
        """Hand a preview to ``on_preview`` (ignored once cancelled: Stop ends the pictures too)."""
        if self.on_preview is not None and not self.cancelled:
            self.on_preview(preview)

    def cancel(self) -> None:
        """Ask the backend to stop this job: at once while it waits, within one denoising step once it runs."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
            callbacks, self._on_cancel = self._on_cancel, []
        for callback in callbacks:
            callback()

    def when_cancelled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the job is cancelled (at once if it already is)."""
        with self._lock:
            if not self._cancelled.is_set():
                self._on_cancel.append(callback)
                return
        callback()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


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
