"""Whose history a request reads: the owner cookie survives other cookies on the same host."""

from __future__ import annotations

import asyncio
from typing import Any

import gradio as gr

from webapp.owners import OWNER_COOKIE, OwnerCookieMiddleware, resolve_owner
from webapp.ui import owner_of

TOKEN = "A" * 43  # the length of secrets.token_urlsafe(32)
SECRET = b"s" * 32


def request_with_cookies(header: str) -> gr.Request:
    return gr.Request(headers={"cookie": header}, username=None, session_hash="api-session")


def test_an_unrelated_cookie_does_not_hide_the_owner_cookie() -> None:
    """``prefs={"theme":"dark"}`` made SimpleCookie drop the whole header: the history looked empty."""
    expected = resolve_owner(username=None, cookie=TOKEN, session_hash="api-session", secret=SECRET)
    for header in (
        f"{OWNER_COOKIE}={TOKEN}",
        f'prefs={{"theme":"dark"}}; {OWNER_COOKIE}={TOKEN}',
        f'{OWNER_COOKIE}={TOKEN}; prefs={{"theme":"dark"}}; other=a b',
    ):
        assert owner_of(request_with_cookies(header), SECRET) == expected, header
    stranger = owner_of(request_with_cookies('prefs={"theme":"dark"}'), SECRET)
    assert stranger != expected  # no owner cookie: the API session's own history


def test_the_middleware_keeps_an_owner_cookie_sent_beside_odd_ones() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def record(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {}

    middleware = OwnerCookieMiddleware(app)
    for header, issues_cookie in (
        (f'prefs={{"theme":"dark"}}; {OWNER_COOKIE}={TOKEN}', False),
        (f"x{OWNER_COOKIE}={TOKEN}", True),  # another cookie whose name only ends the same
    ):
        sent.clear()
        scope = {"type": "http", "headers": [(b"cookie", header.encode())]}
        asyncio.run(middleware(scope, receive, record))
        headers = sent[0]["headers"]
        assert any(name == b"set-cookie" for name, _ in headers) == issues_cookie, header
