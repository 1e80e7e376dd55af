"""Debian's HAProxy on loopback in front of launched front ends, with the stack's balancing rules."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.app_server import RunningApp
from harness.servers import free_ports, wait_for_port


def haproxy_config(port: int, stats_port: int, front_ends: list[RunningApp]) -> str:
    """The stack's balancing rules (sticky cookie, /readyz on the side port) for these front ends."""
    servers = []
    for number, app in enumerate(front_ends):
        web = int(app.url.rstrip("/").rsplit(":", 1)[1])
        side = int(app.metrics_url.rsplit(":", 1)[1])
        servers.append(f"    server fe{number} 127.0.0.1:{web} cookie fe{number} check port {side}")
    return "\n".join(
        [
            "defaults",
            "    mode http",
            "    option forwardfor",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
            "frontend stats",
            f"    bind 127.0.0.1:{stats_port}",
            "    stats enable",
            "    stats uri /stats",
            "frontend web",
            f"    bind 127.0.0.1:{port}",
            "    http-request del-header X-Forwarded-For",
            "    default_backend front_ends",
            "backend front_ends",
            "    balance roundrobin",
            "    cookie SDFRONTEND insert indirect nocache httponly",
            "    option httpchk GET /readyz",
            "    http-check expect status 200",
            "    default-server inter 300ms fall 2 rise 1",
            *servers,
            "",
        ]
    )


@contextmanager
def running_haproxy(folder: Path, front_ends: list[RunningApp]) -> Iterator[tuple[str, str]]:
    port, stats_port = free_ports(2)
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config(port, stats_port, front_ends))
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{stats_port}/stats;csv"
    finally:
        process.terminate()
        process.wait(timeout=30)
