"""Login state every front end accepts: a signed cookie, not a token kept in one process's memory.

Gradio's own login keeps its tokens in memory under a random cookie name, so a user is logged
out whenever a balancer moves them or a front end restarts. Here ``POST /login`` (the form the
login page sends, and what ``gradio_client``'s ``auth=`` posts) sets a cookie signed with the
secret all front ends share (``itsdangerous``); Gradio asks ``user`` for each request through
its ``auth_dependency``. The cookie names the user and when it was made; it expires after
``max_age`` and is refused once the user is no longer among the logins.
"""

from __future__ import annotations

import hmac
import html
from collections.abc import Mapping

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "sd_session"
APP_SECRET_FILE = ".app-secret"  # in DATA_DIR when APP_SECRET is not set
SESSION_MAX_AGE = 7 * 24 * 3600
LOGIN_ROUTE = "/login"
LOGOUT_ROUTE = "/logout"


class Sessions:
    """Checks passwords, signs session cookies and reads them back."""

    def __init__(
        self, logins: Mapping[str, str], secret: bytes, *, secure: bool, max_age: int = SESSION_MAX_AGE
    ) -> None:
        self.logins = dict(logins)
        self.secure = secure
        self.max_age = max_age
        self._signer = URLSafeTimedSerializer(secret, salt="sd-service login session")

    def check_password(self, username: str, password: str) -> bool:
        """Whether the pair is a login (compared in constant time)."""
        expected = self.logins.get(username)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def cookie_value(self, username: str) -> str:
        return self._signer.dumps({"user": username})

    def user(self, request: Request) -> str | None:
        """The logged-in user of a request (Gradio's ``auth_dependency``), or None."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            data = self._signer.loads(token, max_age=self.max_age)
        except BadSignature:  # tampered, signed with another secret, or expired
            return None
        username = data.get("user") if isinstance(data, dict) else None
        return username if isinstance(username, str) and username in self.logins else None

    def set_cookie(self, response: Response, username: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            self.cookie_value(username),
            max_age=self.max_age,
            httponly=True,
            secure=self.secure,
            samesite="lax",
        )

    def add_routes(self, app: FastAPI) -> None:
        """``GET/POST /login`` and ``GET /logout`` on the app (before Gradio's routes, which they replace)."""

        @app.get(LOGIN_ROUTE, include_in_schema=False)
        def login_page(failed: bool = False) -> HTMLResponse:
            return HTMLResponse(_login_form(failed=failed))

        @app.post(LOGIN_ROUTE, include_in_schema=False)
        def login(request: Request, username: str = Form(""), password: str = Form("")) -> Response:
            wants_page = "text/html" in request.headers.get("accept", "")
            if not self.check_password(username.strip(), password):
                if wants_page:
                    return RedirectResponse(f"{LOGIN_ROUTE}?failed=true", status_code=303)
                return JSONResponse({"detail": "Incorrect credentials."}, status_code=401)
            response: Response = (
                RedirectResponse("/", status_code=303) if wants_page else JSONResponse({"success": True})
            )
            self.set_cookie(response, username.strip())
            return response

        @app.get(LOGOUT_ROUTE, include_in_schema=False)
        def logout() -> RedirectResponse:
            response = RedirectResponse(LOGIN_ROUTE, status_code=303)
            response.delete_cookie(SESSION_COOKIE, httponly=True, secure=self.secure, samesite="lax")
            return response

        @app.middleware("http")
        async def login_first(request: Request, call_next):  # type: ignore[no-untyped-def]
            """A browser opening the page without a session goes to the login form (Gradio would answer 401)."""
            if request.method == "GET" and request.url.path == "/" and self.user(request) is None:
                return RedirectResponse(LOGIN_ROUTE, status_code=303)
            return await call_next(request)


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
