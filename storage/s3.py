"""S3 backend (AWS or any S3-compatible store) with presigned links."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field

from storage import keys
from storage.base import StorageError, StorageUnreachableError
from storage.client import AddressingStyle, s3_client
from storage.records import HistoryPage, ImageRecord, InputPictures, Link, LinkedImage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

DEFAULT_LINK_TTL_SECONDS = 24 * 3600  # LINK_TTL_SECONDS
MAX_LINK_TTL_SECONDS = 7 * 24 * 3600  # the SigV4 maximum
S3_ERRORS = (BotoCoreError, ClientError)


class S3Settings(BaseModel):
    """Where the bucket is and how to talk to it. Credentials come from boto3's usual chain."""

    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = Field("", description="key prefix inside the bucket, e.g. 'sd/'")
    region: str | None = None
    endpoint_url: str | None = Field(None, description="for S3-compatible stores (SeaweedFS, Garage, R2, Ceph)")
    public_endpoint_url: str | None = Field(None, description="endpoint used only to sign links for browsers")
    addressing_style: AddressingStyle = "auto"
    link_ttl_seconds: int = Field(DEFAULT_LINK_TTL_SECONDS, ge=1, le=MAX_LINK_TTL_SECONDS)
    create_bucket: bool = False
    connect_timeout: float = Field(2.0, gt=0)
    read_timeout: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)


def make_client(settings: S3Settings, *, endpoint_url: str | None) -> S3Client:
    """A client for the image bucket at ``endpoint_url`` (the API's or the public one used for signing)."""
    return s3_client(
        endpoint_url=endpoint_url,
        region=settings.region,
        addressing_style=settings.addressing_style,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_attempts=settings.max_attempts,
    )


