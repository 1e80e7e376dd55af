"""Login sessions signed with the secret every front end shares: a user logged in on one front
end is logged in on another and after a restart; a forged, foreign or expired cookie is not."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gradio_client import Client
from starlette.requests import Request

from harness.app_server import launched_app
from harness.servers import S3Server, wait_until
from storage.keys import owner_key
from storage.s3 import S3Settings, S3Store
from tests.test_storage import make_record, small_png
from webapp.sessions import SESSION_COOKIE, SESSION_MAX_AGE, LoginThrottle, RevokedSessions, Sessions

SECRET = "a shared secret of more than 32 bytes, from the test"


def request_with(cookie: str | None) -> Request:
    headers = [(b"cookie", f"{SESSION_COOKIE}={cookie}".encode())] if cookie else []
    return Request({"type": "http", "headers": headers, "method": "GET", "path": "/"})


def tampered(cookie: str) -> str:
    """The cookie with one signature character changed. Not the last ones: the final base64
    character of an HMAC carries padding bits, so changing it can leave the signature valid."""
    at = len(cookie) - 6
    return cookie[:at] + ("A" if cookie[at] != "A" else "B") + cookie[at + 1 :]


def make_sessions(logins: dict[str, str], secret: bytes, folder: Path, **options: Any) -> Sessions:
    revoked = RevokedSessions(folder / "revoked", max_age=SESSION_MAX_AGE)
    return Sessions(logins, secret, secure=False, revoked=revoked, **options)


def test_a_signed_session_names_its_user_until_it_expires(tmp_path: Path) -> None:
    sessions = make_sessions({"alice": "wonderland"}, SECRET.encode(), tmp_path)
    assert sessions.check_password("alice", "wonderland") and not sessions.check_password("alice", "wonder")
    cookie = sessions.cookie_value("alice")
    assert sessions.user(request_with(cookie)) == "alice"
    assert sessions.user(request_with(None)) is None
    assert sessions.user(request_with(tampered(cookie))) is None  # tampered
    other = make_sessions({"alice": "wonderland"}, b"another secret of more than 32 bytes!!", tmp_path)
    assert other.user(request_with(cookie)) is None  # signed by a front end with another secret
    gone = make_sessions({"bob": "the-builder"}, SECRET.encode(), tmp_path)
    assert gone.user(request_with(cookie)) is None  # alice is no longer a login
    changed = make_sessions({"alice": "a new password"}, SECRET.encode(), tmp_path)
    assert changed.user(request_with(cookie)) is None  # made with the password alice no longer has
    assert changed.user(request_with(changed.cookie_value("alice"))) == "alice"
    short = make_sessions({"alice": "wonderland"}, SECRET.encode(), tmp_path, max_age=1)
    old = short.cookie_value("alice")
    wait_until(lambda: short.user(request_with(old)) is None, timeout=10, interval=0.1)  # expired


def login_app(sessions: Sessions) -> TestClient:
    app = FastAPI()
    sessions.add_routes(app)

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, str | None]:
        return {"user": sessions.user(request)}

    return TestClient(app, base_url="http://app.example")


def test_a_logout_ends_the_session_everywhere_and_other_sessions_go_on(tmp_path: Path) -> None:
    secret = SECRET.encode()
    one, two = (login_app(make_sessions({"alice": "wonderland"}, secret, tmp_path)) for _ in range(2))
    for browser in (one, two):
        assert browser.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
    stolen = one.cookies[SESSION_COOKIE]
    assert one.get("/logout", follow_redirects=False).status_code == 303
    # A copy of the cookie (stolen, or kept by another front end on the same DATA_DIR) is no longer a login.
    thief = login_app(make_sessions({"alice": "wonderland"}, secret, tmp_path))
    assert thief.get("/whoami", cookies={SESSION_COOKIE: stolen}).json() == {"user": None}
    assert two.get("/whoami").json() == {"user": "alice"}  # her other browser stays logged in


def test_a_cross_site_login_is_refused() -> None:
    """Login CSRF: a page elsewhere must not log a visitor into an account of its choosing."""
    browser = login_app(make_sessions({"alice": "wonderland"}, SECRET.encode(), Path(tempfile.mkdtemp())))
    form = {"username": "alice", "password": "wonderland"}
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {"Origin": "null"}):
        refused = browser.post("/login", data=form, headers=headers)
        assert refused.status_code == 403 and SESSION_COOKIE not in refused.cookies, headers
    for headers in ({"Origin": "http://app.example"}, {"Referer": "http://app.example/login"}, {}):
        assert browser.post("/login", data=form, headers=headers).status_code == 200, headers


def test_failed_logins_are_throttled_per_user_and_per_address(tmp_path: Path) -> None:
    now = [1000.0]
    throttle = LoginThrottle(per_user=3, per_address=5, window_seconds=60, clock=lambda: now[0])
    addresses = iter(f"10.0.0.{n}" for n in range(1, 100))
    current = ["10.0.0.99"]
    sessions = make_sessions(
        {"alice": "wonderland", "bob": "the-builder"},
        SECRET.encode(),
        tmp_path,
        throttle=throttle,
        address_of=lambda request: current[0],
    )
    browser = login_app(sessions)

    def login(user: str, password: str, address: str) -> int:
        current[0] = address
        return browser.post("/login", data={"username": user, "password": password}).status_code

    assert [login("alice", "guess", next(addresses)) for _ in range(3)] == [401, 401, 401]
    refused = login("alice", "wonderland", next(addresses))  # even the right password, from anywhere
    assert refused == 429
    assert login("bob", "the-builder", next(addresses)) == 200  # another user is not locked out
    now[0] += 61
    assert login("alice", "wonderland", next(addresses)) == 200  # the window has passed
    assert [login(f"user{n}", "guess", "10.1.1.1") for n in range(5)] == [401] * 5  # one address, many names
    assert login("bob", "the-builder", "10.1.1.1") == 429
    assert login("bob", "the-builder", "10.1.1.2") == 200


def test_a_login_holds_on_another_front_end_and_after_a_restart(
    tiny_model_dir: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = f"sessions-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    env = {"APP_SECRET": SECRET, "AUTH_USERS": "alice:wonderland,bob:the-builder", "S3_BUCKET": bucket}
    env |= {"S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    for name in ("one", "two", "three"):
        (tmp_path / name).mkdir()
    # Alice's history from before owner keys were keyed (the unkeyed hash of her login name).
    earlier = S3Store.from_settings(S3Settings(bucket=bucket, endpoint_url=s3_server.endpoint_url, region="us-east-1"))
    earlier.save(small_png(), make_record(owner_key("user:alice"), prompt="from the old version"))
    with launched_app(tiny_model_dir, tmp_path / "one", env=env) as first:
        browser = requests.Session()
        assert browser.get(first.url, allow_redirects=False).headers["location"] == "/login"
        logged_in = browser.post(
            first.url + "login",
            data={"username": "alice", "password": "wonderland"},
            headers={"Accept": "text/html"},
            allow_redirects=False,
        )
        assert logged_in.status_code == 303 and logged_in.headers["location"] == "/"
        cookie = browser.cookies[SESSION_COOKIE]
        set_cookie = logged_in.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=lax" in set_cookie
        wrong = browser.post(first.url + "login", data={"username": "alice", "password": "x"}, allow_redirects=False)
        assert wrong.status_code == 401
        assert browser.get(first.url, allow_redirects=False).status_code == 200
        with launched_app(tiny_model_dir, tmp_path / "two", env=env) as second:
            # The cookie from the first front end is a login on the second: generate there as alice.
            assert requests.get(second.url, cookies={SESSION_COOKIE: cookie}, allow_redirects=False).status_code == 200
            alice = Client(second.url, verbose=False, headers={"Cookie": f"{SESSION_COOKIE}={cookie}"})
            alice.predict(prompt="drawn on the second", steps=2, width=64, height=64, api_name="/generate")
        _, history = Client(first.url, verbose=False, auth=("alice", "wonderland")).predict(1, api_name="/history")
        assert [image["prompt"] for image in history["images"]] == ["drawn on the second", "from the old version"]
        assert requests.get(history["images"][1]["url"], timeout=10).status_code == 200  # moved, and linked
        assert all(owner_key("user:alice") not in image["url"] for image in history["images"])
        _, theirs = Client(first.url, verbose=False, auth=("bob", "the-builder")).predict(1, api_name="/history")
        assert theirs["images"] == []
    same_folder = ["--data-dir", str(tmp_path / "three" / "data")]  # for both starts below
    with launched_app(tiny_model_dir, tmp_path / "three", env=env, args=same_folder) as restarted:
        assert requests.get(restarted.url, cookies={SESSION_COOKIE: cookie}, allow_redirects=False).status_code == 200
        forged = requests.get(restarted.url, cookies={SESSION_COOKIE: tampered(cookie)}, allow_redirects=False)
        assert forged.status_code == 303 and forged.headers["location"] == "/login"
    rotated = {**env, "APP_SECRET": "a rotated secret, also more than 32 bytes long"}
    with launched_app(tiny_model_dir, tmp_path / "three", env=rotated, args=same_folder) as after_rotation:
        # Rotating APP_SECRET ends every session, and no history: owner keys stay on DATA_DIR/.owner-secret.
        ended = requests.get(after_rotation.url, cookies={SESSION_COOKIE: cookie}, allow_redirects=False)
        assert ended.status_code == 303 and ended.headers["location"] == "/login"
        alice_again = Client(after_rotation.url, verbose=False, auth=("alice", "wonderland"))
        _, kept = alice_again.predict(1, api_name="/history")
        assert [image["prompt"] for image in kept["images"]] == ["drawn on the second", "from the old version"]
