"""Versions downloaded to this host, each verified against its manifest before anything loads it.

A version is downloaded into a ``.partial-*`` folder beside its place, checked file by file
(size and sha256), then renamed into place with a ``.verified`` mark: a partial or corrupt
download is never used, and a version in the cache starts without S3. The cache also
remembers the last version this host served, for a start while ``current`` cannot be read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.versions.location import MANIFEST, ModelLocation, check_version_name
from sd_pipeline.versions.manifest import Manifest
from sd_pipeline.versions.registry import ModelRegistry, RegistryError
from storage.files import write_atomic

logger = logging.getLogger(__name__)

VERIFIED_MARK = ".verified"
LAST_SERVED = ".last-served"
_PARTIAL_MAX_AGE = 24 * 3600.0
KEEP_VERSIONS = 2  # versions kept in the cache besides the one served: rollbacks need no download


class VersionRefusedError(RegistryError):
    """A version whose files do not match its manifest (missing, truncated or changed)."""


@dataclass(frozen=True)
class CachedVersion:
    """A verified version on this host."""

    location: ModelLocation
    path: Path
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def defaults(self) -> ModelDefaults:
        return self.manifest.defaults


class ModelCache:
    """Verified versions under ``root/BUCKET/PREFIX/VERSION``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_folder(self, location: ModelLocation) -> Path:
        return self.root / _safe(location.bucket) / _safe(location.prefix.replace("/", "__"))

    def cached(self, location: ModelLocation, version: str) -> CachedVersion | None:
        """The version if it is in the cache and was verified when it arrived; no S3."""
        folder = self.model_folder(location) / check_version_name(version)
        try:
            manifest = Manifest.model_validate_json((folder / MANIFEST).read_bytes())
            mark = (folder / VERIFIED_MARK).read_text().strip()
        except (OSError, ValueError):
            return None
        return CachedVersion(location, folder, manifest) if mark == manifest.digest else None

    def fetch(self, registry: ModelRegistry, version: str) -> CachedVersion:
        """The version from the cache, or downloaded and verified; raises ``RegistryError``
        (``VersionRefusedError`` when the files do not match the manifest)."""
        location = registry.location
        found = self.cached(location, version)
        if found is not None:
            return found
        manifest = registry.manifest(version)
        parent = self.model_folder(location)
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_partials(parent)
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{version}-", dir=parent))
        try:
            started = time.monotonic()
            registry.download(version, manifest, partial)
            problems = manifest.problems(partial)
            if problems:
                shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
                raise VersionRefusedError(f"{location}@{version} does not match its manifest: {shown}")
            (partial / MANIFEST).write_bytes(manifest.to_json())
            write_atomic(partial / VERIFIED_MARK, manifest.digest.encode())
            final = parent / version
            if final.exists() and self.cached(location, version) is None:
                shutil.rmtree(final, ignore_errors=True)  # an unverified leftover
            try:
                os.replace(partial, final)
            except OSError:  # another process (a front end on the same cache) put it in place first
                if (theirs := self.cached(location, version)) is not None:
                    return theirs
                raise
            logger.info(
                "downloaded and verified %s@%s (%d files, %.1f MB) in %.1fs",
                location,
                version,
                len(manifest.files),
                manifest.total_bytes / 1e6,
                time.monotonic() - started,
            )
            return CachedVersion(location, final, manifest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def remember_served(self, location: ModelLocation, version: str) -> None:
        """Record that this host served ``version`` (read back when ``current`` is unreachable)."""
        folder = self.model_folder(location)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / LAST_SERVED, version.encode())

    def last_served(self, location: ModelLocation) -> CachedVersion | None:
        """The version this host served last, if it is still in the cache."""
        try:
            version = (self.model_folder(location) / LAST_SERVED).read_text().strip()
        except OSError:
            return None
        return self.cached(location, version)

    def prune(self, location: ModelLocation, *, serving: str, keep: int = KEEP_VERSIONS) -> list[str]:
        """Remove all but ``serving`` and the ``keep`` versions that arrived last (for a quick
        rollback); the versions removed. A version another front end on this cache serves was
        loaded before it was pruned, and is fetched again if it is needed."""
        folder = self.model_folder(location)
        arrived = []
        for mark in folder.glob(f"*/{VERIFIED_MARK}"):
            with contextlib.suppress(OSError):
                arrived.append((mark.stat().st_mtime, mark.parent.name))
        newest_first = [name for _, name in sorted(arrived, reverse=True) if name != serving]
        removed = newest_first[keep:]
        for name in removed:
            shutil.rmtree(folder / name, ignore_errors=True)
        if removed:
            logger.info("removed %d older versions of %s from the cache: %s", len(removed), location, removed)
        return removed

    def _remove_stale_partials(self, parent: Path) -> None:
        """Downloads interrupted long ago (a crash); recent ones may be another process's, kept."""
        cutoff = time.time() - _PARTIAL_MAX_AGE
        for partial in parent.glob(".partial-*"):
            with contextlib.suppress(OSError):
                if partial.stat().st_mtime < cutoff:
                    shutil.rmtree(partial, ignore_errors=True)


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_"
