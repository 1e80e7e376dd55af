"""Open-loop serving: Poisson arrivals with mixed settings on the step engine.

    python -m bench.open_loop [--model DIR] [--size 64] [--requests 60] [--quick]
    python -m bench.serving --open-loop      # the same

Closed-loop clients (``bench.serving``) slow down when the server does, which hides queueing.
Here requests arrive on their own clock (exponential gaps) at 50 %, 80 % and 120 % of the
capacity measured first (8 closed-loop clients, the same mixed workload: 10/20/30 steps,
guidance 7.5 or 1.0, random seeds), against the launched app (local storage). Also in the
same run: a 6-step request sent while a 60-step one runs (its time as a share of the long
one's), and one client in a row against the naive Gradio peer. (Request-level batching, the
earlier comparison, is gone: the step engine is the only runner; docs/BENCHMARKS.md keeps
its last numbers.)
Reports p50/p95 latency, images/s, mean wait to the first step (web queue + worker, from the
app's metrics), the mean UNet batch, and the target ratios. Writes bench/results/open_loop.json.
"""

from __future__ import annotations

import argparse
import queue
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradio_client import Client

from bench.common import machine, median, percentile, table, write_json
from bench.serving import running_peer
from harness.app_server import RunningApp, launched_app
from sd_pipeline.tiny import build_tiny_pipeline

LOADS = (0.5, 0.8, 1.2)
MODES = ("step",)
CLIENT_POOL = 24
METRICS = (
    "sdapp_queue_wait_seconds_sum",
    "sdapp_queue_wait_seconds_count",
    "sdapp_first_step_wait_seconds_sum",
    "sdapp_first_step_wait_seconds_count",
    "sdapp_batch_size_images_sum",
    "sdapp_batch_size_images_count",
    "sdapp_denoising_step_seconds_sum",
    "sdapp_denoising_step_seconds_count",
)


def workload(count: int, seed: int) -> list[dict[str, Any]]:
    """Mixed requests: steps 10/20/30, guidance 7.5 or 1.0 (no guidance), random seeds."""
    chooser = random.Random(seed)
    return [
        {
            "prompt": chooser.choice(["a red circle", "a blue square", "a green triangle"]),
            "steps": chooser.choice([10, 20, 30]),
            "guidance_scale": chooser.choice([7.5, 1.0]),
            "seed": chooser.randrange(1_000_000),
        }
        for _ in range(count)
    ]


class ClientPool:
    """Connected gradio_clients, one per request in flight (connecting costs more than a request)."""

    def __init__(self, url: str, size: int, downloads: Path) -> None:
        self._free: queue.Queue[Client] = queue.Queue()
        for number in range(size):
            self._free.put(Client(url, verbose=False, download_files=str(downloads / str(number))))

    @contextmanager
    def client(self) -> Iterator[Client]:
        client = self._free.get()
        try:
            yield client
        finally:
            self._free.put(client)


def generate(client: Client, fields: dict[str, Any], size: int) -> None:
    client.predict(
        prompt=fields["prompt"],
        seed=fields["seed"],
        steps=fields["steps"],
        guidance_scale=fields["guidance_scale"],
        width=size,
        height=size,
        api_name="/generate",
    )


