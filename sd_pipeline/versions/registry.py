"""Published versions in a bucket: publish, promote, list, read ``current``, download one."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from sd_pipeline.contract.models import ModelStore
from sd_pipeline.versions.location import MANIFEST, ModelLocation, check_version_name
from sd_pipeline.versions.manifest import Manifest, build_manifest
from storage.client import s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

S3_ERRORS = (BotoCoreError, ClientError)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (the message says why)."""


class RegistryUnavailableError(RegistryError):
    """The store could not be reached or answered with an error."""


@dataclass(frozen=True)
class VersionSummary:
    """One line of ``list``."""

    name: str
    created_at: str
    total_bytes: int
    files: int
    short_hash: str
    current: bool
    pipeline_class: str = ""


def make_client(store: ModelStore) -> S3Client:
    """A client for the model store (reads of large files: a longer read timeout than the image bucket's)."""
    return s3_client(
        endpoint_url=store.endpoint_url, region=store.region, addressing_style=store.addressing_style, read_timeout=60.0
    )


class ModelRegistry:
    """The versions of one model under ``s3://BUCKET/PREFIX``."""

    def __init__(self, client: S3Client, location: ModelLocation) -> None:
        self.client = client
        self.location = location

    # Reading.
    def current(self) -> str:
        """The version in service (``PREFIX/current``); raises ``RegistryError``."""
        try:
            body = self.client.get_object(Bucket=self.location.bucket, Key=self.location.current_key)["Body"].read()
        except ClientError as error:
            if _missing(error):
                raise RegistryError(f"{self.location}: no version has been promoted (no 'current')") from None
            raise RegistryUnavailableError(f"{self.location}: cannot read 'current': {_reason(error)}") from error
        except BotoCoreError as error:
            raise RegistryUnavailableError(f"{self.location}: cannot read 'current': {_reason(error)}") from error
        return check_version_name(body.decode().strip())

    def manifest(self, version: str) -> Manifest:
        """A version's manifest; ``RegistryError`` if it is missing (unpublished or incomplete)."""
        key = self.location.manifest_key(check_version_name(version))
        try:
            body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if _missing(error):
                raise RegistryError(f"{self.location}: version {version!r} is not published (no manifest)") from None
            raise RegistryUnavailableError(
                f"{self.location}: cannot read version {version!r}: {_reason(error)}"
            ) from error
        except BotoCoreError as error:
            raise RegistryUnavailableError(
                f"{self.location}: cannot read version {version!r}: {_reason(error)}"
            ) from error
        manifest = Manifest.model_validate_json(body)
        if manifest.version != version:
            raise RegistryError(f"{self.location}: the manifest of {version!r} names {manifest.version!r}")
        return manifest

    def versions(self) -> list[VersionSummary]:
        """Every complete version (one with a manifest), oldest first, marking the current one."""
        names = []
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.location.prefix}/versions/"
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"):
                names += [entry["Prefix"][len(prefix) :].rstrip("/") for entry in page.get("CommonPrefixes", [])]
            try:
                current: str | None = self.current()
            except RegistryUnavailableError:
                raise
            except RegistryError:
                current = None
        except S3_ERRORS as error:
            raise RegistryUnavailableError(f"{self.location}: cannot list versions: {_reason(error)}") from error
        summaries = []
        for name in names:
            try:
                manifest = self.manifest(name)
            except RegistryError:
                continue  # incomplete (still uploading, or abandoned)
            summaries.append(
                VersionSummary(
                    name,
                    manifest.created_at,
                    manifest.total_bytes,
                    len(manifest.files),
                    manifest.short_hash,
                    name == current,
                    manifest.pipeline_class,
                )
            )
        return sorted(summaries, key=lambda summary: (summary.created_at, summary.name))

    # Writing.
    def exists(self, version: str) -> bool:
        """Whether anything is stored under the version's name (complete or not)."""
        prefix = self.location.version_prefix(check_version_name(version))
        try:
            found = self.client.list_objects_v2(Bucket=self.location.bucket, Prefix=prefix, MaxKeys=1)
        except S3_ERRORS as error:
            raise RegistryUnavailableError(f"{self.location}: cannot check {version!r}: {_reason(error)}") from error
        return bool(found.get("KeyCount", 0))

    def create_bucket(self) -> None:
        """Create the bucket if it is missing (a new store's first publish)."""
        try:
            self.client.head_bucket(Bucket=self.location.bucket)
            return
        except ClientError as error:
            if not _missing(error) and error.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise RegistryUnavailableError(f"{self.location}: {_reason(error)}") from error
        except BotoCoreError as error:
            raise RegistryUnavailableError(f"{self.location}: {_reason(error)}") from error
        try:
            self.client.create_bucket(Bucket=self.location.bucket)
        except S3_ERRORS as error:
            raise RegistryUnavailableError(f"{self.location}: cannot create the bucket: {_reason(error)}") from error

    def publish(self, folder: Path, version: str, *, promote: bool = False, source: str = "") -> Manifest:
        """Upload a pipeline folder as a new version, manifest last; never overwrites a version."""
        manifest = build_manifest(folder, version=version, source=source)
        return self.publish_files(manifest, {name: folder / name for name in manifest.files}, promote=promote)

    def publish_files(self, manifest: Manifest, files: Mapping[str, Path], *, promote: bool = False) -> Manifest:
        """Upload ``files`` (the manifest's names -> where each is on disk) as the manifest's version,
        manifest last; never overwrites a version."""
        version = manifest.version
        prefix = self.location.version_prefix(version)
        if self.exists(version):
            raise RegistryError(f"{self.location}: version {version!r} already exists; publish under a new name")

        def upload(name: str) -> None:
            self.client.upload_file(str(files[name]), self.location.bucket, prefix + name)

        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(upload, manifest.files))
            self.client.put_object(
                Bucket=self.location.bucket,
                Key=prefix + MANIFEST,
                Body=manifest.to_json(),
                ContentType="application/json",
            )
        except S3_ERRORS as error:
            raise RegistryUnavailableError(
                f"{self.location}: publishing {version!r} failed: {_reason(error)}"
            ) from error
        logger.info(
            "published %s@%s (%d files, %d bytes)", self.location, version, len(manifest.files), manifest.total_bytes
        )
        if promote:
            self.promote(version)
        return manifest

    def promote(self, version: str) -> None:
        """Make ``version`` the one in service (also how to roll back); it must be complete."""
        self.manifest(version)
        try:
            self.client.put_object(
                Bucket=self.location.bucket,
                Key=self.location.current_key,
                Body=version.encode(),
                ContentType="text/plain",
            )
        except S3_ERRORS as error:
            raise RegistryUnavailableError(f"{self.location}: cannot promote {version!r}: {_reason(error)}") from error
        logger.info("promoted %s@%s", self.location, version)

    def download(self, version: str, manifest: Manifest, into: Path) -> None:
        """Download every file the manifest lists into ``into`` (not verified here: the cache does it)."""
        prefix = self.location.version_prefix(version)

        def fetch(name: str) -> None:
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.location.bucket, prefix + name, str(target))

        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(fetch, manifest.files))
        except ClientError as error:
            if _missing(error):
                raise RegistryError(
                    f"{self.location}@{version}: a file the manifest lists is missing in the store"
                ) from None
            raise RegistryUnavailableError(f"{self.location}@{version}: download failed: {_reason(error)}") from error
        except BotoCoreError as error:
            raise RegistryUnavailableError(f"{self.location}@{version}: download failed: {_reason(error)}") from error


def _missing(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404", "NotFound")


def _reason(error: Exception) -> str:
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"{details.get('Code', 'error')}: {details.get('Message', '')}".strip(": ")
    return type(error).__name__


def names_under(client: S3Client, root: ModelLocation) -> list[str]:
    """The names one level under ``root`` (``s3://BUCKET/PREFIX/NAME/...``): the models a store holds."""
    prefix = f"{root.prefix}/"
    names: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=root.bucket, Prefix=prefix, Delimiter="/"):
            names += [entry["Prefix"][len(prefix) :].rstrip("/") for entry in page.get("CommonPrefixes", [])]
    except S3_ERRORS as error:
        raise RegistryUnavailableError(f"{root}: cannot list what is published: {_reason(error)}") from error
    return sorted(names)
