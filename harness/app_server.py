"""Launch the real app (``python app.py``) on free loopback ports and stop it afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import requests
from gradio_client import Client
from gradio_client.client import Job

from harness.servers import ROOT, free_ports

T = TypeVar("T")


@dataclass
class RunningApp:
    process: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker(self) -> psutil.Process | None:
        """The app's pipeline worker (its child started by multiprocessing's spawn); None between two workers."""
        workers = []
        for child in psutil.Process(self.process.pid).children():
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    workers.append(child)
            except psutil.NoSuchProcess:
                continue
        assert len(workers) <= 1, [worker.pid for worker in workers]
        return workers[0] if workers else None

    def metric(self, name: str) -> float:
        """Sum of all samples of one metric line name (labels included in ``name`` if given)."""
        text = requests.get(f"{self.metrics_url}/metrics", timeout=10).text
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            if sample == name or (sample.startswith(name + "{") and "{" not in name):
                total += float(value)
                found = True
        if not found:
            raise KeyError(name)
        return total


def wait_ready(metrics_url: str, process: subprocess.Popen[bytes], log_path: Path, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if requests.get(f"{metrics_url}/readyz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"app not ready after {timeout}s:\n{log_path.read_text(errors='replace')}")


def clients_at_once(app: RunningApp, folder: Path, count: int, call: Callable[[Client, int], T]) -> list[T]:
    """``count`` gradio_clients, connected first, then ``call(client, n)`` from each at the same moment."""
    results: dict[int, T] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def one(number: int) -> None:
        client = Client(app.url, verbose=False, download_files=str(folder / str(number)))
        start.wait()
        try:
            results[number] = call(client, number)
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return [results[n] for n in range(count)]


@contextmanager
def launched_app(
    model_dir: Path | str,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    ready_timeout: float = 120,
) -> Iterator[RunningApp]:
    """Start ``python app.py`` with the tiny model, wait until ready; SIGTERM (then SIGKILL) on exit."""
    port, metrics_port = free_ports(2)
    log_path = tmp_path / f"app-{port}.log"
    command = [sys.executable, "app.py", "--model", str(model_dir), "--port", str(port)]
    command += ["--metrics-port", str(metrics_port), "--data-dir", str(tmp_path / f"data-{port}"), *(args or [])]
    # No lingering after the drain unless a test asks (its clients fetch results while the app stops).
    environment = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "SHUTDOWN_LINGER": "0", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    app = RunningApp(process, f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{metrics_port}", log_path)
    try:
        wait_ready(app.metrics_url, process, log_path, timeout=ready_timeout)
        yield app
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def is_waiting(job: Job) -> bool:
    """Whether the app reports this job waiting its turn ("waiting for the GPU: 1 ahead ...")."""
    progress = job.status().progress_data or []
    return any(unit.desc is not None and unit.desc.startswith("waiting") for unit in progress)


def is_stepping(job: Job) -> bool:
    """Whether the app reports a denoising step for this job ("step 3/60 ..."), not a wait."""
    progress = job.status().progress_data or []
    return any(unit.desc is not None and unit.desc.startswith("step ") for unit in progress)
