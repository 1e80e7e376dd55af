"""Served throughput: the raw pipeline, a naive Gradio peer, and this app, in one run.

    python -m bench.serving [--model DIR | --kind tiny|heavy] [--size 64] [--steps 10] [--quick]
    python -m bench.serving --open-loop [...]   # bench.open_loop: Poisson arrivals on the step engine
    python -m bench.serving --previews [...]    # bench.previews: 8 clients with previews off, approx, taesd

Starts an S3-compatible server (moto) on loopback, the naive peer (bench/naive_peer.py) and
the real app (python app.py) with S3 storage, and drives both with gradio_client from 1, 4
and 8 concurrent clients. Prints one table of ratios and writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from gradio_client import Client

from bench.common import add_serving_arguments, machine, median, percentile, table, write_json
from bench.load import HARNESS_LIMITS
from harness.app_server import ROOT, launched_app
from harness.servers import free_port, running_s3_server, wait_for_port
from sd_pipeline.tiny import KINDS, build_tiny_pipeline

CLIENT_COUNTS = (1, 4, 8)


def raw_pipeline(
    model: str, *, size: int, steps: int, requests_count: int, batch: int = 1, compile_unet: bool = False
) -> dict[str, float]:
    """``requests_count`` calls straight into diffusers, one at a time, ``batch`` images each, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    if compile_unet:
        pipeline.unet = torch.compile(pipeline.unet)

    def one(seed: int) -> None:
        generators = [torch.Generator("cpu").manual_seed(seed * batch + n) for n in range(batch)]
        prompts = ["a lighthouse at dusk"] * batch
        pipeline(prompts, num_inference_steps=steps, width=size, height=size, generator=generators)

    one(0)
    latencies = []
    started = time.perf_counter()
    for seed in range(requests_count):
        began = time.perf_counter()
        one(seed)
        latencies.append(time.perf_counter() - began)
    wall = time.perf_counter() - started
    return {
        "images_per_s": requests_count * batch / wall,
        "p50_s": median(latencies),
        "p95_s": percentile(latencies, 0.95),
    }


def drive(url: str, *, clients: int, per_client: int, call: Any, downloads: Path | None) -> dict[str, float]:
    """``clients`` threads, each with its own gradio_client, making ``per_client`` calls in a row;
    each client downloads every file it is sent into ``downloads`` (None: it keeps the links)."""
    connected = [
        Client(url, verbose=False, download_files=str(downloads / str(n)) if downloads else False)
        for n in range(clients)
    ]
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(number: int) -> None:
        for request in range(per_client):
            began = time.perf_counter()
            try:
                call(connected[number], seed=number * 1000 + request)
            except BaseException as error:  # noqa: BLE001 - reported after the run
                errors.append(error)
                return
            with lock:
                latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]!r}")
    return {
        "images_per_s": len(latencies) / wall,
        "p50_s": median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "wall_s": wall,
    }