class S3Store:
    """Images and JSON records in a private bucket; links are presigned GET URLs."""

    def __init__(self, settings: S3Settings, *, client: S3Client, signing_client: S3Client | None = None) -> None:
        self.settings = settings
        self.client = client
        self.signing_client = signing_client or client
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3")

    @classmethod
    def from_settings(cls, settings: S3Settings) -> S3Store:
        """Build clients from settings; the public endpoint, if any, is used only for signing."""
        client = make_client(settings, endpoint_url=settings.endpoint_url)
        signing = None
        if settings.public_endpoint_url:
            signing = make_client(settings, endpoint_url=settings.public_endpoint_url)
        return cls(settings, client=client, signing_client=signing)

    def _where(self) -> str:
        return f"bucket '{self.settings.bucket}' at {self.settings.endpoint_url or 'AWS S3'}"

    def check(self) -> None:
        """Raise ``StorageError`` naming bucket and endpoint when the bucket is missing or unreachable."""
        try:
            self.client.head_bucket(Bucket=self.settings.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket") and self.settings.create_bucket:
                self._create_bucket()
                return
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
                raise StorageUnreachableError(f"{self._where()} is failing ({code or 'error'})") from error
            raise StorageError(f"{self._where()} is not usable ({code or 'error'}); create it or fix S3_*") from error
        except BotoCoreError as error:
            raise StorageUnreachableError(f"{self._where()} is unreachable: {type(error).__name__}") from error

    def _create_bucket(self) -> None:
        extra: dict[str, Any] = {}
        if self.settings.region and self.settings.region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        self.client.create_bucket(Bucket=self.settings.bucket, **extra)

    def put(self, png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> None:
        """Upload the input pictures, the PNG, then its record (raises botocore errors; the spool catches them).

        In that order: a process killed between them leaves pictures without a record (the
        spool uploads them all again), never a history entry without its picture."""
        for input_id, picture in (inputs or {}).items():
            self._put_image(record.owner, input_id, picture)
        self._put_image(record.owner, record.id, png)
        self.client.put_object(
            Bucket=self.settings.bucket,
            Key=keys.record_key(self.settings.prefix, record.owner, record.id),
            Body=record.model_copy(update={"status": "stored"}).model_dump_json().encode(),
            ContentType="application/json",
        )

    def _put_image(self, owner: str, image_id: str, png: bytes) -> None:
        self.client.put_object(
            Bucket=self.settings.bucket,
            Key=keys.image_key(self.settings.prefix, owner, image_id),
            Body=png,
            ContentType="image/png",
            ContentDisposition=f'inline; filename="{image_id}.png"',
            CacheControl="private, max-age=86400",
        )

    def save(self, png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> LinkedImage:
        """Upload and return the stored record with a presigned link."""
        try:
            self.put(png, record, inputs)
        except S3_ERRORS as error:
            raise StorageError(f"upload to {self._where()} failed: {type(error).__name__}") from error
        stored = record.model_copy(update={"status": "stored"})
        return LinkedImage(stored, self.link(record.owner, record.id))

    def fetch(self, owner: str, image_id: str) -> bytes:
        """Download one image."""
        key = keys.image_key(self.settings.prefix, owner, image_id)
        try:
            body: bytes = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        except S3_ERRORS as error:
            raise StorageError(f"reading an image from {self._where()} failed: {type(error).__name__}") from error
        return body

    def link(self, owner: str, image_id: str) -> Link:
        """Presign a GET for one image (local computation: works while S3 is down)."""
        ttl = self.settings.link_ttl_seconds
        expires_at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=ttl)
        url = self.signing_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.settings.bucket, "Key": keys.image_key(self.settings.prefix, owner, image_id)},
            ExpiresIn=ttl,
        )
        return Link(url=url, expires_at=expires_at)

    def history(self, owner: str, *, page: int, page_size: int) -> HistoryPage:
        """List ``page_size + 1`` record keys after the earlier pages, then fetch those records."""
        keys.check_owner(owner)
        wanted = page * page_size + 1
        record_keys = self._list_record_keys(owner, limit=wanted)
        page_keys = record_keys[(page - 1) * page_size : page * page_size]
        try:
            records = list(self._pool.map(self._get_record, page_keys))
        except S3_ERRORS as error:
            raise StorageError(f"reading history from {self._where()} failed: {type(error).__name__}") from error
        images = [LinkedImage(record, self.link(owner, record.id)) for record in records]
        return HistoryPage(images=images, page=page, has_more=len(record_keys) >= wanted)

    def adopt(self, earlier_owner: str, owner: str) -> int:
        """Move ``earlier_owner``'s images and records under ``owner`` (copy, then delete the old)."""
        keys.check_owner(owner)
        keys.check_owner(earlier_owner)
        record_keys = self._list_record_keys(earlier_owner, limit=10**9)
        try:
            for key in record_keys:
                record = self._get_record(key).model_copy(update={"owner": owner})
                old_image = keys.image_key(self.settings.prefix, earlier_owner, record.id)
                old_inputs = [keys.image_key(self.settings.prefix, earlier_owner, i) for i in record.input_ids]
                for input_id, old_input in zip(record.input_ids, old_inputs, strict=True):
                    self._copy_if_there(old_input, keys.image_key(self.settings.prefix, owner, input_id))
                self.client.copy_object(
                    Bucket=self.settings.bucket,
                    Key=keys.image_key(self.settings.prefix, owner, record.id),
                    CopySource={"Bucket": self.settings.bucket, "Key": old_image},
                )
                self.client.put_object(
                    Bucket=self.settings.bucket,
                    Key=keys.record_key(self.settings.prefix, owner, record.id),
                    Body=record.model_dump_json().encode(),
                    ContentType="application/json",
                )
                gone: list[ObjectIdentifierTypeDef] = [{"Key": old} for old in (key, old_image, *old_inputs)]
                self.client.delete_objects(Bucket=self.settings.bucket, Delete={"Objects": gone, "Quiet": True})
        except S3_ERRORS as error:
            raise StorageError(f"moving a history in {self._where()} failed: {type(error).__name__}") from error
        return len(record_keys)

    def _copy_if_there(self, source: str, target: str) -> None:
        """Copy one object; one already moved (an input picture shared by several images) is skipped."""
        try:
            self.client.copy_object(
                Bucket=self.settings.bucket, Key=target, CopySource={"Bucket": self.settings.bucket, "Key": source}
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise

    def _list_record_keys(self, owner: str, *, limit: int) -> list[str]:
        found: list[str] = []
        request: dict[str, Any] = {
            "Bucket": self.settings.bucket,
            "Prefix": keys.records_prefix(self.settings.prefix, owner),
        }
        try:
            while len(found) < limit:
                response = self.client.list_objects_v2(**request, MaxKeys=min(1000, limit - len(found)))
                found += [item["Key"] for item in response.get("Contents", [])]
                if not response.get("IsTruncated"):
                    break
                request["ContinuationToken"] = response["NextContinuationToken"]
        except S3_ERRORS as error:
            raise StorageError(f"listing history in {self._where()} failed: {type(error).__name__}") from error
        return found

    def _get_record(self, key: str) -> ImageRecord:
        body = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"].read()
        return ImageRecord.model_validate(json.loads(body))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
