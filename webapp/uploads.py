"""Uploaded pictures (``init_image``, ``mask``): the only files the app takes, opened only this far.

Gradio's upload route stores what a client sends under a folder named by the file's SHA-256 (a
path nobody can know without the bytes). Gradio refuses a file over ``ROUTE_LIMIT`` times
``MAX_UPLOAD_BYTES`` (413) before storing it; one between the two limits is stored, then refused
by the request naming its field. ``UploadGuard`` bounds the route before Gradio reads a byte: a
body declared larger than two such files is refused, and each caller (browser cookie, else
client address) may send ``BUDGET_PER_MINUTE`` times ``MAX_UPLOAD_BYTES`` a minute (counted
by declared length; the mask painter uploads its layers on every stroke, so a count of
uploads would stop a painter long before a flood). The input
component hands the handler the file's path without decoding it (Gradio's own ``gr.Image``
would open it first); ``take_pictures`` reads each file within ``MAX_UPLOAD_BYTES`` and removes
it, so an upload lives until its request reads it (or Gradio's hourly cache sweep for one never
used). What the bytes are is judged by ``sd_pipeline.contract.images``, naming the field.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.requests import cookie_parser

from sd_pipeline.contract.errors import InvalidRequestError
from webapp.owners import OWNER_COOKIE, ASGIApp, Network, Receive, Scope, Send, client_address

PICTURE_FIELDS = ("init_image", "mask")
UPLOAD_ROUTE = "/gradio_api/upload"
BUDGET_PER_MINUTE = 32  # bytes a caller may upload a minute, in MAX_UPLOAD_BYTES
ROUTE_LIMIT = 2  # Gradio's own per-file limit, in MAX_UPLOAD_BYTES: past it, no field is named
_MULTIPART_ALLOWANCE = 64 * 1024  # boundaries and part headers around the files


def uploaded_picture(**options: Any) -> gr.Image:
    """A ``gr.Image`` (upload, paste, drop; ``handle_file`` in gradio_client) that hands on the uploaded
    file's path unopened: the app checks the bytes itself, before anything decodes them. (Its own
    ``preprocess`` opens the file first. Replaced on the instance: a subclass would make Gradio
    write a ``.pyi`` stub beside this module when it is imported.)"""
    component = gr.Image(type="filepath", **options)
    component.preprocess = _path_unopened
    return component


def _path_unopened(payload: Any) -> str | None:
    if payload is None:
        return None
    if payload.path is None:
        raise gr.Error("send pictures as files (gradio_client: handle_file(path))", print_exception=False)
    return str(payload.path)


def take_pictures(fields: Mapping[str, Any], *, max_bytes: int, remove: bool) -> dict[str, Any]:
    """``fields`` with each uploaded picture's path replaced by the file's bytes (at most
    ``max_bytes``, checked before reading); ``remove``: the file is deleted once read."""
    taken = dict(fields)
    for name in PICTURE_FIELDS:
        path = fields.get(name)
        if isinstance(path, str | Path) and str(path):
            taken[name] = _read(name, Path(path), max_bytes=max_bytes, remove=remove)
    return taken


def remove_pictures(fields: Mapping[str, Any]) -> None:
    """Remove the uploaded picture files ``fields`` name (a refused request's)."""
    for name in PICTURE_FIELDS:
        path = fields.get(name)
        if isinstance(path, str | Path) and str(path):
            _remove(Path(path))


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
        path.parent.rmdir()  # Gradio's folder for this upload, empty now


def _read(field: str, path: Path, *, max_bytes: int, remove: bool) -> bytes:
    try:
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise InvalidRequestError(field, f"must be at most {max_bytes} bytes, got {size}")
            return path.read_bytes()
        except OSError:
            raise InvalidRequestError(
                field, "the uploaded file is gone (used by an earlier request); upload it again"
            ) from None
    finally:
        if remove:
            _remove(path)


class UploadGuard:
    """Bounds Gradio's upload route: the body's declared length, and bytes per caller per minute."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        trusted_proxies: tuple[Network, ...] = (),
        budget_per_minute: int = BUDGET_PER_MINUTE,
    ) -> None:
        self.app = app
        self.max_body = 2 * ROUTE_LIMIT * max_bytes + _MULTIPART_ALLOWANCE
        self.trusted_proxies = trusted_proxies
        self.budget = budget_per_minute * max_bytes
        self._recent: dict[str, collections.deque[tuple[float, int]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith(UPLOAD_ROUTE):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        length = headers.get("content-length", "")  # none when chunked: Gradio's per-file limit still holds
        size = int(length) if length.isdigit() else self.max_body
        if size > self.max_body:
            await _refuse(send, 413, f"an upload must be at most {self.max_body} bytes")
            return
        if not self._admit(self._caller(scope, headers), size):
            await _refuse(send, 429, f"at most {self.budget} bytes of uploads a minute; try again shortly")
            return
        await self.app(scope, receive, send)

    def _caller(self, scope: Scope, headers: dict[str, str]) -> str:
        cookie = cookie_parser(headers.get("cookie", "")).get(OWNER_COOKIE)
        if cookie:
            return f"browser:{cookie}"
        host = scope["client"][0] if scope.get("client") else None
        return f"address:{client_address(host, headers.get('x-forwarded-for'), self.trusted_proxies)}"

    def _admit(self, caller: str, size: int) -> bool:
        now = time.monotonic()
        recent = self._recent.setdefault(caller, collections.deque())
        while recent and recent[0][0] < now - 60:
            recent.popleft()
        if sum(sent for _, sent in recent) + size > self.budget:
            return False
        recent.append((now, size))
        if len(self._recent) > 10_000:  # bounded: forget callers with nothing recent
            self._recent = {key: times for key, times in self._recent.items() if times}
        return True


async def _refuse(send: Send, status: int, message: str) -> None:
    body = message.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
