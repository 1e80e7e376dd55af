"""How many accelerators one front end can feed: Ray replicas on a simulated accelerator, 1 to 8.

    python -m bench.scaleout --simulate [SPEC] [--replicas 1,2,4,8] [--clients-per-replica 4]
                             [--steps 25] [--per-client 8] [--quick]

Each replica's UNet and VAE calls last the modelled time (``SD_SIMULATED_GPU``, default ``h200``:
fitted to the measured H200 table) while it holds no core, so this 2-core machine measures the
serving system (Gradio's server, admission, the Ray router, previews, PNG encoding, storage),
not its own cores. The model is the nearly free ``micro`` tiny pipeline (its real modules cost
about a millisecond a call). For each replica count N the launched app (local storage, live
previews ``approx``, the defaults) serves N x ``--clients-per-replica`` users of Gradio's HTTP
API (``bench.load``: asyncio tasks, not a gradio_client each, whose own CPU would crowd the
server's on two cores), each making ``--per-client`` requests in a row. Then the same
at the largest N with two front ends sharing the replicas behind Debian's HAProxy (the stack's
rules). Prints images/s, p50/p95, efficiency against N x one replica, and the CPU each part
used (front ends, Ray's processes, the clients; in cores). Writes bench/results/scaleout_simulated.json.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.common import cpu_seconds, machine, table, write_json
from bench.load import HARNESS_LIMITS, drive_http
from harness.app_server import RunningApp, launched_app
from harness.balancer import running_haproxy
from sd_pipeline.contract.simulation import SimulatedAccelerator
from sd_pipeline.tiny import build_tiny_pipeline

SIZE = 64


def ray_processes(front_end: RunningApp) -> list[psutil.Process]:
    """Every process the first front end started (its private Ray: GCS, raylet, Serve, the replicas)."""
    return psutil.Process(front_end.process.pid).children(recursive=True)


@contextmanager
def front_ends(model: str, work: Path, *, replicas: int, simulate: str, count: int) -> Iterator[list[RunningApp]]:
    """``count`` launched front ends; the first starts a private Ray with the replicas, the others join it."""
    common = {
        "SD_SIMULATED_GPU": simulate,
        **HARNESS_LIMITS,
        "QUEUE_MAX_SIZE": "1024",
        "RAY_REPLICAS": str(replicas),
    }
    with ExitStack() as stack:
        folder = Path(tempfile.mkdtemp(prefix=f"replicas-{replicas}-{count}fe-", dir=work))
        first = stack.enter_context(
            launched_app(Path(model), folder, env={**common, "RAY_ADDRESS": "local"}, ready_timeout=600)
        )
        started = [first]
        address = re.search(r"private Ray instance at (\S+)", first.log())
        for _ in range(count - 1):
            assert address is not None, "the first front end did not log its Ray address"
            joined = {**common, "RAY_ADDRESS": address.group(1), "RAY_AUTH_MODE": "token", "RAY_DEPLOY": "never"}
            started.append(stack.enter_context(launched_app(Path(model), folder, env=joined, ready_timeout=600)))
        yield started


def measure(
    model: str,
    *,
    replicas: int,
    front_end_count: int,
    simulate: str,
    clients: int,
    per_client: int,
    steps: int,
    work: Path,
) -> dict[str, Any]:
    with front_ends(model, work, replicas=replicas, simulate=simulate, count=front_end_count) as apps:

        def fields(number: int) -> dict[str, Any]:
            return {"prompt": "a red circle", "seed": number, "steps": steps, "width": SIZE, "height": SIZE}

        with ExitStack() as stack:
            url = apps[0].url
            if len(apps) > 1:
                url, _ = stack.enter_context(running_haproxy(work, apps))
            drive_http(url, clients=2 * replicas, per_client=2, fields=fields)  # warms every replica
            parts: dict[str, Callable[[], list[psutil.Process]]] = {
                "front ends": lambda: [psutil.Process(app.process.pid) for app in apps],
                "ray": lambda: ray_processes(apps[0]),
                "clients": lambda: [psutil.Process()],
            }
            before = {name: cpu_seconds(find()) for name, find in parts.items()}
            machine_before = psutil.cpu_times()
            measured: dict[str, Any] = drive_http(url, clients=clients, per_client=per_client, fields=fields)
            machine_after = psutil.cpu_times()
            wall = measured["wall_s"]
            measured["cpu_cores"] = {name: (cpu_seconds(find()) - before[name]) / wall for name, find in parts.items()}
            idle = (machine_after.idle - machine_before.idle) / wall
            measured["machine_busy_fraction"] = 1 - idle / (psutil.cpu_count() or 1)
            measured["requests"] = clients * per_client
            exposition = requests.get(f"{apps[0].metrics_url}/metrics", timeout=10).text.splitlines()
            measured["model_info"] = next(line for line in exposition if line.startswith("sdapp_model_info{"))
            return measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulate", nargs="?", const="h200", default="h200", help="SD_SIMULATED_GPU (default h200)")
    parser.add_argument("--replicas", default="1,2,4,8", help="replica counts, comma-separated")
    parser.add_argument("--clients-per-replica", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=8, help="requests each client makes in a row")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="1 and 2 replicas, few requests: checks the script")
    parser.add_argument("--out", type=Path, help="folder for scaleout_simulated.json (default bench/results)")
    args = parser.parse_args(argv)
    spec = SimulatedAccelerator.parse(args.simulate).spec
    counts = [1, 2] if args.quick else [int(n) for n in args.replicas.split(",")]
    per_client = 1 if args.quick else args.per_client
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-simulated-"))
    model = str(build_tiny_pipeline(work / "micro", kind="micro"))

    def run(replicas: int, front_end_count: int) -> dict[str, Any]:
        result = measure(
            model,
            replicas=replicas,
            front_end_count=front_end_count,
            simulate=spec,
            clients=replicas * args.clients_per_replica,
            per_client=per_client,
            steps=args.steps,
            work=work,
        )
        print(f"{replicas} replicas, {front_end_count} front end(s): {result['images_per_s']:.2f} images/s", flush=True)
        return result

    rows_in = [(n, 1, run(n, 1)) for n in counts]
    rows_in.append((counts[-1], 2, run(counts[-1], 2)))
    one = rows_in[0][2]["images_per_s"] / counts[0]
    rows = []
    for replicas, front_end_count, r in rows_in:
        cores = r["cpu_cores"]
        rows.append(
            [
                str(replicas),
                str(front_end_count),
                str(replicas * args.clients_per_replica),
                f"{r['images_per_s']:.2f}",
                f"{r['p50_s'] * 1000:.0f}",
                f"{r['p95_s'] * 1000:.0f}",
                f"{r['images_per_s'] / (replicas * one):.2f}",
                f"{cores['front ends']:.2f}",
                f"{cores['front ends'] / r['images_per_s'] * 1000:.0f}",
                f"{cores['ray']:.2f}",
                f"{cores['clients']:.2f}",
                f"{r['machine_busy_fraction'] * 100:.0f}%",
            ]
        )
    headers = ["replicas", "front ends", "clients", "images/s", "p50 ms", "p95 ms", "x N x 1 replica"]
    headers += ["front-end cores", "front-end CPU ms/image", "ray cores", "client cores", "machine busy"]
    print(table(headers, rows))
    results = {
        "machine": machine(),
        "settings": {
            "simulated_gpu": spec,
            "steps": args.steps,
            "size": SIZE,
            "clients_per_replica": args.clients_per_replica,
            "per_client": per_client,
        },
        "runs": [
            {"replicas": replicas, "front_ends": front_end_count, **r} for replicas, front_end_count, r in rows_in
        ],
    }
    print(f"written {write_json('scaleout_simulated.json', results, folder=args.out)}")
    return results
