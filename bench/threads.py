"""CPU thread policy: the pipeline worker with all cores but one against all cores, at 1 and 8 clients.

    python -m bench.threads [--model DIR] [--size 64] [--steps 10] [--quick]

The launched app (local storage, step batching, the default) runs once per policy with
``SD_CPU_THREADS`` set to it, each driven by 1 and then 8 concurrent ``gradio_client`` clients;
the naive Gradio peer (torch's default threads) runs in the same session for reference.
Prints images/s and p50/p95 per policy and the ratio of each to the default policy (all
cores but one); writes bench/results/threads.json. On a machine with one core both policies
are one thread and the comparison says nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from gradio_client import Client

from bench.common import add_serving_arguments, machine, table, write_json
from bench.serving import drive, running_peer
from sd_pipeline.tiny import build_tiny_pipeline
from tests.app_server import launched_app
from webapp.settings import serving_cpu_threads

CLIENT_COUNTS = (1, 8)


def policies() -> dict[str, int]:
    """The thread counts compared: the app's default first."""
    cores = os.cpu_count() or 1
    return {f"all cores but one ({serving_cpu_threads()})": serving_cpu_threads(), f"all cores ({cores})": cores}


def measure_app(
    model: str, threads: int, *, size: int, steps: int, per_client: dict[int, int], work: Path
) -> dict[int, dict[str, float]]:
    """The app with ``threads`` torch threads in its worker, at each client count."""
    folder = Path(tempfile.mkdtemp(prefix=f"app-{threads}-", dir=work))
    with launched_app(Path(model), folder, env={"SD_CPU_THREADS": str(threads)}) as app:

        def call(client: Client, *, seed: int) -> None:
            client.predict(
                prompt="a lighthouse at dusk", seed=seed, steps=steps, width=size, height=size, api_name="/generate"
            )

        drive(app.url, clients=1, per_client=2, call=call, downloads=folder / "warm")
        return {
            n: drive(app.url, clients=n, per_client=per_client[n], call=call, downloads=folder / str(n))
            for n in CLIENT_COUNTS
        }


def measure_peer(model: str, *, size: int, steps: int, per_client: dict[int, int], work: Path) -> dict[int, Any]:
    with running_peer(model, work) as url:

        def call(client: Client, *, seed: int) -> None:
            client.predict("a lighthouse at dusk", seed, steps, size, size, api_name="/generate")

        drive(url, clients=1, per_client=2, call=call, downloads=work / "peer-warm")
        return {
            n: drive(url, clients=n, per_client=per_client[n], call=call, downloads=work / f"peer-{n}")
            for n in CLIENT_COUNTS
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serving_arguments(parser, "threads.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    model = args.model or str(build_tiny_pipeline(work / "tiny"))
    per_client = {1: 2, 8: 1} if args.quick else {1: 20, 8: 6}
    compared = policies()
    measured = {
        name: measure_app(model, threads, size=args.size, steps=args.steps, per_client=per_client, work=work)
        for name, threads in compared.items()
    }
    peer = measure_peer(model, size=args.size, steps=args.steps, per_client=per_client, work=work)
    default = next(iter(measured.values()))
    rows = []
    for name, by_clients in [*measured.items(), ("naive Gradio peer (torch default)", peer)]:
        for clients in CLIENT_COUNTS:
            r = by_clients[clients]
            rows.append(
                [
                    name,
                    str(clients),
                    f"{r['images_per_s']:.2f}",
                    f"{r['p50_s'] * 1000:.0f}",
                    f"{r['p95_s'] * 1000:.0f}",
                    f"{r['images_per_s'] / default[clients]['images_per_s']:.2f}",
                    f"{r['p50_s'] / default[clients]['p50_s']:.2f}",
                ]
            )
    print(table(["worker threads", "clients", "images/s", "p50 ms", "p95 ms", "x images/s", "x p50"], rows))
    results = {
        "machine": machine(),
        "settings": {"size": args.size, "steps": args.steps, "quick": args.quick, "per_client": per_client},
        "policies": compared,
        "app": {name: {str(k): v for k, v in r.items()} for name, r in measured.items()},
        "peer": {str(k): v for k, v in peer.items()},
    }
    print(f"written {write_json('threads.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
