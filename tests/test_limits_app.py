"""Limits a script cannot escape, through the launched app: fresh anonymous sessions from one
address share that address's limit; behind a trusted proxy each forwarded client has its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client

from harness.app_server import launched_app
from harness.servers import wait_until
from webapp.owners import client_address, parse_networks

SLOW: dict[str, Any] = {"steps": 100, "width": 256, "height": 256}  # still running while the others are refused


def test_the_client_address_comes_from_x_forwarded_for_only_through_a_trusted_proxy() -> None:
    proxies = parse_networks("127.0.0.1, 10.0.0.0/8")
    assert client_address("198.51.100.9", None, proxies) == "198.51.100.9"
    assert client_address("198.51.100.9", "203.0.113.1", proxies) == "198.51.100.9"  # not a proxy: ignored
    assert client_address("127.0.0.1", "203.0.113.1", proxies) == "203.0.113.1"
    # A client may prepend anything; the proxies append what they saw: the nearest untrusted hop counts.
    assert client_address("127.0.0.1", "6.6.6.6, 203.0.113.1, 10.1.2.3", proxies) == "203.0.113.1"
    assert client_address("127.0.0.1", None, proxies) == "127.0.0.1"
    with pytest.raises(ValueError):
        parse_networks("not-an-address")


def test_forty_fresh_sessions_from_one_address_share_its_limit(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--max-requests-per-address", "2", "--trusted-proxies", "127.0.0.1", "--queue-max-size", "64"]
    with launched_app(tiny_model_dir, tmp_path, args=args) as app:
        clients = [Client(app.url, verbose=False, download_files=str(tmp_path / f"c{n}")) for n in range(40)]
        jobs = [client.submit(prompt=f"session {n}", **SLOW, api_name="/generate") for n, client in enumerate(clients)]
        wait_until(lambda: sum(job.done() for job in jobs) >= 38, timeout=120, interval=0.1)
        refused = [job for job in jobs if job.done()]
        running = [job for job in jobs if not job.done()]
        assert len(refused) == 38 and len(running) == 2
        for job in refused:
            with pytest.raises(Exception, match="requests from your address are in progress without login"):
                job.result(timeout=10)
        # Behind a trusted proxy (here: loopback), each forwarded client is its own address.
        forwarded = [
            Client(app.url, verbose=False, headers={"X-Forwarded-For": f"203.0.113.{n}"}, download_files=str(tmp_path))
            for n in (1, 2)
        ]
        others = [
            client.submit(prompt="elsewhere", steps=2, width=64, height=64, api_name="/generate")
            for client in forwarded
        ]
        assert all(job.result(timeout=120)[1]["images"] for job in others)
        for job in running:
            job.cancel()