def closed_loop(pool: ClientPool, requests: list[dict[str, Any]], *, clients: int, size: int) -> float:
    """Images/s with ``clients`` callers, each sending its next request when the last returns."""
    pending: queue.Queue[dict[str, Any]] = queue.Queue()
    for fields in requests:
        pending.put(fields)

    def caller() -> None:
        with pool.client() as client:
            while True:
                try:
                    fields = pending.get_nowait()
                except queue.Empty:
                    return
                generate(client, fields, size)

    threads = [threading.Thread(target=caller) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(requests) / (time.perf_counter() - started)


def open_loop(pool: ClientPool, requests: list[dict[str, Any]], gaps: list[float], *, size: int) -> dict[str, float]:
    """Send each request at its arrival time, whatever the server is doing; latency per request."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(fields: dict[str, Any]) -> None:
        began = time.perf_counter()
        try:
            with pool.client() as client:
                generate(client, fields, size)
        except BaseException as error:  # noqa: BLE001 - reported after the run
            errors.append(error)
            return
        with lock:
            latencies.append(time.perf_counter() - began)

    threads = []
    started = time.perf_counter()
    arrival = started
    for fields, gap in zip(requests, gaps, strict=True):
        arrival += gap
        time.sleep(max(0.0, arrival - time.perf_counter()))
        thread = threading.Thread(target=one, args=(fields,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]!r}")
    return {
        "images_per_s": len(latencies) / (time.perf_counter() - started),
        "p50_s": median(latencies),
        "p95_s": percentile(latencies, 0.95),
    }


def metric_means(app: RunningApp, before: dict[str, float]) -> dict[str, float]:
    after = {name: app.metric(name) for name in METRICS}
    change = {name: after[name] - before[name] for name in METRICS}

    def mean(name: str) -> float:
        return change[f"{name}_sum"] / change[f"{name}_count"] if change[f"{name}_count"] else 0.0

    return {
        "wait_to_first_step_s": mean("sdapp_queue_wait_seconds") + mean("sdapp_first_step_wait_seconds"),
        "mean_unet_batch": mean("sdapp_batch_size_images"),
        "step_s": mean("sdapp_denoising_step_seconds"),
    }


def short_during_long(pool: ClientPool, *, size: int) -> float:
    """A 6-step request sent while a 60-step one runs: its latency as a share of the long one's."""
    times: dict[str, float] = {}

    def timed(name: str, steps: int, delay: float) -> None:
        time.sleep(delay)
        began = time.perf_counter()
        with pool.client() as client:
            generate(client, {"prompt": name, "steps": steps, "guidance_scale": 7.5, "seed": 1}, size)
        times[name] = time.perf_counter() - began

    long_alone = time.perf_counter()
    with pool.client() as client:
        generate(client, {"prompt": "long", "steps": 60, "guidance_scale": 7.5, "seed": 1}, size)
    long_alone = time.perf_counter() - long_alone
    threads = [
        threading.Thread(target=timed, args=("long", 60, 0.0)),
        threading.Thread(target=timed, args=("short", 6, long_alone * 0.2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times["short"] / times["long"]


def one_client(pool: ClientPool, requests: list[dict[str, Any]], *, size: int) -> float:
    latencies = []
    with pool.client() as client:
        for fields in requests:
            began = time.perf_counter()
            generate(client, fields, size)
            latencies.append(time.perf_counter() - began)
    return median(latencies)


def peer_one_client(model: str, requests: list[dict[str, Any]], *, size: int, work: Path) -> float:
    """The naive Gradio peer (bench/naive_peer.py), one client in a row: the same 10-step requests."""
    with running_peer(model, work) as url:
        client = Client(url, verbose=False, download_files=str(work / "peer-downloads"))
        latencies = []
        for fields in [requests[0], *requests]:
            began = time.perf_counter()
            client.predict("a lighthouse at dusk", fields["seed"], fields["steps"], size, size, api_name="/generate")
            latencies.append(time.perf_counter() - began)
        return median(latencies[1:])


def measure_mode(
    model: Path, mode: str, *, capacity: float | None, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    with launched_app(model, work) as app:
        pool = ClientPool(app.url, CLIENT_POOL, work / f"downloads-{mode}")
        warm = workload(4, seed=99)
        closed_loop(pool, warm, clients=4, size=args.size)
        result: dict[str, Any] = {}
        if capacity is None:  # measured once, with the first mode, and used for both
            capacity = closed_loop(pool, workload(args.requests // 2, seed=1), clients=8, size=args.size)
            result["capacity_images_per_s"] = capacity
        for load in LOADS:
            rate = capacity * load
            requests = workload(args.requests, seed=int(load * 100))
            gaps = [random.Random(int(load * 1000) + n).expovariate(rate) for n in range(len(requests))]
            before = {name: app.metric(name) for name in METRICS}
            measured = open_loop(pool, requests, gaps, size=args.size)
            measured.update(metric_means(app, before))
            measured["arrival_rate"] = rate
            result[str(load)] = measured
            print(f"{mode} at {load:.0%}: {measured}", flush=True)
        result["short_share_of_long"] = short_during_long(pool, size=args.size)
        ten_steps = [{**fields, "steps": 10, "guidance_scale": 7.5} for fields in workload(args.one_client, seed=5)]
        result["one_client_p50_s"] = one_client(pool, ten_steps, size=args.size)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: a fresh tiny pipeline)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=60, help="requests per load level")
    parser.add_argument("--one-client", type=int, default=15, help="requests in the one-client comparison")
    parser.add_argument("--quick", action="store_true", help="few requests: checks the script, not the speed")
    parser.add_argument("--out", type=Path, help="folder for open_loop.json (default bench/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.one_client = 6, 2
    work = Path(tempfile.mkdtemp(prefix="bench-open-loop-"))
    model = Path(args.model) if args.model else build_tiny_pipeline(work / "tiny")
    modes: dict[str, dict[str, Any]] = {}
    capacity = None
    for mode in MODES:
        modes[mode] = measure_mode(model, mode, capacity=capacity, args=args, work=work)
        capacity = capacity or modes[mode]["capacity_images_per_s"]
    peer_p50 = peer_one_client(
        str(model),
        [{**fields, "steps": 10} for fields in workload(args.one_client, seed=5)],
        size=args.size,
        work=work,
    )
    rows = []
    for load in LOADS:
        for mode in MODES:
            m = modes[mode][str(load)]
            rows.append(
                [
                    f"{load:.0%}",
                    mode,
                    f"{m['images_per_s']:.2f}",
                    f"{m['p50_s'] * 1000:.0f}",
                    f"{m['p95_s'] * 1000:.0f}",
                    f"{m['wait_to_first_step_s'] * 1000:.0f}",
                    f"{m['mean_unet_batch']:.2f}",
                ]
            )
    print(table(["load", "batching", "images/s", "p50 ms", "p95 ms", "wait to 1st step ms", "mean UNet batch"], rows))
    step = modes["step"]
    wait_in_steps = step["0.8"]["wait_to_first_step_s"] / max(step["0.8"]["step_s"], 1e-9)
    print(f"\ncapacity (8 closed-loop clients): {capacity:.2f} images/s")
    print(f"80 % load: mean wait to first step = {wait_in_steps:.1f} step-times (target <= 2)")
    share = step["short_share_of_long"]
    print(f"6-step request during a 60-step one: {share:.0%} of the long one's time (target <= 35 %)")
    print(
        f"one client, 10 steps: p50 {step['one_client_p50_s'] * 1000:.0f} ms, naive peer {peer_p50 * 1000:.0f} ms "
        "(target: <= peer + 20 ms)"
    )
    results = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "capacity_images_per_s": capacity,
        "modes": modes,
        "peer_one_client_p50_s": peer_p50,
        "ratios": {
            "wait_to_first_step_in_step_times_at_80": wait_in_steps,
            "one_client_p50_over_peer": step["one_client_p50_s"] / peer_p50,
        },
    }
    print(f"written {write_json('open_loop.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
