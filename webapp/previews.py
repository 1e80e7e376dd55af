"""Live previews on their way from the backend's thread to one request's event stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sd_pipeline.contract.jobs import Preview


class LatestPreview:
    """The newest preview of one request, handed from any thread to the request's coroutine.

    Only the latest counts: a preview the client has not been sent yet is replaced by a newer one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._latest: Preview | None = None
        self._arrived = asyncio.Event()

    def put(self, preview: Preview) -> None:
        """From the backend's thread."""
        self._loop.call_soon_threadsafe(self._keep, preview)

    def _keep(self, preview: Preview) -> None:
        self._latest = preview
        self._arrived.set()

    async def until(self, running: asyncio.Future[Any]) -> AsyncIterator[Preview]:
        """Each newest preview as it arrives, until ``running`` is done (its result then follows)."""
        while not running.done():
            waiting = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the stream is closed mid-wait (the user pressed Stop)
                waiting.cancel()
            if self._latest is not None and not running.done():
                preview, self._latest = self._latest, None
                self._arrived.clear()
                yield preview
