"""Login state every front end accepts: a signed cookie, not a token kept in one process's memory.

Gradio's own login keeps its tokens in memory under a random cookie name, so a user is logged
out whenever a balancer moves them or a front end restarts. Here ``POST /login`` (the form the
login page sends, and what ``gradio_client``'s ``auth=`` posts) sets a cookie signed with the
secret all front ends share (``itsdangerous``); Gradio asks ``user`` for each request through
its ``auth_dependency``. The cookie names the user, a session id and when it was made; it expires
after ``max_age`` and is refused once the user is no longer among the logins, once its session was
logged out, or once the user's password changed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from webapp.owners import address_of as request_address

SESSION_COOKIE = "sd_session"
APP_SECRET_FILE = ".app-secret"  # in DATA_DIR when APP_SECRET is not set
OWNER_SECRET_FILE = ".owner-secret"  # in DATA_DIR when OWNER_SECRET is not set
REVOKED_SESSIONS_DIR = "revoked-sessions"  # in DATA_DIR: sessions ended by a logout
SESSION_MAX_AGE = 7 * 24 * 3600
LOGIN_ROUTE = "/login"
LOGOUT_ROUTE = "/logout"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class RevokedSessions:
    """Session ids ended by a logout, one empty file each in a folder every front end on the same
    ``DATA_DIR`` shares; a file goes once the cookie it revokes would have expired anyway."""

    def __init__(self, folder: Path, *, max_age: int) -> None:
        self.folder = folder
        self.max_age = max_age

    def revoke(self, session_id: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / session_id).touch()
        self._prune()

    def is_revoked(self, session_id: str) -> bool:
        return (self.folder / session_id).exists()

    def _prune(self) -> None:
        oldest = time.time() - self.max_age
        for path in self.folder.iterdir():
            try:
                if path.stat().st_mtime < oldest:
                    path.unlink()
            except FileNotFoundError:
                pass  # another front end pruned it first


class LoginThrottle:
    """Failed logins in a sliding window, per user name and per client address: past the limit a
    login is refused (even a right one) until the oldest failure leaves the window."""

    def __init__(
        self,
        *,
        per_user: int = 5,
        per_address: int = 20,
        window_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"user": per_user, "address": per_address}
        self.window = window_seconds
        self.clock = clock
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, *, user: str, address: str) -> float:
        """Seconds until a login for this user from this address is tried again (0: now)."""
        with self._lock:
            return max(self._wait(("user", user)), self._wait(("address", address)))

    def failed(self, *, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key in (("user", user), ("address", address)):
                self._failures.setdefault(key, deque(maxlen=self.limits[key[0]])).append(now)
                self._failures.move_to_end(key)
            while len(self._failures) > 10_000:  # bounded, whatever a script sends
                self._failures.popitem(last=False)

    def _wait(self, key: tuple[str, str]) -> float:
        times = self._failures.get(key)
        if times is None or len(times) < self.limits[key[0]]:
            return 0.0
        return max(0.0, times[0] + self.window - self.clock())


class Sessions:
    """Checks passwords, signs session cookies and reads them back.

    A cookie names its user, a random session id and a fingerprint of the user's password: a
    logout revokes its session id (in ``revoked``), and a password change ends every session
    made with the old password."""

    def __init__(
        self,
        logins: Mapping[str, str],
        secret: bytes,
        *,
        secure: bool,
        revoked: RevokedSessions,
        max_age: int = SESSION_MAX_AGE,
        throttle: LoginThrottle | None = None,
        address_of: Callable[[Request], str] | None = None,
    ) -> None:
        self.logins = dict(logins)
        self.secure = secure
        self.max_age = max_age
        self.revoked = revoked
        self.throttle = throttle if throttle is not None else LoginThrottle()
        # Who is calling (default: the connection's address; the app passes its TRUSTED_PROXIES rule).
        self.address_of = address_of or functools.partial(request_address, trusted_proxies=())
        self._secret = secret
        self._signer = URLSafeTimedSerializer(secret, salt="sd-service login session")

    def check_password(self, username: str, password: str) -> bool:
        """Whether the pair is a login (compared in constant time)."""
        expected = self.logins.get(username)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def cookie_value(self, username: str) -> str:
        session = {"user": username, "sid": secrets.token_urlsafe(16), "pw": self._fingerprint(username)}
        return self._signer.dumps(session)

    def session_of(self, request: Request) -> dict[str, str] | None:
        """The request's live session (user, id), or None: missing, forged, expired, logged out, or
        made before the user's password changed."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            data = self._signer.loads(token, max_age=self.max_age)
        except BadSignature:  # tampered, signed with another secret, or expired
            return None
        if not isinstance(data, dict):
            return None
        username, session_id, fingerprint = data.get("user"), data.get("sid"), data.get("pw")
        if not (isinstance(username, str) and username in self.logins):
            return None
        if not (isinstance(session_id, str) and _SESSION_ID.match(session_id)) or self.revoked.is_revoked(session_id):
            return None
        if not (isinstance(fingerprint, str) and hmac.compare_digest(fingerprint, self._fingerprint(username))):
            return None
        return {"user": username, "sid": session_id}

    def user(self, request: Request) -> str | None:
        """The logged-in user of a request (Gradio's ``auth_dependency``), or None."""
        session = self.session_of(request)
        return session["user"] if session is not None else None

    def set_cookie(self, response: Response, username: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            self.cookie_value(username),
            max_age=self.max_age,
            httponly=True,
            secure=self.secure,
            samesite="lax",
        )

    def _fingerprint(self, username: str) -> str:
        password = self.logins.get(username, "")
        message = f"password\0{username}\0{password}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def add_routes(self, app: FastAPI) -> None:
        """``GET/POST /login`` and ``GET/POST /logout`` on the app (before Gradio's routes, which they replace)."""

        @app.get(LOGIN_ROUTE, include_in_schema=False)
        def login_page(failed: bool = False) -> HTMLResponse:
            return HTMLResponse(_login_form(failed=failed))

        @app.post(LOGIN_ROUTE, include_in_schema=False)
        def login(request: Request, username: str = Form(""), password: str = Form("")) -> Response:
            if not same_site(request):
                return JSONResponse({"detail": "Cross-site login refused."}, status_code=403)
            username = username.strip()
            address = self.address_of(request)
            wait = self.throttle.retry_after(user=username, address=address)
            if wait > 0:
                detail = f"Too many failed logins: try again in {int(wait) + 1} s."
                return JSONResponse({"detail": detail}, status_code=429, headers={"Retry-After": str(int(wait) + 1)})
            wants_page = "text/html" in request.headers.get("accept", "")
            if not self.check_password(username, password):
                self.throttle.failed(user=username, address=address)
                if wants_page:
                    return RedirectResponse(f"{LOGIN_ROUTE}?failed=true", status_code=303)
                return JSONResponse({"detail": "Incorrect credentials."}, status_code=401)
            response: Response = (
                RedirectResponse("/", status_code=303) if wants_page else JSONResponse({"success": True})
            )
            self.set_cookie(response, username)
            return response

        @app.api_route(LOGOUT_ROUTE, methods=["GET", "POST"], include_in_schema=False)
        def logout(request: Request) -> RedirectResponse:
            session = self.session_of(request)
            if session is not None:
                self.revoked.revoke(session["sid"])  # a copy of the cookie kept elsewhere stops working too
            response = RedirectResponse(LOGIN_ROUTE, status_code=303)
            response.delete_cookie(SESSION_COOKIE, httponly=True, secure=self.secure, samesite="lax")
            return response

        @app.middleware("http")
        async def login_first(request: Request, call_next):  # type: ignore[no-untyped-def]
            """A browser opening the page without a session goes to the login form (Gradio would answer 401)."""
            if request.method == "GET" and request.url.path == "/" and self.user(request) is None:
                return RedirectResponse(LOGIN_ROUTE, status_code=303)
            return await call_next(request)


def same_site(request: Request) -> bool:
    """Whether a form post comes from this site: its ``Origin`` (else ``Referer``) names the host the
    request was sent to. A post with neither (``gradio_client``, curl) is no browser's cross-site post."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return True
    host = request.headers.get("host", "")
    return bool(host) and urlsplit(source).netloc.lower() == host.lower()


def _login_form(*, failed: bool) -> str:
    notice = '<p role="alert" class="failed">Wrong user name or password.</p>' if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · sd-service</title>
<style>body{{font-family:system-ui,sans-serif;display:grid;place-items:center;min-height:90vh}}
form{{display:grid;gap:.6rem;min-width:16rem}}input,button{{font-size:1rem;padding:.5rem}}.failed{{color:#b00}}</style>
</head><body><form method="post" action="{html.escape(LOGIN_ROUTE)}">
<h1>Text to image</h1>{notice}
<label>User name <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>"""