@contextmanager
def running_peer(model: str, work: Path) -> Iterator[str]:
    """The naive Gradio peer (bench/naive_peer.py) on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    with (work / "peer.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.naive_peer", "--model", model, "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_TEMP_DIR": str(work / "peer-gradio")},
        )
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure_peer(
    model: str, *, size: int, steps: int, per_client: dict[int, int], work: Path
) -> dict[int, dict[str, float]]:
    with running_peer(model, work) as url:

        def call(client: Client, *, seed: int) -> None:
            client.predict("a lighthouse at dusk", seed, steps, size, size, api_name="/generate")

        def ping(client: Client, *, seed: int) -> None:
            client.predict(str(seed), api_name="/ping")

        drive(url, clients=1, per_client=1, call=call, downloads=work / "peer-warm")
        measured = {
            n: drive(url, clients=n, per_client=per_client[n], call=call, downloads=work / f"peer-{n}")
            for n in CLIENT_COUNTS
        }
        measured[0] = drive(url, clients=1, per_client=per_client[1], call=ping, downloads=work / "ping")
        return measured


def measure_app(
    model: str,
    *,
    size: int,
    steps: int,
    per_client: dict[int, int],
    work: Path,
    client_counts: tuple[int, ...] = CLIENT_COUNTS,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120,
) -> dict[int, dict[str, float]]:
    """The launched app with S3 storage on loopback (moto) at each client count, and what its metrics say."""
    results: dict[int, dict[str, float]] = {}
    with running_s3_server() as s3:
        s3.create_bucket("bench")
        environment = {
            "S3_BUCKET": "bench",
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "S3_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            **HARNESS_LIMITS,
            **(env or {}),
        }
        with launched_app(Path(model), work, env=environment, ready_timeout=ready_timeout) as app:

            def call(client: Client, *, seed: int) -> None:
                client.predict(
                    prompt="a lighthouse at dusk", seed=seed, steps=steps, width=size, height=size, api_name="/generate"
                )

            drive(app.url, clients=1, per_client=1, call=call, downloads=work / "app-warm")
            for clients in client_counts:
                before = {
                    name: app.metric(name)
                    for name in (
                        "sdapp_batch_size_images_sum",
                        "sdapp_batch_size_images_count",
                        "sdapp_pipeline_idle_while_waiting_seconds_total",
                        "sdapp_pipeline_busy_seconds_total",
                    )
                }
                measured = drive(
                    app.url,
                    clients=clients,
                    per_client=per_client[clients],
                    call=call,
                    downloads=work / f"app-{clients}",
                )
                after = {name: app.metric(name) for name in before}
                calls = after["sdapp_batch_size_images_count"] - before["sdapp_batch_size_images_count"]
                measured["mean_batch"] = (
                    after["sdapp_batch_size_images_sum"] - before["sdapp_batch_size_images_sum"]
                ) / max(calls, 1)
                measured["idle_while_waiting_fraction"] = (
                    after["sdapp_pipeline_idle_while_waiting_seconds_total"]
                    - before["sdapp_pipeline_idle_while_waiting_seconds_total"]
                ) / measured["wall_s"]
                images = after["sdapp_batch_size_images_sum"] - before["sdapp_batch_size_images_sum"]
                busy = after["sdapp_pipeline_busy_seconds_total"] - before["sdapp_pipeline_busy_seconds_total"]
                measured["pipeline_seconds_per_image"] = busy / max(images, 1)
                measured["pipeline_busy_fraction"] = (
                    after["sdapp_pipeline_busy_seconds_total"] - before["sdapp_pipeline_busy_seconds_total"]
                ) / measured["wall_s"]
                results[clients] = measured
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if "--open-loop" in argv:
        from bench import open_loop

        return open_loop.main([arg for arg in argv if arg != "--open-loop"])
    if "--previews" in argv:
        from bench import previews

        return previews.main([arg for arg in argv if arg != "--previews"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serving_arguments(parser, "serving.json")
    parser.add_argument("--kind", choices=sorted(KINDS), default="tiny", help="tiny pipeline kind (without --model)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # for the loopback S3 server only
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model = args.model or str(build_tiny_pipeline(work / "tiny", kind=args.kind))
    per_client = {1: 2, 4: 1, 8: 1} if args.quick else {1: 20, 4: 8, 8: 6}
    raw = raw_pipeline(model, size=args.size, steps=args.steps, requests_count=3 if args.quick else 20)
    peer = measure_peer(model, size=args.size, steps=args.steps, per_client=per_client, work=work)
    ours = measure_app(model, size=args.size, steps=args.steps, per_client=per_client, work=work)
    rows = [
        [
            "raw pipeline, in-process",
            "1",
            f"{raw['images_per_s']:.1f}",
            f"{raw['p50_s'] * 1000:.0f}",
            f"{raw['p95_s'] * 1000:.0f}",
            "1.0",
            "-",
            "-",
            "-",
        ]
    ]
    for clients in CLIENT_COUNTS:
        p = peer[clients]
        rows.append(
            [
                "naive Gradio peer",
                str(clients),
                f"{p['images_per_s']:.1f}",
                f"{p['p50_s'] * 1000:.0f}",
                f"{p['p95_s'] * 1000:.0f}",
                "1.0",
                "-",
                f"{p['images_per_s'] / raw['images_per_s']:.2f}",
                "1.00",
            ]
        )
    for clients in CLIENT_COUNTS:
        o = ours[clients]
        rows.append(
            [
                "this app (S3 storage)",
                str(clients),
                f"{o['images_per_s']:.1f}",
                f"{o['p50_s'] * 1000:.0f}",
                f"{o['p95_s'] * 1000:.0f}",
                f"{o['mean_batch']:.1f}",
                f"{o['idle_while_waiting_fraction'] * 100:.1f}%",
                f"{o['images_per_s'] / raw['images_per_s']:.2f}",
                f"{o['images_per_s'] / peer[clients]['images_per_s']:.2f}",
            ]
        )
    print(
        table(
            [
                "scenario",
                "clients",
                "images/s",
                "p50 ms",
                "p95 ms",
                "mean batch",
                "idle while waiting",
                "x raw",
                "x peer",
            ],
            rows,
        )
    )
    added = (ours[1]["p50_s"] - raw["p50_s"]) * 1000
    floor = peer[0]["p50_s"] * 1000
    print(f"\n1 client: this app adds {added:.0f} ms to the raw p50 (target <= 60 ms, storage upload included);")
    print(f"  of that, {floor:.0f} ms is Gradio + gradio_client's own round trip (an echo endpoint, same run)")
    print(
        f"pipeline time per image inside the app: {ours[8]['pipeline_seconds_per_image'] * 1000:.0f} ms at a mean "
        f"batch of {ours[8]['mean_batch']:.1f} (8 clients), "
        f"{ours[1]['pipeline_seconds_per_image'] * 1000:.0f} ms alone; "
        f"raw in-process: {raw['p50_s'] * 1000:.0f} ms"
    )
    print(
        f"8 clients: {ours[8]['images_per_s'] / raw['images_per_s']:.2f}x raw (target >= 1.3), "
        f"{ours[8]['images_per_s'] / peer[8]['images_per_s']:.2f}x peer (target >= 1.5)"
    )
    results = {
        "machine": machine(),
        "settings": {"size": args.size, "steps": args.steps, "quick": args.quick, "per_client": per_client},
        "raw": raw,
        "peer": {str(k): v for k, v in peer.items() if k},
        "gradio_echo": peer[0],
        "ours": {str(k): v for k, v in ours.items()},
        "added_p50_ms_1_client": added,
        "gradio_round_trip_p50_ms": floor,
    }
    print(f"written {write_json('serving.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
