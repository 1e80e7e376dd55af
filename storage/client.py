"""The one place a boto3 S3 client is made: images (storage.s3) and model versions (sd_pipeline.versions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

AddressingStyle = Literal["auto", "virtual", "path"]


def s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    addressing_style: AddressingStyle = "auto",
    connect_timeout: float = 2.0,
    read_timeout: float = 10.0,
    max_attempts: int = 3,
) -> S3Client:
    """A boto3 S3 client with short timeouts, standard retries and lenient checksums (S3-compatible
    stores such as SeaweedFS and older MinIO reject the newer default checksums); credentials come
    from boto3's usual chain, never from here."""
    config = Config(
        region_name=region,
        signature_version="s3v4",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        s3={"addressing_style": addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client: S3Client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
    return client
