"""Where the adapters a prompt names come from: ``LORA_DIR``, then the S3 LoRA store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.models import LoraStoreSettings
from sd_pipeline.loras.folder import FetchedLora, LoraFolder
from sd_pipeline.loras.store import LoraStore


class LoraSource(Protocol):
    """Adapters by name: what there is (with each one's family) and each one's file on this host."""

    def available(self) -> dict[str, str]: ...

    def has(self, name: str) -> bool: ...

    def fetch(self, name: str) -> FetchedLora: ...


class LoraSources:
    """Several sources as one; a name in two is the first one's."""

    def __init__(self, sources: Sequence[LoraSource]) -> None:
        self.sources = list(sources)

    def available(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for source in reversed(self.sources):
            found |= source.available()
        return dict(sorted(found.items()))

    def has(self, name: str) -> bool:
        return any(source.has(name) for source in self.sources)

    def fetch(self, name: str) -> FetchedLora:
        for source in self.sources:
            if source.has(name):
                return source.fetch(name)
        raise InvalidRequestError("prompt", f"names LoRA {name!r}, which is not available")


def lora_source(lora_dir: str | None, lora_store: LoraStoreSettings | None) -> LoraSources | None:
    """The adapters prompts may name (None when neither a folder nor a store is set)."""
    sources: list[LoraSource] = []
    if lora_dir:
        sources.append(LoraFolder(lora_dir))
    if lora_store is not None:
        sources.append(LoraStore(lora_store))
    return LoraSources(sources) if sources else None


def adapter_listing(
    lora_dir: str | None, lora_store: LoraStoreSettings | None = None
) -> Callable[[], dict[str, str]] | None:
    """What ``RequestChecker`` lists for a request that names adapters (None without a source)."""
    source = lora_source(lora_dir, lora_store)
    return source.available if source is not None else None
