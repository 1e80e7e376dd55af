"""Whose history a request reads: the owner cookie survives other cookies on the same host."""

from __future__ import annotations

import asyncio
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.testclient import TestClient

from storage.keys import owner_key
from webapp.owners import OWNER_COOKIE, OwnerCookieMiddleware, caller_of
from webapp.uploads import UploadGuard

TOKEN = "A" * 43  # the length of secrets.token_urlsafe(32)
SECRET = b"s" * 32


def request_with_cookies(header: str) -> gr.Request:
    return gr.Request(
        headers={"cookie": header}, username=None, session_hash="api-session", client={"host": "10.1.2.3"}
    )


def test_an_unrelated_cookie_does_not_hide_the_owner_cookie() -> None:
    """``prefs={"theme":"dark"}`` made SimpleCookie drop the whole header: the history looked empty."""
    expected = owner_key(f"browser:{TOKEN}", SECRET)
    for header in (
        f"{OWNER_COOKIE}={TOKEN}",
        f'prefs={{"theme":"dark"}}; {OWNER_COOKIE}={TOKEN}',
        f'{OWNER_COOKIE}={TOKEN}; prefs={{"theme":"dark"}}; other=a b',
    ):
        assert owner_of(request_with_cookies(header)) == expected, header
    stranger = owner_of(request_with_cookies('prefs={"theme":"dark"}'))
    assert stranger == owner_key("session:api-session", SECRET)  # no owner cookie: the API session's own history


def owner_of(request: gr.Request) -> str:
    return caller_of(request, secret=SECRET, trusted_proxies=()).owner


def test_the_caller_is_the_login_first_and_an_anonymous_caller_has_an_address() -> None:
    login = gr.Request(
        headers={"cookie": f"{OWNER_COOKIE}={TOKEN}"}, username="ada", session_hash="s", client={"host": "10.1.2.3"}
    )
    caller = caller_of(login, secret=SECRET, trusted_proxies=())
    assert caller.owner == owner_key("user:ada", SECRET) and caller.address == ""
    assert caller.earlier_owner == owner_key("user:ada", None) != caller.owner
    anonymous = caller_of(request_with_cookies(f"{OWNER_COOKIE}={TOKEN}"), secret=None, trusted_proxies=())
    assert anonymous.earlier_owner is None and anonymous.owner == owner_key(f"browser:{TOKEN}", None)
    assert anonymous.address == "10.1.2.3"


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


def test_the_upload_guard_bounds_each_callers_bytes_a_minute_and_each_body() -> None:
    """Past its budget a caller gets 429 while another caller still uploads; a body declared past two
    files at Gradio's limit gets 413; neither reaches the app behind."""
    reached: list[str] = []
    app = FastAPI()

    @app.post("/gradio_api/upload")
    def upload() -> list[str]:
        reached.append("upload")
        return []

    guarded = TestClient(UploadGuard(app, max_bytes=1000, budget_per_minute=3))
    alice, bob = {"cookie": f"{OWNER_COOKIE}={TOKEN}"}, {"cookie": f"{OWNER_COOKIE}={'B' * 43}"}
    file = {"files": ("a.png", b"x" * 900)}
    statuses = [guarded.post("/gradio_api/upload", files=file, headers=alice).status_code for _ in range(4)]
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    assert guarded.post("/gradio_api/upload", files=file, headers=bob).status_code == 200
    big = guarded.post("/gradio_api/upload", files={"files": ("b.png", b"x" * 70_000)}, headers=bob)
    assert big.status_code == 413 and "at most" in big.text
    assert len(reached) == statuses.count(200) + 1
