"""Scale-out on Ray Serve: the same app with 1 and with 2 pipeline replicas, in one run.

    python -m bench.scaleout [--model DIR] [--size 128] [--steps 10] [--clients 8] [--quick]
    python -m bench.scaleout --simulate [h200|unet=A+B*n,vae=C*n] [...]   # bench.scaleout_simulated

The launched app (local storage) with ``RAY_ADDRESS=local`` and ``RAY_REPLICAS`` = 1, then 2;
on the CPU each replica holds one CPU and one torch thread (``RAY_CPUS_PER_REPLICA=1``), on a
GPU machine one GPU each (Ray's default when the machine has GPUs), so the script runs
unchanged there. ``--clients`` concurrent gradio_client clients make requests in a row.
Prints images/s and p50/p95 per replica count and the ratio; also the time from killing one
replica (SIGKILL) until Ray reports two running again. Writes bench/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests
from gradio_client import Client

from bench.common import add_serving_arguments, machine, table, write_json
from bench.serving import drive
from harness.app_server import RunningApp, launched_app
from sd_pipeline.tiny import build_tiny_pipeline

REPLICA_COUNTS = (1, 2)


def running_replicas(app: RunningApp) -> float:
    return app.metric('sdapp_pipeline_replicas{state="RUNNING"}')


def recovery_seconds(app: RunningApp) -> float:
    """SIGKILL one replica process; seconds until Ray reports every replica running again."""
    replicas = [
        process
        for process in psutil.Process(app.process.pid).children(recursive=True)
        if "ServeReplica" in " ".join(process.cmdline())
    ]
    expected = running_replicas(app)
    os.kill(replicas[0].pid, signal.SIGKILL)
    started = time.perf_counter()
    while running_replicas(app) >= expected and time.perf_counter() - started < 30:
        requests.get(f"{app.metrics_url}/readyz", timeout=10)  # refreshes the replica counts
        time.sleep(0.1)
    while running_replicas(app) < expected:
        requests.get(f"{app.metrics_url}/readyz", timeout=10)
        time.sleep(0.1)
    return time.perf_counter() - started


def measure(model: str, replicas: int, *, size: int, steps: int, clients: int, per_client: int, work: Path) -> Any:
    env = {"RAY_ADDRESS": "local", "RAY_REPLICAS": str(replicas), "RAY_CPUS_PER_REPLICA": "1"}
    folder = Path(tempfile.mkdtemp(prefix=f"replicas-{replicas}-", dir=work))
    with launched_app(Path(model), folder, env=env) as app:

        def call(client: Client, *, seed: int) -> None:
            client.predict(prompt="a red circle", seed=seed, steps=steps, width=size, height=size, api_name="/generate")

        drive(app.url, clients=replicas, per_client=2, call=call, downloads=folder / "warm")
        measured = drive(app.url, clients=clients, per_client=per_client, call=call, downloads=folder / "run")
        if replicas > 1:
            measured["recovery_s"] = recovery_seconds(app)
        return measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--simulate" in argv:
        from bench import scaleout_simulated

        return scaleout_simulated.main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serving_arguments(parser, "scaleout.json")
    parser.add_argument("--clients", type=int, default=8)
    parser.set_defaults(size=128)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    model = args.model or str(build_tiny_pipeline(work / "tiny"))
    per_client = 1 if args.quick else 4
    measured = {
        n: measure(model, n, size=args.size, steps=args.steps, clients=args.clients, per_client=per_client, work=work)
        for n in REPLICA_COUNTS
    }
    one = measured[1]
    rows = [
        [
            str(n),
            f"{r['images_per_s']:.2f}",
            f"{r['p50_s'] * 1000:.0f}",
            f"{r['p95_s'] * 1000:.0f}",
            f"{r['images_per_s'] / one['images_per_s']:.2f}",
        ]
        for n, r in measured.items()
    ]
    print(table(["replicas", "images/s", "p50 ms", "p95 ms", "x 1 replica"], rows))
    ratio = measured[2]["images_per_s"] / one["images_per_s"]
    print(f"\n2 replicas: {ratio:.2f}x the images/s of 1 (target >= 1.6 on 2 CPU cores; on N GPUs >= 0.9 N)")
    print(f"one replica killed -> both running again after {measured[2]['recovery_s']:.1f} s")
    results = {
        "machine": machine(),
        "settings": {"size": args.size, "steps": args.steps, "clients": args.clients, "per_client": per_client},
        "replicas": {str(n): r for n, r in measured.items()},
        "ratio_2_over_1": ratio,
    }
    print(f"written {write_json('scaleout.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
