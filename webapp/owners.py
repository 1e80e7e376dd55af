"""Whose history is this? The login name, else the browser's cookie, else the API client's session."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import cookie_parser

from storage.keys import owner_key

OWNER_COOKIE = "sd_owner"
COOKIE_MAX_AGE = 400 * 24 * 3600  # the longest browsers keep a cookie
_TOKEN_LENGTH = 43  # secrets.token_urlsafe(32)


def identity_of(*, username: str | None, cookie: str | None, session_hash: str | None) -> str:
    """Who made a request: the login, else the browser's cookie, else the API client's session."""
    if username:
        return f"user:{username}"
    if cookie and len(cookie) == _TOKEN_LENGTH:
        return f"browser:{cookie}"
    if session_hash:
        return f"session:{session_hash}"
    raise ValueError("request has no user, browser cookie or session")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> list[Network]:
    """``TRUSTED_PROXIES``: comma-separated addresses or networks (``10.0.0.5, 172.16.0.0/12``)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def client_address(host: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """Who is calling: the connection's address, or, when that is a trusted proxy, the nearest
    address in ``X-Forwarded-For`` that is not one (a client can prepend anything, never append)."""
    hops = [hop.strip() for hop in (forwarded_for or "").split(",") if hop.strip()]
    address = host or ""
    while _is_trusted(address, trusted) and hops:
        address = hops.pop()
    return address


def address_of(request: Any, trusted_proxies: Sequence[Network]) -> str:
    """The client address of a Starlette or Gradio request (``X-Forwarded-For`` only from a trusted proxy)."""
    host = request.client.host if request.client else None
    forwarded = request.headers.get("x-forwarded-for") if request.headers else None
    return client_address(host, forwarded, trusted_proxies)


@dataclass(frozen=True)
class Caller:
    """Who made a request, as the service needs it: whose history, and whose limits."""

    owner: str  # the storage owner key of their history
    earlier_owner: str | None  # their key before owner keys were keyed with a secret (moved once); None: no secret
    address: str  # the client address an anonymous caller's requests share a limit and a turn by; "" when logged in


def caller_of(request: Any, *, secret: bytes | None, trusted_proxies: Sequence[Network]) -> Caller:
    """The one answer to "who is this?" for a Gradio request: the login, else the browser's owner
    cookie, else the API client's session (distinct identities never share an owner key)."""
    cookie_header = request.headers.get("cookie") if request.headers else None
    # Starlette's lenient parser: SimpleCookie drops the whole header over one cookie it dislikes
    # (say prefs={"theme":"dark"} set by another app on the host), and the history with it.
    cookie = cookie_parser(cookie_header).get(OWNER_COOKIE) if cookie_header else None
    identity = identity_of(username=request.username, cookie=cookie, session_hash=request.session_hash)
    return Caller(
        owner=owner_key(identity, secret),
        earlier_owner=owner_key(identity, None) if secret is not None else None,
        address="" if request.username else address_of(request, trusted_proxies),
    )


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class OwnerCookieMiddleware:
    """Gives every browser a random, HttpOnly owner cookie the first time it loads anything."""

    def __init__(self, app: ASGIApp, *, secure: bool = False) -> None:
        self.app = app
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _has_cookie(scope):
            await self.app(scope, receive, send)
            return
        cookie = f"{OWNER_COOKIE}={secrets.token_urlsafe(32)}; Max-Age={COOKIE_MAX_AGE}; Path=/; HttpOnly; SameSite=Lax"
        if self.secure:
            cookie += "; Secure"

        async def send_with_cookie(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _has_cookie(scope: Scope) -> bool:
    return any(
        name == b"cookie" and OWNER_COOKIE in cookie_parser(value.decode("latin-1"))
        for name, value in scope.get("headers", [])
    )
