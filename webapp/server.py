"""The HTTP server: FastAPI with the signed-file route, Gradio mounted at ``/``, graceful stop."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from types import FrameType

import gradio as gr
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from storage.local import LINK_ROUTE, ForbiddenLinkError, LocalStore, NoSuchImageError
from webapp.dropping import DROP_FROM_PAGE_JS
from webapp.owners import ASGIApp, Network, OwnerCookieMiddleware
from webapp.sessions import Sessions
from webapp.ui import PAGE_CSS
from webapp.uploads import ROUTE_LIMIT, UploadGuard

logger = logging.getLogger(__name__)


def create_app(
    demo: gr.Blocks,
    *,
    local_store: LocalStore | None,
    sessions: Sessions | None,
    max_upload_bytes: int,
    trusted_proxies: tuple[Network, ...] = (),
    secure_cookies: bool = False,
) -> ASGIApp:
    """FastAPI app serving signed local files (when storing locally) and the Gradio page; its upload
    route takes pictures of at most ``max_upload_bytes`` (``webapp.uploads``)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if local_store is not None:
        store = local_store

        @app.get(LINK_ROUTE + "/{key:path}", include_in_schema=False)
        def signed_file(key: str, expires: str = "", signature: str = "") -> FileResponse:
            try:
                path = store.open_signed(key, expires=expires, signature=signature)
            except NoSuchImageError as error:
                raise HTTPException(status_code=404, detail=str(error)) from None
            except ForbiddenLinkError as error:
                raise HTTPException(status_code=403, detail=str(error)) from None
            return FileResponse(path, media_type="image/png", filename=path.name, content_disposition_type="inline")

    if sessions is not None:
        sessions.add_routes(app)

    gr.mount_gradio_app(
        app,
        demo,
        path="",
        auth_dependency=sessions.user if sessions is not None else None,
        max_file_size=ROUTE_LIMIT * max_upload_bytes,
        enable_monitoring=False,
        footer_links=["api"],
        show_error=True,
        ssr_mode=False,
        css=PAGE_CSS,
        js=DROP_FROM_PAGE_JS,
    )
    guarded = UploadGuard(app, max_bytes=max_upload_bytes, trusted_proxies=trusted_proxies)
    return OwnerCookieMiddleware(guarded, secure=secure_cookies)


class GracefulServer(uvicorn.Server):
    """On the first SIGTERM or Ctrl-C, run ``drain`` (finish work, flush) before stopping; a second forces."""

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None], on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain = drain
        self.on_started = on_started
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        logger.info("stop requested: finishing running work before exit")
        threading.Thread(target=self._drain_then_exit, name="graceful-stop", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self.drain()
        finally:
            self.should_exit = True
