"""Recovery from a dead or stalled pipeline worker, measured against the launched app.

    python -m bench.recovery [--model DIR] [--repeats 3] [--out DIR]

Launches the real app (local storage) on the tiny model and, ``--repeats`` times each:
kills the idle worker and times kill -> next image served and kill -> /readyz 200; kills
the worker three steps into a 40-step request and reports what the retry added to that
request; stops (SIGSTOP) the worker mid-request and reports the same with a 3 s stall
timeout. Prints a table and writes bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from gradio_client import Client

from bench.common import machine, median, table, write_json
from harness.app_server import RunningApp, launched_app
from sd_pipeline.tiny import build_tiny_pipeline

FAST: dict[str, Any] = {"steps": 1, "width": 64, "height": 64, "scheduler": "Euler", "seed": 1}
LONG: dict[str, Any] = {"steps": 40, "width": 128, "height": 128, "scheduler": "Euler", "seed": 2}
STALL_SECONDS = 3


def wait_until(condition: Callable[[], bool], *, timeout: float = 300.0) -> float:
    """Seconds until ``condition`` held."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.01)
    return time.perf_counter() - started


def ready(app: RunningApp) -> bool:
    return requests.get(f"{app.metrics_url}/readyz", timeout=5).status_code == 200


def idle_kill(app: RunningApp, client: Client) -> tuple[float, float]:
    """Kill the idle worker; seconds until the next image is served and until /readyz is 200."""
    worker = app.worker()
    assert worker is not None
    killed = time.perf_counter()
    worker.send_signal(signal.SIGKILL)
    client.predict(prompt="after a crash", **FAST, api_name="/generate")
    served = time.perf_counter() - killed
    wait_until(lambda: ready(app))
    return served, time.perf_counter() - killed


def mid_request(app: RunningApp, client: Client, signum: int) -> float:
    """Seconds a 40-step request took with its worker signalled at step 3."""
    steps_before = app.metric("sdapp_denoising_step_seconds_count")
    started = time.perf_counter()
    job = client.submit(prompt="interrupted", **LONG, api_name="/generate")
    wait_until(lambda: app.metric("sdapp_denoising_step_seconds_count") >= steps_before + 3)
    worker = app.worker()
    assert worker is not None
    worker.send_signal(signum)
    job.result(timeout=300)
    return time.perf_counter() - started


def plain_request(client: Client) -> float:
    started = time.perf_counter()
    client.predict(prompt="undisturbed", **LONG, api_name="/generate")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: a fresh tiny pipeline)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="folder for recovery.json (default bench/results)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    model = Path(args.model) if args.model else build_tiny_pipeline(work / "tiny")
    app_args = ["--worker-stall-seconds", str(STALL_SECONDS), "--worker-max-restarts", "1000"]
    with launched_app(model, work, args=app_args) as app:
        client = Client(app.url, verbose=False, download_files=str(work / "downloads"))
        plain = [plain_request(client) for _ in range(args.repeats)]
        idle = [idle_kill(app, client) for _ in range(args.repeats)]
        killed = [mid_request(app, client, signal.SIGKILL) for _ in range(args.repeats)]
        stalled = [mid_request(app, client, signal.SIGSTOP) for _ in range(args.repeats)]
        restarts = app.metric("sdapp_worker_restarts_total")
    baseline = median(plain)
    results = {
        "machine": machine(),
        "repeats": args.repeats,
        "stall_seconds": STALL_SECONDS,
        "kill_to_next_image_s": median([served for served, _ in idle]),
        "kill_to_ready_s": median([back for _, back in idle]),
        "request_40_steps_s": baseline,
        "added_by_kill_mid_request_s": median(killed) - baseline,
        "added_by_stall_mid_request_s": median(stalled) - baseline,
        "restarts": restarts,
    }
    rows = [
        ["idle worker killed -> next image served", f"{results['kill_to_next_image_s']:.2f}"],
        ["idle worker killed -> /readyz 200", f"{results['kill_to_ready_s']:.2f}"],
        ["40-step 128x128 request, undisturbed", f"{baseline:.2f}"],
        ["  added when its worker is killed at step 3", f"{results['added_by_kill_mid_request_s']:.2f}"],
        [
            f"  added when its worker stalls at step 3 (stall timeout {STALL_SECONDS} s)",
            f"{results['added_by_stall_mid_request_s']:.2f}",
        ],
    ]
    print(table([f"scenario (median of {args.repeats})", "seconds"], rows))
    print(f"worker restarts counted by the app: {restarts:.0f} (expected {3 * args.repeats})")
    print(f"written {write_json('recovery.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
