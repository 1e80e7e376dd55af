"""From ``SD_MODEL`` to something ``from_pretrained`` can load, and what to call it.

``s3://BUCKET/PREFIX`` follows ``current``; ``s3://BUCKET/PREFIX@NAME`` pins a version. Either
becomes a verified folder in this host's cache. A Hub id or a plain folder passes through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.models import ModelDefaults, ModelStore, is_s3_model
from sd_pipeline.versions.cache import CachedVersion, ModelCache
from sd_pipeline.versions.location import LocationError, ModelLocation
from sd_pipeline.versions.manifest import read_folder_defaults
from sd_pipeline.versions.registry import ModelRegistry, RegistryError, RegistryUnavailableError, make_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: its source for ``from_pretrained`` and its identity."""

    source: str  # a folder's path or a Hub id
    name: str
    version: str = ""
    model_hash: str = ""
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    pinned: str = ""  # SD_MODEL with the version made explicit (what workers and replicas are given)
    note: str | None = None  # something the operator should know (e.g. served from the cache while S3 is down)


def resolve_model(model: str, store: ModelStore | None) -> ResolvedModel:
    """Resolve ``SD_MODEL``; raises ``ModelLoadError`` saying what is wrong."""
    if not is_s3_model(model):
        return _plain(model)
    if store is None:
        raise ModelLoadError(f"model '{model}' is in S3 but no model store is configured")
    try:
        location = ModelLocation.parse(model)
    except LocationError as error:
        raise ModelLoadError(str(error)) from None
    cache = ModelCache(Path(store.cache_dir))
    registry = ModelRegistry(make_client(store), location)
    try:
        if location.pinned is not None:
            return _from_cache(cache.fetch(registry, location.pinned))
        return _from_cache(cache.fetch(registry, registry.current()))
    except RegistryUnavailableError as error:
        fallback = cache.last_served(location) if location.pinned is None else None
        if fallback is None:
            raise ModelLoadError(f"cannot fetch model '{model}': {error}") from None
        note = (
            f"S3 unreachable ({error}); serving {fallback.version}, the last version this host served, from its cache"
        )
        logger.warning("%s", note)
        return _from_cache(fallback, note=note)
    except RegistryError as error:
        raise ModelLoadError(f"cannot use model '{model}': {error}") from None


def _from_cache(cached: CachedVersion, *, note: str | None = None) -> ResolvedModel:
    manifest = cached.manifest
    return ResolvedModel(
        source=str(cached.path),
        name=cached.location.name,
        version=manifest.version,
        model_hash=manifest.short_hash,
        defaults=manifest.defaults,
        pinned=str(cached.location.pin(manifest.version)),
        note=note,
    )


def _plain(model: str) -> ResolvedModel:
    local = Path(model).expanduser()
    if local.is_dir():
        try:
            defaults = read_folder_defaults(local)
        except ValueError as error:
            raise ModelLoadError(f"model '{model}': its model_defaults.json is not valid: {error}") from None
        return ResolvedModel(source=str(local), name=local.resolve().name, defaults=defaults, pinned=model)
    return ResolvedModel(source=model, name=model, pinned=model)
