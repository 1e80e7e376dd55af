"""LoRA adapters published to S3: each adapter ``NAME`` a versioned model of its own at ``s3://BUCKET/PREFIX/NAME``.

An adapter's versions are laid out as a model's (``sd_pipeline.versions``: ``current``,
``versions/V/manifest.json``, written last), a version holding the one file ``lora.safetensors``;
``python -m sd_pipeline.versions publish-lora`` publishes one, ``promote`` switches or rolls back.
The version served is the adapter's ``current``, read at most every ``refresh_seconds`` (a name
not yet listed is looked up at once: a just-published adapter needs no wait). A version is
downloaded into this host's model cache and verified against its manifest before it is loaded;
while S3 cannot be reached, the version this host fetched last is served from the cache. The
cache keeps an adapter's version in service and the two that arrived before it (rollbacks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.models import LoraStoreSettings
from sd_pipeline.loras.folder import FetchedLora, short_hash
from sd_pipeline.versions.cache import CachedVersion, ModelCache, VersionRefusedError
from sd_pipeline.versions.location import LocationError, ModelLocation, check_version_name
from sd_pipeline.versions.registry import (
    ModelRegistry,
    RegistryError,
    RegistryUnavailableError,
    make_client,
    names_under,
)

logger = logging.getLogger(__name__)
ADAPTER_FILE = "lora.safetensors"  # the one file of an adapter's version
UNLISTED_RELIST_SECONDS = 1.0  # a name missing from a listing at least this old is looked up again


@dataclass(frozen=True)
class PublishedLora:
    """An adapter's version in service, as the store lists it."""

    version: str
    family: str


def adapter_location(root: ModelLocation, name: str) -> ModelLocation:
    """Where adapter ``name``'s versions are (its name is a version-like name: no '/' or '..')."""
    try:
        check_version_name(name)
    except LocationError:
        raise LocationError(
            f"name: {name!r} is not an adapter name for the store (1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)"
        ) from None
    return ModelLocation(root.bucket, f"{root.prefix}/{name}")


class LoraStore:
    """The adapters under one ``s3://BUCKET/PREFIX``, listed with a bounded age and fetched verified."""

    def __init__(self, settings: LoraStoreSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = ModelLocation.parse(settings.location)
        self.client = make_client(settings.store)
        self.cache = ModelCache(Path(settings.store.cache_dir))
        self.refresh_seconds = settings.refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._listing: dict[str, PublishedLora] = {}
        self._listed_at: float | None = None
        self._hashes: dict[Path, str] = {}  # a verified version's file never changes
        self._remembered: dict[str, str] = {}  # name -> the version last recorded as fetched on this host
        self._families: dict[tuple[str, str], str] = {}  # (name, version) -> family: a manifest never changes

    def available(self) -> dict[str, str]:
        """Name -> family of every adapter with a version in service."""
        return {name: published.family for name, published in self._current_listing().items()}

    def listing(self) -> dict[str, PublishedLora]:
        """Every adapter with a version in service: its version and family."""
        return dict(self._current_listing())

    def has(self, name: str) -> bool:
        return self._published(name) is not None

    def fetch(self, name: str) -> FetchedLora:
        """Adapter ``name``'s version in service, verified in this host's cache (downloaded when
        missing); raises ``InvalidRequestError`` naming the prompt."""
        published = self._published(name)
        location = adapter_location(self.root, name)
        registry = ModelRegistry(self.client, location)
        try:
            if published is None:
                raise InvalidRequestError("prompt", f"names LoRA {name!r}, which is not available")
            cached = self.cache.fetch(registry, published.version)
        except VersionRefusedError as error:
            logger.error("LoRA %s: %s", name, error)
            raise InvalidRequestError(
                "prompt", f"LoRA {name!r} cannot be used: its published file does not match its manifest"
            ) from None
        except RegistryUnavailableError as error:
            cached = self._last_fetched(location, name, error)
        except RegistryError as error:
            logger.error("LoRA %s: %s", name, error)
            raise InvalidRequestError("prompt", f"LoRA {name!r} cannot be fetched from the LoRA store") from None
        if self._remembered.get(name) != cached.version:  # a new version here: remembered, older ones pruned
            self.cache.remember_served(location, cached.version)
            self.cache.prune(location, serving=cached.version)
            self._remembered[name] = cached.version
        path = cached.path / ADAPTER_FILE
        if path not in self._hashes:
            self._hashes[path] = short_hash(path)
        return FetchedLora(path, self._hashes[path])

    def _last_fetched(self, location: ModelLocation, name: str, error: Exception) -> CachedVersion:
        fallback = self.cache.last_served(location)
        if fallback is None:
            logger.error("LoRA %s: %s", name, error)
            raise InvalidRequestError(
                "prompt", f"LoRA {name!r} cannot be fetched now: the LoRA store cannot be reached"
            ) from None
        logger.warning("LoRA %s: S3 unreachable (%s); serving %s from this host's cache", name, error, fallback.version)
        return fallback

    def _published(self, name: str) -> PublishedLora | None:
        listing = self._current_listing()
        if name not in listing and self._age() >= UNLISTED_RELIST_SECONDS:
            listing = self._current_listing(force=True)
        return listing.get(name)

    def _age(self) -> float:
        return float("inf") if self._listed_at is None else self._clock() - self._listed_at

    def _current_listing(self, *, force: bool = False) -> dict[str, PublishedLora]:
        """The listing, read again when older than ``refresh_seconds`` (or ``force``); while S3
        cannot be reached, the last one read."""
        with self._lock:
            if force or self._age() >= self.refresh_seconds:
                try:
                    self._listing = self._read_listing()
                except RegistryUnavailableError as error:
                    logger.warning("LoRA store %s cannot be listed (%s); using the last listing", self.root, error)
                    if self._listed_at is None:
                        self._listing = self._cached_listing()
                self._listed_at = self._clock()
            return self._listing

    def _read_listing(self) -> dict[str, PublishedLora]:
        names = [name for name in names_under(self.client, self.root) if _usable_name(name)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = list(pool.map(self._published_now, names))
        return {name: published for name, published in zip(names, found, strict=True) if published is not None}

    def _cached_listing(self) -> dict[str, PublishedLora]:
        """The version of each adapter this host fetched last (a start while S3 cannot be reached)."""
        store_folder = self.cache.model_folder(self.root)
        start = f"{store_folder.name}__"
        found = {}
        for folder in sorted(store_folder.parent.glob(f"{start}*")):
            name = folder.name[len(start) :]
            cached = self.cache.last_served(adapter_location(self.root, name)) if _usable_name(name) else None
            if cached is not None:
                found[name] = PublishedLora(cached.version, cached.manifest.adapter_family)
        return found

    def _published_now(self, name: str) -> PublishedLora | None:
        """Adapter ``name``'s current version and family from S3 (None when nothing is promoted)."""
        registry = ModelRegistry(self.client, adapter_location(self.root, name))
        try:
            version = registry.current()
            if (name, version) not in self._families:
                self._families[name, version] = registry.manifest(version).adapter_family
            return PublishedLora(version, self._families[name, version])
        except RegistryUnavailableError:
            raise
        except (RegistryError, ValueError) as error:
            logger.warning("LoRA store: %s is not served: %s", name, error)
            return None


def _usable_name(name: str) -> bool:
    try:
        check_version_name(name)
    except LocationError:
        return False
    return True
