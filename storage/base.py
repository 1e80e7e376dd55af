"""The storage interface both backends implement."""

from __future__ import annotations

import errno
from typing import Protocol

from storage.records import HistoryPage, ImageRecord, InputPictures, Link, LinkedImage


class StorageError(RuntimeError):
    """Storage could not do what was asked; the message names bucket or folder, never secrets."""


class StorageUnreachableError(StorageError):
    """The store did not answer (connection refused, timeout, a 5xx): an outage, not a wrong setting."""


class SpoolFullError(StorageError):
    """Storage is down and the on-disk spool has no room left."""


class StorageFullError(StorageError):
    """The disk (or quota) under the data folder or the spool is full."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: OSError, where: object) -> StorageFullError | None:
    """A ``StorageFullError`` naming ``where`` when ``error`` means the disk is full, else None."""
    if error.errno in DISK_FULL_ERRNOS:
        return StorageFullError(f"storage full: no space left in {where}; the image was not saved")
    return None


class ImageStore(Protocol):
    """Save images with their records, list an owner's history, make links."""

    def save(self, png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> LinkedImage:
        """Store one image and its record under ``record.owner`` (with the input pictures it was
        made from, stored as images without records of their own); returns it with a link."""
        ...

    def history(self, owner: str, *, page: int, page_size: int) -> HistoryPage:
        """One page of ``owner``'s images, newest first, with fresh links."""
        ...

    def fetch(self, owner: str, image_id: str) -> bytes:
        """The PNG bytes of one of ``owner``'s images; raises ``StorageError``."""
        ...

    def link(self, owner: str, image_id: str) -> Link:
        """A fresh link for one image."""
        ...

    def adopt(self, earlier_owner: str, owner: str) -> int:
        """Move every image of ``earlier_owner`` to ``owner`` (the same user under a new owner key);
        how many moved. Raises ``StorageError``."""
        ...

    def check(self) -> None:
        """Raise ``StorageError`` when the store cannot take images now (not ready)."""
        ...

    def degraded(self) -> str | None:
        """What is wrong without stopping service (e.g. S3 down while the spool takes images), or None."""
        ...

    def close(self) -> None:
        """Release resources; flush what can be flushed."""
        ...
