"""What a generate or history call does, independent of Gradio: validate, queue, store, link."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitoring.metrics import Metrics, Outcome
from sd_pipeline.admission import Admission, QueueFullError, ShuttingDownError
from sd_pipeline.contract.backend import Backend
from sd_pipeline.contract.errors import (
    GenerationCancelledError,
    InvalidRequestError,
    OutOfMemoryError,
    PipelineUnavailableError,
    WorkerCrashedError,
)
from sd_pipeline.contract.jobs import GenerationResult, PreviewCallback
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.request import GenerationRequest, InputRules
from sd_pipeline.png import encode_png
from storage.base import ImageStore, StorageError, StorageFullError
from storage.keys import new_image_id
from storage.records import HistoryPage, ImageRecord, LinkedImage
from webapp.waiting import StepClock, StepTimer, running_status, waiting_status

ProgressSink = Callable[[str, float | None], None]
_GALLERY_FILE_LIFETIME = 3600.0
_GALLERY_PRUNE_INTERVAL = 60.0
_PROGRESS_INTERVAL = 0.25
_ADOPTED_REMEMBERED = 100_000
logger = logging.getLogger(__name__)


class UserFacingError(RuntimeError):
    """An error whose message is meant for the user (bad input, busy, storage down)."""


@dataclass(frozen=True)
class HistoryView:
    """A history page and, for each image in it, a local PNG for the gallery."""

    page: HistoryPage
    png_paths: list[Path]


@dataclass(frozen=True)
class GeneratedImage:
    """A stored (or spooled) image and the PNG file the page shows."""

    linked: LinkedImage
    png_path: Path


class ImageService:
    """Validates, queues, generates, stores and lists images for owners."""

    def __init__(
        self,
        backend: Backend,
        admission: Admission,
        store: ImageStore,
        metrics: Metrics,
        *,
        page_size: int,
        gallery_dir: Path | None = None,
    ) -> None:
        self.backend = backend
        self.admission = admission
        self.store = store
        self.metrics = metrics
        self.page_size = page_size
        self.gallery_dir = gallery_dir or Path(tempfile.gettempdir()) / "sd-service-gallery"
        self._gallery_pruned_at = -math.inf
        self.active = 0
        self.step_clock = StepClock()
        self._adopted: set[str] = set()  # earlier owner keys already moved (or found empty)
        # The served model, as new pages start from it (updated on each rollout): what it recommends,
        # what its family accepts, its native side (0: the side the page was built with).
        self.model_defaults = ModelDefaults()
        self.model_rules = InputRules()
        self.native_size = 0
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="history-fetch")

    def wait_idle(self, *, timeout: float) -> bool:
        """Wait until no request is being handled (used on shutdown); True if idle in time."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.active

    def invalid_field(self, fields: Mapping[str, Any]) -> InvalidRequestError | None:
        """The first out-of-range field (counted as an invalid request), or None; no queue, no GPU."""
        try:
            self.backend.check(fields)
        except InvalidRequestError as error:
            return self.refused(error)
        return None

    def refused(self, error: InvalidRequestError) -> InvalidRequestError:
        """Count a request refused for ``error`` (found here or by the web layer, e.g. an unreadable upload)."""
        self.metrics.request_finished(Outcome.INVALID)
        return error

    async def generate(
        self,
        fields: Mapping[str, Any],
        *,
        owner: str,
        progress: ProgressSink,
        on_preview: PreviewCallback | None = None,
        address: str = "",
    ) -> list[GeneratedImage]:
        """Run one request end to end; raises ``UserFacingError`` with a message for the user.

        ``on_preview`` (called from another thread) gets the request's live previews, if the
        backend makes them; they are never stored. ``address`` is an anonymous caller's client
        address (its requests share one limit and one turn); "" for a logged-in user."""
        started = time.perf_counter()
        self.metrics.in_progress.inc()
        self.active += 1
        try:
            results = await self._generate(fields, owner, address, progress, on_preview)
            images = await asyncio.to_thread(self._store_all, results, owner)
        except UserFacingError as error:
            self.metrics.request_finished(_outcome_of(error))
            raise
        except (asyncio.CancelledError, GenerationCancelledError):
            self.metrics.request_finished(Outcome.CANCELLED)
            raise
        except Exception:
            self.metrics.request_finished(Outcome.ERROR)
            raise
        finally:
            self.metrics.in_progress.dec()
            self.active -= 1
        self.metrics.request_finished(Outcome.SUCCESS, seconds=time.perf_counter() - started, images=len(images))
        return images

    async def _generate(
        self,
        fields: Mapping[str, Any],
        owner: str,
        address: str,
        progress: ProgressSink,
        on_preview: PreviewCallback | None,
    ) -> list[GenerationResult]:
        try:
            inputs = self.backend.check(fields)
        except InvalidRequestError as error:
            raise InvalidInputError(str(error)) from error
        timer = StepTimer(self.step_clock)
        request = Request(
            inputs, on_step=lambda step, total: timer.step(step), on_preview=on_preview, owner=owner, address=address
        )
        try:
            future = self.admission.submit(request)
        except (QueueFullError, ShuttingDownError) as error:
            raise BusyError(str(error)) from error
        wrapped = asyncio.wrap_future(future)
        shown = ""
        try:
            while not wrapped.done():
                ahead = self.admission.position(request)
                waiting = ahead is not None
                step_seconds = self.step_clock.seconds
                if ahead is not None:
                    before = self.admission.steps_before_start(request)
                    until_done = None if before is None else before + inputs.denoising_steps
                    status = waiting_status(ahead, until_done, step_seconds)
                else:
                    status = running_status(request.steps_done, request.steps_total, step_seconds)
                    if request.steps_done == 0 and (notice := self.backend.notice()):
                        status = notice  # e.g. held while the model switches (MODEL_ROLLOUT=drain)
                if status != shown:  # only changes go to the client: fewer messages, less CPU per request
                    # A fraction even while waiting: the page shows the text only next to a value.
                    progress(status, 0.0 if waiting else request.steps_done / request.steps_total)
                    shown = status
                await asyncio.wait({wrapped}, timeout=_PROGRESS_INTERVAL)
            return wrapped.result()
        except asyncio.CancelledError:
            self.admission.cancel(request)
            # Admission ends the request as cancelled; nobody awaits that outcome any more.
            wrapped.add_done_callback(_consume_outcome)
            raise
        except (OutOfMemoryError, WorkerCrashedError) as error:
            raise GenerationFailedError(str(error)) from error
        except PipelineUnavailableError as error:
            raise BusyError(str(error)) from error

    def _store_all(self, results: list[GenerationResult], owner: str) -> list[GeneratedImage]:
        """Store each image; the request's input pictures once, with the first, under ids of their own."""
        self._prune_gallery_files()
        images = []
        inputs = _input_pictures(results[0].request) if results else {}
        input_ids = {name: image_id for name, (image_id, _) in inputs.items()}
        unsaved = dict(inputs.values())
        for image_id, picture in unsaved.items():  # the page puts them back into the form (input_copies)
            (self.gallery_dir / f"{image_id}.png").write_bytes(picture)
        for result in results:
            now = dt.datetime.now(dt.UTC)
            record = ImageRecord.from_result(
                result, image_id=new_image_id(now), owner=owner, created_at=now, **input_ids
            )
            png = encode_png(result)
            try:
                linked = self.with_input_links(self.store.save(png, record, unsaved))
                unsaved = {}
            except StorageFullError as error:
                self.metrics.storage_full.inc()
                raise StorageUnavailableError(f"{error}; try again later") from error
            except StorageError as error:
                raise StorageUnavailableError(f"the image could not be stored: {error}") from error
            path = self.gallery_dir / f"{record.id}.png"
            path.write_bytes(png)
            images.append(GeneratedImage(linked=linked, png_path=path))
        return images

    def _prune_gallery_files(self) -> None:
        """Remove gallery copies older than their lifetime; at most once a minute (it lists the folder)."""
        self.gallery_dir.mkdir(parents=True, exist_ok=True)
        if time.monotonic() - self._gallery_pruned_at < _GALLERY_PRUNE_INTERVAL:
            return
        self._gallery_pruned_at = time.monotonic()
        cutoff = time.time() - _GALLERY_FILE_LIFETIME
        for path in self.gallery_dir.glob("*.png"):
            with contextlib.suppress(FileNotFoundError):  # another request's prune got there first
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)

    def with_input_links(self, image: LinkedImage) -> LinkedImage:
        """``image`` with fresh links to the pictures it was made from (signing is local: no store call)."""
        record = image.record
        names = {"init_image": record.init_image, "mask": record.mask}
        links = {name: self.store.link(record.owner, image_id) for name, image_id in names.items() if image_id}
        return dataclasses.replace(image, input_links=links) if links else image

    def history(self, *, owner: str, page: Any, earlier_owner: str | None = None) -> HistoryView:
        """One page of the owner's history with fresh links, and local copies for the gallery.

        ``earlier_owner`` is the same user's key as an earlier version made it: its images are
        moved under ``owner`` first (once; a failure is logged and tried again next time)."""
        if isinstance(page, bool) or not isinstance(page, (int, float)) or page != int(page) or not 1 <= page <= 10_000:
            raise InvalidInputError(f"page: must be an integer from 1 to 10000, got {page!r}")
        if earlier_owner is not None and earlier_owner != owner and earlier_owner not in self._adopted:
            self._adopt(earlier_owner, owner)
        try:
            found = self.store.history(owner, page=int(page), page_size=self.page_size)
            found = dataclasses.replace(found, images=[self.with_input_links(image) for image in found.images])
            paths = list(self._fetch_pool.map(lambda image: self._gallery_copy(owner, image), found.images))
        except StorageError as error:
            raise StorageUnavailableError(f"history is unavailable right now: {error}") from error
        return HistoryView(page=found, png_paths=paths)

    def _adopt(self, earlier_owner: str, owner: str) -> None:
        try:
            moved = self.store.adopt(earlier_owner, owner)
        except StorageError as error:
            logger.warning("could not move an earlier history to its new owner key (%s); trying again later", error)
            return
        if moved:
            logger.info("moved %d images of an earlier history to its new owner key", moved)
        if len(self._adopted) >= _ADOPTED_REMEMBERED:
            self._adopted.clear()  # bounded; forgetting costs one listing on the next view
        self._adopted.add(earlier_owner)

    def _gallery_copy(self, owner: str, image: LinkedImage) -> Path:
        """A local copy for the gallery (Gradio serves only local files to its clients); cached by id."""
        return self._local_copy(owner, image.record.id)

    def _local_copy(self, owner: str, image_id: str) -> Path:
        path = self.gallery_dir / f"{image_id}.png"
        if not path.exists():
            self.gallery_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.store.fetch(owner, image_id))
        return path

    def input_copies(self, *, owner: str, record: Mapping[str, Any]) -> dict[str, Path]:
        """Local copies of the pictures one of ``owner``'s images was made from, by field
        (``init_image``, ``mask``), to put back into the form; only ``owner``'s are found."""
        try:
            return {
                name: self._local_copy(owner, str(record[name])) for name in ("init_image", "mask") if record.get(name)
            }
        except (StorageError, ValueError) as error:
            raise StorageUnavailableError(f"the picture it was made from is unavailable right now: {error}") from error


class InvalidInputError(UserFacingError):
    """A field is out of range."""


class BusyError(UserFacingError):
    """The queue is full or the server is stopping."""


class StorageUnavailableError(UserFacingError):
    """Storage failed and the spool could not take the image."""


class GenerationFailedError(UserFacingError):
    """The pipeline could not make the image (e.g. out of memory)."""


def _outcome_of(error: UserFacingError) -> Outcome:
    if isinstance(error, InvalidInputError):
        return Outcome.INVALID
    if isinstance(error, BusyError):
        return Outcome.REJECTED
    return Outcome.ERROR


def _input_pictures(request: GenerationRequest) -> dict[str, tuple[str, bytes]]:
    """A request's input pictures to store: field name -> (a new image id, PNG)."""
    pictures = {"init_image": request.init_image, "mask": request.mask}
    now = dt.datetime.now(dt.UTC)
    return {name: (new_image_id(now), picture.png) for name, picture in pictures.items() if picture is not None}


def _consume_outcome(outcome: asyncio.Future[Any]) -> None:
    """Read an abandoned request's outcome, so asyncio does not log it as never retrieved."""
    if not outcome.cancelled():
        outcome.exception()
