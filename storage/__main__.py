"""``python -m storage create-bucket``: create the image bucket (S3_BUCKET) if it is missing.

For a store's one-time setup with an identity that may create buckets, so the app's own keys
need not (the compose stack gives the app read/write/list on its buckets only). The store is
the app's: ``S3_BUCKET``, ``S3_ENDPOINT_URL``, ``S3_REGION``, ``S3_ADDRESSING_STYLE``; keys from
boto3's usual chain.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from storage.base import StorageError
from storage.s3 import S3Settings, S3Store


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["create-bucket"]:
        print("usage: python -m storage create-bucket   (S3_BUCKET, S3_ENDPOINT_URL, S3_REGION ...)", file=sys.stderr)
        return 2
    bucket = os.environ.get("S3_BUCKET", "")
    try:
        settings = S3Settings(
            bucket=bucket,
            endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
            region=os.environ.get("S3_REGION") or None,
            addressing_style=os.environ.get("S3_ADDRESSING_STYLE", "auto"),
            create_bucket=True,
        )
        S3Store.from_settings(settings).check()  # creates the bucket when it is missing
    except (StorageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"bucket '{bucket}' is ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
