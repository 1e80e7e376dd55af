"""CPU thread policy: a lone user at full speed and a loaded server, on a light and a compute-heavy pipeline.

    python -m bench.threads [--kinds tiny,heavy] [--size 64] [--steps 10] [--quick]

For each tiny pipeline kind (``tiny``: about 100 ms an image, the server's own work is a large
share; ``heavy``: hundreds of ms an image, compute dominates) in one run: the raw pipeline
in-process one request at a time (torch's default threads), the naive Gradio peer, and the
launched app (local storage, step engine) once per worker thread policy: ``adaptive`` (the
default: per step, whichever of all cores and all cores but one measures faster), then fixed
all cores but one, then fixed all cores (``SD_CPU_THREADS``). Each is driven by 1 and by 8
concurrent users of Gradio's HTTP API (``bench.load``: a light harness; a gradio_client per user
would take as much CPU per request as the server on two cores). Prints images/s, p50/p95 and
the ratios to raw and to the peer; writes bench/results/threads.json. On a one-core machine
every policy is one thread.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json
from bench.load import HARNESS_LIMITS, drive_http
from bench.serving import raw_pipeline, request_fields, running_peer
from harness.app_server import launched_app
from sd_pipeline.tiny import KINDS, build_tiny_pipeline
from webapp.settings import serving_cpu_threads

CLIENT_COUNTS = (1, 8)


def policies() -> dict[str, dict[str, str]]:
    """The app's thread policies compared, as environments: the default first."""
    cores = os.cpu_count() or 1
    return {
        "adaptive (default)": {},
        f"all cores but one ({serving_cpu_threads()})": {"SD_CPU_THREADS": str(serving_cpu_threads())},
        f"all cores ({cores})": {"SD_CPU_THREADS": str(cores)},
    }


def measure_app(
    model: str, env: dict[str, str], *, size: int, steps: int, per_client: dict[int, int], work: Path
) -> dict[int, dict[str, float]]:
    """The app under one thread policy, at each client count."""
    folder = Path(tempfile.mkdtemp(prefix="app-", dir=work))
    with launched_app(Path(model), folder, env={**HARNESS_LIMITS, **env}) as app:
        fields = request_fields(size=size, steps=steps)
        drive_http(app.url, clients=1, per_client=4, fields=fields)
        return {n: drive_http(app.url, clients=n, per_client=per_client[n], fields=fields) for n in CLIENT_COUNTS}


def measure_peer(model: str, *, size: int, steps: int, per_client: dict[int, int], work: Path) -> dict[int, Any]:
    with running_peer(model, work) as url:
        fields = request_fields(size=size, steps=steps)
        drive_http(url, clients=1, per_client=2, fields=fields)
        return {n: drive_http(url, clients=n, per_client=per_client[n], fields=fields) for n in CLIENT_COUNTS}


def measure_kind(kind: str, *, size: int, steps: int, quick: bool, work: Path) -> dict[str, Any]:
    """Raw, peer and every policy on one pipeline kind."""
    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
    model = str(build_tiny_pipeline(folder / "model", kind=kind))
    per_client = {1: 3, 8: 1} if quick else {1: 20, 8: 6}
    raw = raw_pipeline(model, size=size, steps=steps, requests_count=3 if quick else 20)
    peer = measure_peer(model, size=size, steps=steps, per_client=per_client, work=folder)
    app = {
        name: measure_app(model, env, size=size, steps=steps, per_client=per_client, work=folder)
        for name, env in policies().items()
    }
    return {"raw": raw, "peer": peer, "app": app}


def rows_of(kind: str, measured: dict[str, Any]) -> list[list[str]]:
    raw, peer = measured["raw"], measured["peer"]
    rows = [[kind, "raw pipeline, in-process", "1", f"{raw['images_per_s']:.2f}", f"{raw['p50_s'] * 1000:.0f}"]]
    rows[0] += [f"{raw['p95_s'] * 1000:.0f}", "1.00", "-", "-"]
    for name, by_clients in [("naive Gradio peer", peer), *(("app: " + n, r) for n, r in measured["app"].items())]:
        for clients in CLIENT_COUNTS:
            r, p = by_clients[clients], peer[clients]
            rows.append(
                [
                    kind,
                    name,
                    str(clients),
                    f"{r['images_per_s']:.2f}",
                    f"{r['p50_s'] * 1000:.0f}",
                    f"{r['p95_s'] * 1000:.0f}",
                    f"{r['images_per_s'] / raw['images_per_s']:.2f}",
                    f"{r['images_per_s'] / p['images_per_s']:.2f}",
                    f"{(r['p50_s'] - p['p50_s']) * 1000:+.0f}",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="tiny,heavy", help=f"pipeline kinds, comma-separated ({', '.join(KINDS)})")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="few requests: checks the script, not the speed")
    parser.add_argument("--out", type=Path, help="folder for threads.json (default bench/results)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    kinds = args.kinds.split(",")
    measured = {
        kind: measure_kind(kind, size=args.size, steps=args.steps, quick=args.quick, work=work) for kind in kinds
    }
    rows = [row for kind in kinds for row in rows_of(kind, measured[kind])]
    headers = ["pipeline", "server", "clients", "images/s", "p50 ms", "p95 ms", "x raw", "x peer", "p50 - peer ms"]
    print(table(headers, rows))
    default = next(iter(policies()))
    for kind in kinds:
        ours, raw, peer = measured[kind]["app"][default], measured[kind]["raw"], measured[kind]["peer"]
        print(
            f"{kind}: 1 client p50 {(ours[1]['p50_s'] - peer[1]['p50_s']) * 1000:+.0f} ms against the peer "
            f"(target <= +20); 8 clients {ours[8]['images_per_s'] / raw['images_per_s']:.2f}x raw (target >= 1.3), "
            f"{ours[8]['images_per_s'] / peer[8]['images_per_s']:.2f}x peer (target >= 1.5)"
        )
    results = {
        "machine": machine(),
        "settings": {"size": args.size, "steps": args.steps, "quick": args.quick},
        "policies": policies(),
        "kinds": {
            kind: {
                "raw": m["raw"],
                "peer": {str(k): v for k, v in m["peer"].items()},
                "app": {name: {str(k): v for k, v in r.items()} for name, r in m["app"].items()},
            }
            for kind, m in measured.items()
        },
    }
    print(f"written {write_json('threads.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
