"""The one surface every backend offers, and what it reports once started.

``app.py`` wires a backend (the supervised local worker, or Ray Serve replicas) and hands it
to admission and the web layer, which use only this protocol and never learn which it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.request import GenerationRequest, InputRules, RequestLimits, TokenBudget, check_inputs

if TYPE_CHECKING:
    from sd_pipeline.contract.lifecycle import Request
    from sd_pipeline.contract.messages import Reply

ReplyTo = Callable[["Reply"], None]


@dataclass(frozen=True)
class BackendInfo:
    """What a worker process or replica loaded, reported once it is ready."""

    model: str
    device: str
    dtype: str
    load_seconds: float
    native_size: int = 512  # the side the model was trained at: the page's and API's default size
    warmup_seconds: float | None = None  # None when warm-up was off
    version: str = ""  # the published version (models from S3), "" for a Hub id or a plain folder
    model_hash: str = ""  # short hash of the version's manifest, as PNGs carry it ("Model hash:")
    defaults: ModelDefaults = field(default_factory=ModelDefaults)  # what the model recommends
    simulated: str = ""  # the modelled accelerator (SD_SIMULATED_GPU, benchmarks only); "" for the real device
    family: str = "sd"  # the model family read from the model's folder: sd (1.x, 2.x), sdxl, sd3 or flux
    rules: InputRules = field(default_factory=InputRules)  # what the family accepts: samplers, size multiple

    @property
    def label(self) -> str:
        """The model and its version, as logs and status lines name them."""
        return f"{self.model}@{self.version}" if self.version else self.model


class RequestChecker:
    """``check_inputs`` with a deployment's limits, and the model's token budget and family rules once known."""

    def __init__(self, limits: RequestLimits, adapters: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.limits = limits
        self.adapters = adapters  # lists the LoRA adapters prompts may name (name -> family), per request naming any
        self.tokens: TokenBudget | None = None
        self.rules = InputRules()

    def serve(self, info: BackendInfo, tokens: TokenBudget) -> None:
        """Check against the model now served: its tokenizer and its family's rules."""
        self.tokens, self.rules = tokens, info.rules

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate raw fields; raises ``InvalidRequestError`` naming the field and its range."""
        return check_inputs(data, limits=self.limits, tokens=self.tokens, rules=self.rules, adapters=self.adapters)


class Backend(Protocol):
    """Runs validated requests on the model; started and closed by the app.

    Admission (``sd_pipeline.admission``) is the one place that decides what runs: it hands a
    request over with ``submit`` when ``accepting`` and it holds fewer than ``max_running``;
    nothing here blocks a thread. The backend answers with messages (``contract.messages``):
    ``Step``, ``PreviewReady``, then ``Finished``, or ``Lost`` when the worker or replica that
    held the request is gone; admission applies the retry rule to a lost request.
    """

    @property
    def model(self) -> str:
        """The model's name as records and PNGs carry it."""
        ...

    @property
    def max_running(self) -> int:
        """How many requests may run at once (more wait in admission)."""
        ...

    def start(self) -> BackendInfo:
        """Load the model and wait, bounded, until it can serve; raises ``ModelLoadError``."""
        ...

    def close(self) -> None:
        """Stop serving and release what was started."""
        ...

    def check(self, data: Mapping[str, Any]) -> GenerationRequest:
        """Validate raw fields before any GPU work; raises ``InvalidRequestError``."""
        ...

    def accepting(self) -> bool:
        """Whether a request handed over now would start (False while a worker restarts, a model
        switch holds new requests, or a lost replica is still being replaced)."""
        ...

    def when_accepting(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``accepting`` may have turned true (admission looks again)."""
        ...

    def submit(self, request: Request, reply: ReplyTo) -> None:
        """Hand ``request`` to the engine without waiting; every message about it goes to ``reply``
        (from any thread), ending with one ``Finished`` or ``Lost``."""
        ...

    def cancel(self, request: Request) -> None:
        """Tell the engine holding ``request`` to drop it (it then finishes cancelled within a step)."""
        ...

    def switch_model(self, model: str) -> BackendInfo:
        """Serve ``model`` (a pinned ``s3://`` version or a folder) instead of the current one, with
        no request failing: new requests go to it once it is loaded and warm, running ones finish
        on the old one. Raises ``ModelLoadError`` and keeps serving the old one if it cannot."""
        ...

    def notice(self) -> str | None:
        """Why a request that has not started may wait longer than usual (a model switch), or None."""
        ...

    def readiness_problem(self) -> str | None:
        """Why no request can run right now, or None."""
        ...

    def liveness_problem(self) -> str | None:
        """Why this process should be restarted (a crash loop), or None."""
        ...
