"""Where a model's versions live: ``s3://BUCKET/PREFIX`` and, pinned, ``s3://BUCKET/PREFIX@NAME``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sd_pipeline.contract.models import S3_SCHEME

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"


class LocationError(ValueError):
    """A model location or version name that cannot be used."""


def check_version_name(name: str) -> str:
    """A version name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not VERSION_PATTERN.match(name):
        raise LocationError(
            f"version: {name!r} is not a version name (1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class ModelLocation:
    """A model's place in a bucket, and the version it pins (None: follow ``current``)."""

    bucket: str
    prefix: str  # no leading or trailing slash
    pinned: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelLocation:
        """Read ``s3://BUCKET/PREFIX[@NAME]``; raises ``LocationError`` naming what is wrong."""
        if not text.startswith(S3_SCHEME):
            raise LocationError(f"model: {text!r} is not an s3://BUCKET/PREFIX location")
        rest, at, pinned = text[len(S3_SCHEME) :].partition("@")
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not bucket or not prefix:
            raise LocationError(f"model: {text!r} needs a bucket and a prefix (s3://BUCKET/PREFIX)")
        return cls(bucket, prefix, check_version_name(pinned) if at else None)

    @property
    def name(self) -> str:
        """The model's name: the prefix's last part (``s3://models/demo`` is ``demo``)."""
        return self.prefix.rsplit("/", 1)[-1]

    @property
    def current_key(self) -> str:
        return f"{self.prefix}/current"

    def version_prefix(self, version: str) -> str:
        return f"{self.prefix}/versions/{version}/"

    def manifest_key(self, version: str) -> str:
        return self.version_prefix(version) + MANIFEST

    def pin(self, version: str) -> ModelLocation:
        return ModelLocation(self.bucket, self.prefix, check_version_name(version))

    def __str__(self) -> str:
        pinned = f"@{self.pinned}" if self.pinned else ""
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}{pinned}"


def pinned_version(model: str) -> str:
    """The version ``s3://BUCKET/PREFIX@NAME`` pins; "" for anything else (unpinned, a folder, a Hub id)."""
    if not model.startswith(S3_SCHEME):
        return ""
    try:
        return ModelLocation.parse(model).pinned or ""
    except LocationError:
        return ""
