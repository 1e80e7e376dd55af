"""A light load generator: Gradio's HTTP API (POST /gradio_api/call/NAME, then its event stream)
from asyncio tasks sharing one httpx client, so that on a small machine the harness takes little
of the CPU the server needs (a gradio_client per simulated user costs the server's own order of
CPU per request). Same measures as ``bench.serving.drive``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from bench.common import median, percentile

# Every user of a harness reaches the app from 127.0.0.1 without a login, so the app's per-address
# limit would count them all together: an app a benchmark drives lifts its limits, so that the
# benchmark measures the serving path, not the limits.
HARNESS_LIMITS = {"MAX_REQUESTS_PER_ADDRESS": "100000", "MAX_REQUESTS_PER_USER": "100000"}

Fields = Callable[[int], Mapping[str, Any]]  # a request number -> the fields it sets (others: the API's defaults)


def api_defaults(url: str, api_name: str) -> list[tuple[str, Any]]:
    """The endpoint's parameters in order, with their documented defaults (from /gradio_api/info)."""
    info = httpx.get(f"{url.rstrip('/')}/gradio_api/info", timeout=30).json()
    parameters = info["named_endpoints"][f"/{api_name}"]["parameters"]
    return [(p["parameter_name"], p.get("parameter_default")) for p in parameters]


async def call(client: httpx.AsyncClient, url: str, api_name: str, data: list[Any], *, session: str) -> list[Any]:
    """One request through Gradio's queue in ``session`` (as a browser or gradio_client keeps one);
    the final output, or RuntimeError with the app's message."""
    base = f"{url.rstrip('/')}/gradio_api/call/{api_name}"
    started = await client.post(base, json={"data": data, "session_hash": session})
    started.raise_for_status()
    event_id = started.json()["event_id"]
    event = ""
    async with client.stream("GET", f"{base}/{event_id}") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.removeprefix("data:").strip() or "null")
                if event == "error":
                    raise RuntimeError(f"{api_name}: {payload}")
                return list(payload)
    raise RuntimeError(f"{api_name}: the event stream ended without a result")


def drive_http(
    url: str, *, clients: int, per_client: int, fields: Fields, api_name: str = "generate"
) -> dict[str, float]:
    """``clients`` concurrent users, each making ``per_client`` requests in a row; images/s and latencies."""
    parameters = api_defaults(url, api_name)

    async def user(number: int, latencies: list[float]) -> None:
        # A client of its own per user: its cookies keep it on one front end behind a balancer.
        async with httpx.AsyncClient(timeout=600) as client:
            for request in range(per_client):
                chosen = fields(number * 1000 + request)
                data = [chosen.get(name, default) for name, default in parameters]
                began = time.perf_counter()
                await call(client, url, api_name, data, session=f"bench-user-{number}")
                latencies.append(time.perf_counter() - began)

    async def run() -> tuple[list[float], float]:
        latencies: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(user(n, latencies) for n in range(clients)))
        return latencies, time.perf_counter() - started

    latencies, wall = asyncio.run(run())
    return {
        "images_per_s": len(latencies) / wall,
        "p50_s": median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "wall_s": wall,
    }
