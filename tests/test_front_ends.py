"""Two launched front ends on one DATA_DIR and one bucket, behind a real HAProxy (Debian's) on
loopback: S3 paused mid-run twice, every request through the balancer is served, both front ends
stay in rotation, every image reaches the bucket; a login made through one front end holds on
the other."""

from __future__ import annotations

import csv
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from gradio_client import Client

from harness.app_server import launched_app
from harness.balancer import running_haproxy
from harness.servers import S3Server, wait_until
from tests.needs import needed_program
from webapp.sessions import SESSION_COOKIE

SECRET = "the secret both front ends share, longer than 32 bytes"
FAST: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(autouse=True)
def haproxy_installed() -> None:
    needed_program("haproxy")


def servers_up(stats_url: str) -> dict[str, str]:
    rows = csv.DictReader(io.StringIO(requests.get(stats_url, timeout=5).text.lstrip("# ")))
    return {
        row["svname"]: row["status"] for row in rows if row["pxname"] == "front_ends" and row["svname"].startswith("fe")
    }


def test_two_front_ends_behind_haproxy_serve_through_s3_outages_and_share_logins(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    s3 = S3Server()
    s3.start()
    bucket = f"front-ends-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    shared = tmp_path / "shared-data"
    env = {"S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3.endpoint_url, "S3_REGION": "us-east-1", "APP_SECRET": SECRET}
    env |= {"AUTH_USERS": "alice:wonderland", "SPOOL_MAX_ITEMS": "1000"}
    args = ["--data-dir", str(shared), "--history-page-size", "20"]  # one DATA_DIR for both (the last wins)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        with (
            launched_app(tiny_model_dir, tmp_path / "a", env=env, args=args) as first,
            launched_app(tiny_model_dir, tmp_path / "b", env=env, args=args) as second,
            running_haproxy(tmp_path, [first, second]) as (balancer, stats),
        ):
            wait_until(lambda: set(servers_up(stats).values()) == {"UP"}, timeout=30)
            # Four clients through the balancer, spread round-robin, each kept on its front end by the cookie.
            clients = [Client(balancer, verbose=False, auth=("alice", "wonderland")) for _ in range(4)]
            served: list[dict[str, Any]] = []

            def one_round(label: str) -> None:
                for number, client in enumerate(clients):
                    _, result = client.predict(prompt=f"{label} {number}", **FAST, api_name="/generate")
                    served.extend(result["images"])

            one_round("before")
            assert (
                first.metric("sdapp_images_generated_total") > 0 and second.metric("sdapp_images_generated_total") > 0
            )
            for outage in ("first outage", "second outage"):
                s3.stop()
                one_round(outage)
                assert {image["status"] for image in served[-4:]} == {"pending"}
                for app in (first, second):  # in rotation: ready, with the outage as a detail
                    ready = requests.get(f"{app.metrics_url}/readyz", timeout=5)
                    assert ready.status_code == 200
                wait_until(lambda: set(servers_up(stats).values()) == {"UP"}, timeout=10)
                s3.start()
                wait_until(lambda: not any(path for path in (shared / "spool").iterdir()), timeout=120, interval=0.2)
            assert len(served) == 12
            _, history = clients[0].predict(1, api_name="/history")
            stored = {image["prompt"] for image in history["images"] if image["status"] == "stored"}
            assert len(stored) == 12  # every image in the bucket
            for image in served:
                assert requests.get(image["url"], timeout=10).status_code == 200
            # A login made through the balancer holds on either front end (only the secret is shared).
            session = clients[0].cookies[SESSION_COOKIE]
            for app in (first, second):
                page = requests.get(app.url, cookies={SESSION_COOKIE: session}, allow_redirects=False, timeout=10)
                assert page.status_code == 200
            for app in (first, second):  # neither uploader died of the other's work
                assert "spool uploader hit an unexpected error" not in app.log()
                assert "Traceback" not in app.log()
    finally:
        s3.stop()
