"""The launched app (S3 on loopback) when its pipeline worker is killed, stopped or crash-loops."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from gradio_client import Client

from harness.app_server import RunningApp, launched_app
from harness.servers import S3Server, wait_until
from sd_pipeline.admission import CRASHED_TWICE
from sd_pipeline.png import read_png_parameters

LONG: dict[str, Any] = {"steps": 40, "width": 128, "height": 128, "guidance_scale": 7.5, "scheduler": "Euler"}
FAST: dict[str, Any] = {"steps": 1, "width": 64, "height": 64, "guidance_scale": 7.5, "scheduler": "Euler"}
STALL_SECONDS = 3


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    s3_server.create_bucket("fault-images")
    env = {"S3_BUCKET": "fault-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    args = ["--worker-stall-seconds", str(STALL_SECONDS), "--worker-max-restarts", "100", "--sd-cpu-threads", "1"]
    with launched_app(tiny_model_dir, tmp_path_factory.mktemp("fault-app"), env=env, args=args) as running:
        yield running


def client(app: RunningApp, tmp_path: Path) -> Client:
    return Client(app.url, verbose=False, download_files=str(tmp_path))


def submit(app: RunningApp, tmp_path: Path, prompt: str, fields: dict[str, Any]) -> Any:
    values = {"negative_prompt": "", "seed": 77, "num_images": 1, **fields}
    return client(app, tmp_path / prompt.replace(" ", "-")).submit(prompt=prompt, **values, api_name="/generate")


def worker_process(app: RunningApp) -> psutil.Process:
    """The worker, which must exist now."""
    worker = app.worker()
    assert worker is not None, "no pipeline worker"
    return worker


def status(url: str) -> int:
    return requests.get(url, timeout=5).status_code


class ReadinessWatch:
    """Polls /readyz in the background and keeps every status it saw, in order."""

    def __init__(self, app: RunningApp) -> None:
        self.url = f"{app.metrics_url}/readyz"
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            code = status(self.url)
            if not self.seen or self.seen[-1] != code:
                self.seen.append(code)
            time.sleep(0.05)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen


def steps_reported(app: RunningApp) -> float:
    return app.metric("sdapp_denoising_step_seconds_count")


def wait_for_steps(app: RunningApp, *, after: float, count: int) -> None:
    """Until ``count`` more denoising steps than ``after`` were reported: a request is mid-run."""
    wait_until(lambda: steps_reported(app) >= after + count)


def start_then_signal(app: RunningApp, tmp_path: Path, prompt: str, signum: int) -> tuple[Any, psutil.Process]:
    """Submit a long request and send ``signum`` to its worker three steps in; the job and that worker."""
    old = worker_process(app)
    steps_before = steps_reported(app)
    running = submit(app, tmp_path, prompt, LONG)
    wait_for_steps(app, after=steps_before, count=3)
    old.send_signal(signum)
    return running, old


def test_a_killed_worker_is_replaced_its_request_retried_and_the_queue_kept(app: RunningApp, tmp_path: Path) -> None:
    died_before = app.metric('sdapp_worker_restarts_total{reason="died"}')
    watch = ReadinessWatch(app)
    running, old = start_then_signal(app, tmp_path, "survivor", signal.SIGKILL)
    queued = [submit(app, tmp_path, f"queued {n}", FAST) for n in range(2)]  # arrive while it restarts
    _, result = running.result(timeout=120)
    wait_until(lambda: status(f"{app.metrics_url}/readyz") == 200)
    assert watch.stop()[-2:] == [503, 200]  # not ready while no worker could run, then ready again
    (record,) = result["images"]
    assert record["prompt"] == "survivor" and record["status"] == "stored"
    png = requests.get(record["url"], timeout=10).content
    assert read_png_parameters(png).seed == 77
    for number, job in enumerate(queued):
        assert job.result(timeout=120)[1]["images"][0]["prompt"] == f"queued {number}"
    assert app.metric('sdapp_worker_restarts_total{reason="died"}') == died_before + 1
    assert app.metric("sdapp_worker_up") == 1
    assert worker_process(app).pid != old.pid


def test_a_stopped_worker_is_replaced_after_the_stall_timeout(app: RunningApp, tmp_path: Path) -> None:
    stalled_before = app.metric('sdapp_worker_restarts_total{reason="stalled"}')
    running, old = start_then_signal(app, tmp_path, "frozen", signal.SIGSTOP)  # alive, silent: only the watchdog
    _, result = running.result(timeout=120)
    assert result["images"][0]["prompt"] == "frozen"
    assert app.metric('sdapp_worker_restarts_total{reason="stalled"}') == stalled_before + 1
    assert not psutil.pid_exists(old.pid) or old.status() == psutil.STATUS_ZOMBIE


def test_a_request_that_kills_the_worker_twice_gets_a_clear_error(app: RunningApp, tmp_path: Path) -> None:
    died_before = app.metric('sdapp_worker_restarts_total{reason="died"}')
    error_before = app.metric('sdapp_requests_total{outcome="error"}')
    steps_before = steps_reported(app)
    poison = submit(app, tmp_path, "poison", LONG)
    killed: list[int] = []
    for _ in range(2):  # it crashes the worker each time it runs (as a bad input to a native library might)
        wait_for_steps(app, after=steps_before, count=2)
        worker = app.worker()
        assert worker is not None and worker.pid not in killed
        worker.send_signal(signal.SIGKILL)
        killed.append(worker.pid)
        wait_until(lambda: (now := app.worker()) is not None and now.pid not in killed)
        steps_before = steps_reported(app)
    with pytest.raises(Exception, match=CRASHED_TWICE):
        poison.result(timeout=120)
    assert app.metric('sdapp_worker_restarts_total{reason="died"}') == died_before + 2
    assert app.metric('sdapp_requests_total{outcome="error"}') == error_before + 1
    _, after = submit(app, tmp_path, "next one", FAST).result(timeout=120)
    assert after["images"][0]["prompt"] == "next one"


def memory_mb(app: RunningApp) -> float:
    """Resident memory of the app and its worker together."""
    return (psutil.Process(app.process.pid).memory_info().rss + worker_process(app).memory_info().rss) / 2**20


def test_memory_settles_over_two_hundred_requests_after_a_restart(app: RunningApp, tmp_path: Path) -> None:
    old = worker_process(app)
    old.send_signal(signal.SIGKILL)  # while idle: replaced before anyone asks
    wait_until(lambda: (now := app.worker()) is not None and now.pid != old.pid)
    wait_until(lambda: status(f"{app.metrics_url}/readyz") == 200)
    c = client(app, tmp_path)
    samples: dict[int, float] = {}
    for number in range(1, 201):
        c.predict(prompt=f"request {number}", **{**FAST, "seed": number}, api_name="/generate")
        if number in (50, 125, 200):
            samples[number] = memory_mb(app)
    early, late = samples[125] - samples[50], samples[200] - samples[125]
    print(f"RSS app+worker (MB) after 50/125/200 requests: {samples}")
    assert late <= max(8.0, early), f"memory still growing: {samples}"


def test_a_crash_loop_turns_healthz_unhealthy(tiny_model_dir: Path, tmp_path: Path) -> None:
    with launched_app(tiny_model_dir, tmp_path, args=["--worker-max-restarts", "1"]) as single:
        healthz = f"{single.metrics_url}/healthz"
        assert requests.get(healthz, timeout=5).json() == {"status": "alive"}
        os.kill(worker_process(single).pid, signal.SIGKILL)
        wait_until(lambda: status(healthz) == 503)
        body = requests.get(healthz, timeout=5).json()
        assert body["status"] == "unhealthy"
        assert body["reasons"] == ["pipeline worker crash loop: 1 restart in the last 600s"]
        wait_until(lambda: status(f"{single.metrics_url}/readyz") == 200)  # it still serves meanwhile
        assert "reporting unhealthy on /healthz" in single.log()
