"""Nothing lost in an outage: a bounded on-disk spool and a background uploader in front of S3.

Several front ends may share one spool folder (one ``DATA_DIR``): an entry is uploaded by
whichever uploader holds its lock (``flock`` on the entry's folder, released by the kernel if
that process dies), so two never take the same one, and a starting front end removes only
staging folders old enough to be abandoned, never another's write in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from storage.base import SpoolFullError, StorageError, disk_full
from storage.files import sync_folder, write_synced
from storage.records import HistoryPage, ImageRecord, InputPictures, Link, LinkedImage
from storage.s3 import S3_ERRORS, S3Store

logger = logging.getLogger(__name__)

IMAGE_FILE = "image.png"
RECORD_FILE = "record.json"
INPUT_PREFIX = "input-"  # an input picture beside the image: input-{id}.png
STAGING_MAX_AGE = 3600.0  # a staging folder this old was abandoned by a crash (a write takes milliseconds)


class StorageObserver(Protocol):
    """Receives plain facts about storage work (implemented by the metrics module)."""

    def upload(self, *, seconds: float) -> None: ...

    def failure(self, *, operation: str) -> None: ...

    def pending(self, *, count: int) -> None: ...


@dataclass(frozen=True)
class SpoolLimits:
    """How much the spool may hold before requests fail with a clear error."""

    max_items: int = 1000
    max_bytes: int = 2 * 1024**3


class Spool:
    """One folder per waiting upload, written atomically; survives restarts."""

    def __init__(self, folder: Path, *, limits: SpoolLimits | None = None) -> None:
        self.folder = folder
        self.limits = limits or SpoolLimits()
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STAGING_MAX_AGE
        for leftover in folder.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)

    def entries(self) -> list[Path]:
        """Waiting uploads, oldest first (image ids sort newest first)."""
        return sorted((path for path in self.folder.iterdir() if not path.name.startswith(".")), reverse=True)

    def put(self, png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> None:
        """Keep one upload (with its input pictures) on disk; raises ``SpoolFullError`` when over the limits."""
        inputs = inputs or {}
        with self._lock:
            entries = self.entries()
            if not self._fits(entries, len(png) + sum(len(picture) for picture in inputs.values())):
                raise SpoolFullError(
                    f"storage is unavailable and the upload spool is full ({len(entries)} images waiting); "
                    "nothing was saved, try again later"
                )
            staging = self.folder / f".tmp-{uuid.uuid4().hex}"
            try:
                staging.mkdir()
                for input_id, picture in inputs.items():
                    write_synced(staging / f"{INPUT_PREFIX}{input_id}.png", picture)
                write_synced(staging / IMAGE_FILE, png)
                write_synced(staging / RECORD_FILE, record.model_dump_json().encode())
                sync_folder(staging)
                staging.rename(self.folder / record.id)
                sync_folder(self.folder)  # the entry survives a power cut once put returns
            except OSError as error:
                shutil.rmtree(staging, ignore_errors=True)
                raise disk_full(error, self.folder) or StorageError(
                    f"cannot write to the upload spool {self.folder}: {error.strerror}"
                ) from error

    def has_room(self) -> bool:
        """Whether one more image fits (a write test too: a read-only or missing folder has none)."""
        return self._fits(self.entries(), 1) and os.access(self.folder, os.W_OK)

    def _fits(self, entries: list[Path], size: int) -> bool:
        """Whether ``size`` more bytes, as one more entry, stay within the limits."""
        used = sum(_size(entry) for entry in entries)
        return len(entries) < self.limits.max_items and used + size <= self.limits.max_bytes

    def load(self, entry: Path) -> tuple[bytes, ImageRecord]:
        record = ImageRecord.model_validate_json((entry / RECORD_FILE).read_bytes())
        return (entry / IMAGE_FILE).read_bytes(), record

    def inputs(self, entry: Path) -> dict[str, bytes]:
        """The input pictures kept with an entry, by id."""
        return {path.stem.removeprefix(INPUT_PREFIX): path.read_bytes() for path in entry.glob(f"{INPUT_PREFIX}*.png")}

    def remove(self, entry: Path) -> None:
        shutil.rmtree(entry, ignore_errors=True)

    @contextlib.contextmanager
    def claim(self, entry: Path) -> Iterator[bool]:
        """Hold ``entry`` for this uploader: True while held; False when another process (or
        thread) holds it, or it is gone (uploaded by another)."""
        try:
            handle = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield entry.exists()  # removed by the uploader that held it just before
        finally:
            os.close(handle)  # releases the lock

    def pending_for(self, owner: str) -> list[ImageRecord]:
        """Records still waiting for upload that belong to ``owner``, newest first."""
        records = []
        for entry in reversed(self.entries()):
            try:
                records.append(ImageRecord.model_validate_json((entry / RECORD_FILE).read_bytes()))
            except (OSError, ValueError):  # uploaded meanwhile, or being written
                continue
        return [record for record in records if record.owner == owner]


def _size(entry: Path) -> int:
    try:
        return sum(path.stat().st_size for path in entry.iterdir())
    except FileNotFoundError:  # uploaded (and removed) by another front end meanwhile
        return 0


class SpoolingStore:
    """S3 first; on failure the image goes to the spool and a background thread uploads it later."""

    def __init__(
        self,
        primary: S3Store,
        spool: Spool,
        *,
        observer: StorageObserver | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.primary = primary
        self.spool = spool
        self.observer = observer
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._healthy = True
        self._thread = threading.Thread(target=self._upload_loop, name="spool-uploader", daemon=True)

    def start(self) -> None:
        """Start the uploader; it drains whatever an earlier run left in the spool."""
        self._report_pending()
        self._thread.start()

    def save(self, png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> LinkedImage:
        """Upload now, or spool and return the record marked ``pending`` (its link works once uploaded)."""
        link = self.primary.link(record.owner, record.id)
        if self._healthy:
            started = time.perf_counter()
            try:
                self.primary.put(png, record, inputs)
            except S3_ERRORS as error:
                logger.warning("upload of %s failed (%s); spooling it", record.id, type(error).__name__)
                self._record_failure()
            else:
                if self.observer is not None:
                    self.observer.upload(seconds=time.perf_counter() - started)
                return LinkedImage(record.model_copy(update={"status": "stored"}), link)
        pending = record.model_copy(update={"status": "pending"})
        self.spool.put(png, pending, inputs)
        self._report_pending()
        self._wake.set()
        return LinkedImage(pending, link)

    def history(self, owner: str, *, page: int, page_size: int) -> HistoryPage:
        """S3 history; page 1 also shows this owner's images still waiting in the spool."""
        try:
            stored = self.primary.history(owner, page=page, page_size=page_size)
        except StorageError:
            if self.observer is not None:
                self.observer.failure(operation="history")
            raise
        if page != 1:
            return stored
        shown = {image.record.id for image in stored.images}
        waiting = [
            LinkedImage(record, self.primary.link(owner, record.id))
            for record in self.spool.pending_for(owner)
            if record.id not in shown
        ]
        return HistoryPage(images=waiting + stored.images, page=page, has_more=stored.has_more)

    def adopt(self, earlier_owner: str, owner: str) -> int:
        """Move a history in S3 (what an earlier version left in the spool is uploaded under its old
        key and moves on the owner's first view after the next start)."""
        try:
            return self.primary.adopt(earlier_owner, owner)
        except StorageError:
            if self.observer is not None:
                self.observer.failure(operation="history")
            raise

    def fetch(self, owner: str, image_id: str) -> bytes:
        """From the spool while the upload waits, else from S3."""
        entry = self.spool.folder / image_id
        try:
            png, record = self.spool.load(entry)
        except (OSError, ValueError):
            return self.primary.fetch(owner, image_id)
        if record.owner != owner:
            raise StorageError("no such image")
        return png

    def link(self, owner: str, image_id: str) -> Link:
        return self.primary.link(owner, image_id)

    def check(self) -> None:
        """Can this front end take images now? Yes while the spool has room, S3 or not: an S3
        outage is ``degraded``, not unready (balancers route on readiness)."""
        if not self.spool.has_room():
            raise SpoolFullError(f"S3 is unavailable and the upload spool at {self.spool.folder} is full")

    def degraded(self) -> str | None:
        """What is wrong but does not stop serving: S3 unreachable, images waiting in the spool."""
        try:
            self.primary.check()
        except StorageError as error:
            if self.observer is not None:
                self.observer.failure(operation="check")
            waiting = len(self.spool.entries())
            return f"{error}; images are kept in the upload spool ({waiting} waiting) and uploaded when it returns"
        return None

    def flush(self, *, timeout: float) -> bool:
        """Try to upload everything waiting; True when the spool is empty (other front ends' uploads included)."""
        deadline = time.monotonic() + timeout
        while (entries := self.spool.entries()) and time.monotonic() < deadline:
            uploaded = self._upload_waiting()
            if not uploaded or self.spool.entries() == entries:  # failed, or others hold what is left
                time.sleep(min(self.min_backoff, max(0.0, deadline - time.monotonic())))
        self._report_pending()
        return not self.spool.entries()

    def close(self, *, flush_timeout: float = 10.0) -> None:
        """Stop the uploader, flush what can be flushed, keep the rest on disk for next start."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.primary.settings.read_timeout * self.primary.settings.max_attempts)
        left = 0 if self.flush(timeout=flush_timeout) else len(self.spool.entries())
        if left:
            logger.warning("%d uploads stay in the spool at %s for the next start", left, self.spool.folder)
        self.primary.close()

    def _upload_loop(self) -> None:
        """Until stopped: upload what waits, backing off while uploads fail. Nothing ends it but
        ``close``: an unexpected error is logged, counted and retried like a failed upload."""
        backoff = self.min_backoff
        while not self._stop.is_set():
            try:
                uploaded = self._upload_waiting()
            except Exception:
                logger.exception("the spool uploader hit an unexpected error; retrying in %gs", backoff)
                self._record_failure()
                uploaded = False
            if uploaded is None:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
            elif uploaded:
                backoff = self.min_backoff
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _upload_waiting(self) -> bool | None:
        """One pass over the spool: None when it was empty, False when an upload failed."""
        entries = self.spool.entries()
        if not entries:
            return None
        return all(not self._stop.is_set() and self._upload_one(entry) for entry in entries)

    def _upload_one(self, entry: Path) -> bool:
        """Upload one entry unless another uploader holds it; False only when the upload failed."""
        with self.spool.claim(entry) as held:
            return self._upload_held(entry) if held else True

    def _upload_held(self, entry: Path) -> bool:
        try:
            png, record = self.spool.load(entry)
            inputs = self.spool.inputs(entry)
        except (OSError, ValueError) as error:
            if not entry.exists():
                return True  # uploaded by another front end
            logger.error("spool entry %s is unreadable (%s); kept in place for inspection", entry, error)
            entry.rename(entry.with_name(f".broken-{entry.name}"))
            return True
        started = time.perf_counter()
        try:
            self.primary.put(png, record, inputs)
        except S3_ERRORS as error:
            logger.warning("upload of spooled %s failed (%s); retrying later", record.id, type(error).__name__)
            self._record_failure()
            return False
        self.spool.remove(entry)
        self._healthy = True
        if self.observer is not None:
            self.observer.upload(seconds=time.perf_counter() - started)
        self._report_pending()
        return True

    def _record_failure(self) -> None:
        self._healthy = False
        if self.observer is not None:
            self.observer.failure(operation="upload")

    def _report_pending(self) -> None:
        if self.observer is not None:
            self.observer.pending(count=len(self.spool.entries()))
