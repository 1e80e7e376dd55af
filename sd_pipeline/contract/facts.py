"""Plain facts about pipeline work, and how they travel from a worker or replica to the metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol


class GenerationObserver(Protocol):
    """Receives plain facts about pipeline work (implemented by the metrics module)."""

    def pipeline_call(self, *, seconds: float, images: int) -> None: ...

    def denoising_step(self, *, seconds: float) -> None: ...

    def first_step_wait(self, *, seconds: float) -> None: ...

    def out_of_memory(self) -> None: ...

    def lora_load(self, *, seconds: float, size: int) -> None: ...

    def lora_cache_hit(self) -> None: ...

    def lora_cache(self, *, size: int, adapters: int) -> None: ...


class WorkerObserver(GenerationObserver, Protocol):
    """Generation facts plus the accelerator's memory (implemented by the metrics module)."""

    def gpu_memory(self, *, allocated: int, reserved: int) -> None: ...


Fact = tuple[str, dict[str, Any]]  # an observer method's name and its keyword arguments
FACT_NAMES = frozenset(
    {
        "pipeline_call",
        "denoising_step",
        "first_step_wait",
        "out_of_memory",
        "gpu_memory",
        "lora_load",
        "lora_cache_hit",
        "lora_cache",
    }
)


class FactRelay:
    """A ``GenerationObserver`` that hands each fact as data to ``send``: how the worker process
    (down its pipe) and a Ray replica (on its request streams) carry facts to the app."""

    def __init__(self, send: Callable[[Fact], None]) -> None:
        self.send = send

    def pipeline_call(self, *, seconds: float, images: int) -> None:
        self.send(("pipeline_call", {"seconds": seconds, "images": images}))

    def denoising_step(self, *, seconds: float) -> None:
        self.send(("denoising_step", {"seconds": seconds}))

    def first_step_wait(self, *, seconds: float) -> None:
        self.send(("first_step_wait", {"seconds": seconds}))

    def out_of_memory(self) -> None:
        self.send(("out_of_memory", {}))

    def gpu_memory(self, *, allocated: int, reserved: int) -> None:
        self.send(("gpu_memory", {"allocated": allocated, "reserved": reserved}))

    def lora_load(self, *, seconds: float, size: int) -> None:
        self.send(("lora_load", {"seconds": seconds, "size": size}))

    def lora_cache_hit(self) -> None:
        self.send(("lora_cache_hit", {}))

    def lora_cache(self, *, size: int, adapters: int) -> None:
        self.send(("lora_cache", {"size": size, "adapters": adapters}))


def replay(fact: Fact, observer: Any) -> None:
    """In the app: give a relayed fact to the real observer (the metrics); unknown names are ignored."""
    name, fields = fact
    if name in FACT_NAMES and hasattr(observer, name):
        getattr(observer, name)(**fields)


class FactCollector(FactRelay):
    """Keeps an engine's facts until the next message up carries them (``take``)."""

    def __init__(self) -> None:
        super().__init__(self._keep)
        self._facts: list[Fact] = []
        self._lock = threading.Lock()

    def take(self) -> list[Fact]:
        with self._lock:
            facts, self._facts = self._facts, []
        return facts

    def _keep(self, fact: Fact) -> None:
        with self._lock:
            self._facts.append(fact)
