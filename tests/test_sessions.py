"""Login sessions signed with the secret every front end shares: a user logged in on one front
end is logged in on another and after a restart; a forged, foreign or expired cookie is not."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import requests
from gradio_client import Client
from starlette.requests import Request

from storage.keys import owner_key
from storage.s3 import S3Settings, S3Store
from tests.app_server import launched_app
from tests.servers import S3Server
from tests.test_storage import make_record, small_png
from webapp.sessions import SESSION_COOKIE, Sessions

SECRET = "a shared secret of more than 32 bytes, from the test"


def request_with(cookie: str | None) -> Request:
    headers = [(b"cookie", f"{SESSION_COOKIE}={cookie}".encode())] if cookie else []
    return Request({"type": "http", "headers": headers, "method": "GET", "path": "/"})


def test_a_signed_session_names_its_user_until_it_expires() -> None:
    sessions = Sessions({"alice": "wonderland"}, SECRET.encode(), secure=False)
    assert sessions.check_password("alice", "wonderland") and not sessions.check_password("alice", "wonder")
    cookie = sessions.cookie_value("alice")
    assert sessions.user(request_with(cookie)) == "alice"
    assert sessions.user(request_with(None)) is None
    assert sessions.user(request_with(cookie[:-2] + "xx")) is None  # tampered
    other = Sessions({"alice": "wonderland"}, b"another secret of more than 32 bytes!!", secure=False)
    assert other.user(request_with(cookie)) is None  # signed by a front end with another secret
    gone = Sessions({"bob": "builder"}, SECRET.encode(), secure=False)
    assert gone.user(request_with(cookie)) is None  # alice is no longer a login
    short = Sessions({"alice": "wonderland"}, SECRET.encode(), secure=False, max_age=1)
    old = short.cookie_value("alice")
    time.sleep(2.1)
    assert short.user(request_with(old)) is None  # expired


def test_a_login_holds_on_another_front_end_and_after_a_restart(
    tiny_model_dir: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = f"sessions-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    env = {"APP_SECRET": SECRET, "AUTH_USERS": "alice:wonderland,bob:builder", "S3_BUCKET": bucket}
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
        _, theirs = Client(first.url, verbose=False, auth=("bob", "builder")).predict(1, api_name="/history")
        assert theirs["images"] == []
    with launched_app(tiny_model_dir, tmp_path / "three", env=env) as restarted:
        assert requests.get(restarted.url, cookies={SESSION_COOKIE: cookie}, allow_redirects=False).status_code == 200
        forged = requests.get(restarted.url, cookies={SESSION_COOKIE: cookie[:-2] + "xx"}, allow_redirects=False)
        assert forged.status_code == 303 and forged.headers["location"] == "/login"
