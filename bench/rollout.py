"""Rolling a new model version out under load, measured against the launched app.

    python -m bench.rollout [--clients 8] [--repeats 3] [--modes overlap,drain] [--quick] [--out DIR]

Starts an S3 server on loopback (moto), publishes the tiny model as v1 and launches the real
app on ``s3://.../tiny`` with ``MODEL_POLL_SECONDS=0``. ``--clients`` clients then keep
requesting; each repeat publishes a new version, promotes it and signals the app (SIGHUP, as
an operator or a short poll would), and measures: promote -> first image drawn by the new
version, promote -> the app's switch counted, requests failed during the rollout (target 0),
and request latency during the rollout against before it. Once per ``MODEL_ROLLOUT`` mode.
Prints a table and writes bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradio_client import Client

from bench.common import machine, median, percentile, table, write_json
from harness.app_server import RunningApp, launched_app
from harness.servers import running_s3_server
from sd_pipeline.contract.models import ModelStore
from sd_pipeline.tiny import build_tiny_pipeline
from sd_pipeline.versions.location import ModelLocation
from sd_pipeline.versions.registry import ModelRegistry, make_client

REQUEST: dict[str, Any] = {"negative_prompt": "", "seed": -1, "num_images": 1, "steps": 10, "width": 64, "height": 64}
REQUEST |= {"guidance_scale": 7.5, "scheduler": "Euler a"}


@dataclass
class Load:
    """Clients that keep requesting, and what each request got."""

    app: RunningApp
    folder: Path
    served: list[tuple[float, float, str]] = field(default_factory=list)  # submitted, finished, version
    failures: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, number: int) -> None:
        client = Client(self.app.url, verbose=False, download_files=str(self.folder / f"client-{number}"))
        while not self.stop.is_set():
            submitted = time.perf_counter()
            try:
                _, result = client.predict(prompt=f"client {number}", **REQUEST, api_name="/generate")
            except Exception as error:  # noqa: BLE001 - counted: the number this benchmark exists for
                with self.lock:
                    self.failures.append((time.perf_counter(), str(error)[:200]))
                continue
            with self.lock:
                self.served.append((submitted, time.perf_counter(), result["images"][0]["model_version"]))

    def first_image_of(self, version: str, since: float, *, timeout: float = 600) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            with self.lock:
                done = [finished for _, finished, drawn in self.served if drawn == version and finished > since]
            if done:
                return min(done) - since
            time.sleep(0.01)
        raise TimeoutError(f"no image from {version} within {timeout}s")

    def latencies(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [finished - submitted for submitted, finished, _ in self.served if start <= submitted < end]


def measure_mode(
    mode: str, registry: ModelRegistry, model_dir: Path, work: Path, env: dict[str, str], args: Any
) -> dict[str, Any]:
    """One app under load in one MODEL_ROLLOUT mode, ``args.repeats`` rollouts."""
    env = {**env, "MODEL_ROLLOUT": mode, "MODEL_CACHE_DIR": str(work / f"cache-{mode}")}
    rollouts = []
    with launched_app(str(registry.location), work, env=env) as app:
        load = Load(app, work / f"load-{mode}")
        threads = [threading.Thread(target=load.client, args=(n,), daemon=True) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        for repeat in range(args.repeats):
            time.sleep(args.settle)  # steady load before the promotion
            version = f"{mode}-{repeat + 1}"
            registry.publish(model_dir, version)
            counted_before = app.metric('sdapp_model_rollouts_total{outcome="succeeded"}')
            steady_from = time.perf_counter() - args.settle
            promoted = time.perf_counter()
            registry.promote(version)
            app.process.send_signal(signal.SIGHUP)
            first_image = load.first_image_of(version, promoted)
            while app.metric('sdapp_model_rollouts_total{outcome="succeeded"}') <= counted_before:
                time.sleep(0.01)
            switched = time.perf_counter() - promoted
            before = load.latencies(steady_from, promoted)
            during = load.latencies(promoted, promoted + switched)
            rollouts.append(
                {
                    "version": version,
                    "promote_to_first_new_image_s": first_image,
                    "promote_to_switch_counted_s": switched,
                    "p50_before_s": median(before) if before else None,
                    "p50_during_s": median(during) if during else None,
                    "p95_during_s": percentile(during, 0.95) if during else None,
                }
            )
        load.stop.set()
        for thread in threads:
            thread.join(timeout=120)
    return {
        "mode": mode,
        "rollouts": rollouts,
        "failed_requests": len(load.failures),
        "failures": load.failures[:5],
        "served": len(load.served),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: a fresh tiny pipeline)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of steady load before each promotion")
    parser.add_argument("--modes", default="overlap,drain", help="MODEL_ROLLOUT modes to measure")
    parser.add_argument("--quick", action="store_true", help="2 clients, 1 rollout, overlap only: checks the script")
    parser.add_argument("--out", type=Path, help="folder for rollout.json (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.repeats, args.settle, args.modes = 2, 1, 1.0, "overlap"
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    model_dir = Path(args.model) if args.model else build_tiny_pipeline(work / "tiny")
    results: dict[str, Any] = {"machine": machine(), "clients": args.clients, "request": REQUEST, "modes": []}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the loopback S3 server takes any keys
        os.environ.setdefault(name, "bench")
    with running_s3_server() as s3:
        s3.create_bucket("models")
        s3.create_bucket("images")
        store = ModelStore(endpoint_url=s3.endpoint_url, region="us-east-1", cache_dir="")
        env = {"S3_BUCKET": "images", "S3_ENDPOINT_URL": s3.endpoint_url, "S3_REGION": "us-east-1"}
        env["MODEL_POLL_SECONDS"] = "0"
        for mode in args.modes.split(","):
            registry = ModelRegistry(make_client(store), ModelLocation.parse(f"s3://models/{mode}/tiny"))
            registry.publish(model_dir, "v1", promote=True)
            results["modes"].append(measure_mode(mode, registry, model_dir, work, env, args))
    rows = []
    for found in results["modes"]:
        for rollout in found["rollouts"]:
            rows.append(
                [
                    found["mode"],
                    rollout["version"],
                    f"{rollout['promote_to_first_new_image_s']:.2f}",
                    f"{rollout['promote_to_switch_counted_s']:.2f}",
                    _seconds(rollout["p50_before_s"]),
                    _seconds(rollout["p50_during_s"]),
                    _seconds(rollout["p95_during_s"]),
                ]
            )
    headers = [
        "mode",
        "version",
        "promote->first new image s",
        "promote->switched s",
        "p50 before",
        "p50 during",
        "p95 during",
    ]
    print(table(headers, rows))
    for found in results["modes"]:
        print(f"{found['mode']}: {found['served']} requests served, {found['failed_requests']} failed")
    print(f"written {write_json('rollout.json', results, folder=args.out)}")
    return results


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
