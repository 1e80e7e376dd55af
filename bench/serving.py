"""Served throughput: the raw pipeline, a naive Gradio peer, and this app, in one run.

    python -m bench.serving [--model DIR | --kind tiny|heavy] [--size 64] [--steps 10] [--quick]
    python -m bench.serving --open-loop [...]   # bench.open_loop: Poisson arrivals on the step engine
    python -m bench.serving --previews [...]    # bench.previews: 8 clients with previews off, approx, taesd

Calls the raw diffusers pipeline in this process with 1 and with 8 images per call, then starts an
S3-compatible server (moto) on loopback, the naive peer (bench/naive_peer.py) and the real app
(python app.py) with S3 storage side by side, and measures: one gradio_client user, its calls
alternating between peer and app; 4 and 8 light HTTP users (bench.load, so that the harness leaves
the cores to the servers) on each. Prints one table of ratios and writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from diffusers import DiffusionPipeline
from gradio_client import Client

from bench.common import add_serving_arguments, cpu_seconds, machine, median, percentile, table, write_json
from bench.load import HARNESS_LIMITS, Fields, drive_http
from harness.app_server import RunningApp, launched_app
from harness.servers import S3Server, free_port, running_gradio_module, running_s3_server
from sd_pipeline.tiny import KINDS, build_tiny_pipeline

CLIENT_COUNTS = (1, 4, 8)  # gradio_client users in measure_app (bench.gpu_served)
LIGHT_CLIENT_COUNTS = (4, 8)  # light HTTP users in this script's table
LOADED_USERS = 8


def raw_pipeline(
    model: str, *, size: int, steps: int, requests_count: int, batch: int = 1, compile_unet: bool = False
) -> dict[str, float]:
    """``requests_count`` calls straight into diffusers (the pipeline class the folder names), one at a
    time, ``batch`` images each, in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = DiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
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
    with running_gradio_module(
        ["bench.naive_peer", "--model", model, "--port", str(port)], port=port, work=work, name="peer"
    ):
        yield f"http://127.0.0.1:{port}/"


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


def lone_user_side_by_side(
    peer_url: str, app_url: str, *, calls: int, size: int, steps: int, downloads: Path
) -> dict[str, float]:
    """One gradio_client user each for the peer and the app (each downloads what it is sent, as
    gradio_client does by default), their calls alternating, so that whatever else the machine does
    falls on both alike; p50 of each, and of an echo endpoint (Gradio's own round trip)."""
    peer = Client(peer_url, verbose=False, download_files=str(downloads / "peer"))
    app = Client(app_url, verbose=False, download_files=str(downloads / "app"))
    calls_by_name: dict[str, Callable[[int], object]] = {
        "peer": lambda seed: peer.predict("a lighthouse at dusk", seed, steps, size, size, api_name="/generate"),
        "app": lambda seed: app.predict(
            prompt="a lighthouse at dusk", seed=seed, steps=steps, width=size, height=size, api_name="/generate"
        ),
        "echo": lambda seed: peer.predict(str(seed), api_name="/ping"),
    }
    times: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for seed in range(calls + 1):  # the first round warms both
        for name, call in calls_by_name.items():
            began = time.perf_counter()
            call(seed)
            if seed:
                times[name].append(time.perf_counter() - began)
    return {f"{name}_p50_s": median(values) for name, values in times.items()}


APP_COUNTERS = (
    "sdapp_batch_size_images_sum",
    "sdapp_batch_size_images_count",
    "sdapp_pipeline_idle_while_waiting_seconds_total",
    "sdapp_pipeline_busy_seconds_total",
)


def light_users(
    url: str, *, clients: int, per_client: int, size: int, steps: int, app: RunningApp | None = None
) -> dict[str, float]:
    """``clients`` light HTTP users (bench.load); with ``app``, what its metrics say about the same
    interval and the CPU its web process and its worker spent per image."""
    before = {name: app.metric(name) for name in APP_COUNTERS} if app else {}
    processes = _app_processes(app) if app else {}
    cpu_before = {name: cpu_seconds([process]) for name, process in processes.items()}
    fields = request_fields(size=size, steps=steps)
    measured: dict[str, float] = drive_http(url, clients=clients, per_client=per_client, fields=fields)
    if app is not None:
        requests_made = clients * per_client
        for name, process in processes.items():
            measured[f"{name}_cpu_seconds_per_image"] = (cpu_seconds([process]) - cpu_before[name]) / requests_made
        delta = {name: app.metric(name) - before[name] for name in APP_COUNTERS}
        images = delta["sdapp_batch_size_images_sum"]
        measured["mean_batch"] = images / max(delta["sdapp_batch_size_images_count"], 1)
        measured["idle_while_waiting_fraction"] = (
            delta["sdapp_pipeline_idle_while_waiting_seconds_total"] / measured["wall_s"]
        )
        # Busy seconds count denoising steps: per image finished, a request's whole denoising (its share of each step).
        measured["denoising_seconds_per_image"] = delta["sdapp_pipeline_busy_seconds_total"] / requests_made
        measured["pipeline_busy_fraction"] = delta["sdapp_pipeline_busy_seconds_total"] / measured["wall_s"]
    return measured


def cpu_ceiling(measured: dict[str, float]) -> float:
    """Images/s this machine's cores allow the app, from the CPU its web process and worker spent per image."""
    per_image = measured["web_cpu_seconds_per_image"] + measured.get("worker_cpu_seconds_per_image", 0.0)
    return (psutil.cpu_count() or 1) / per_image


def _app_processes(app: RunningApp) -> dict[str, psutil.Process]:
    """The app's web process and its pipeline worker."""
    worker = app.worker()
    found = {"web": psutil.Process(app.process.pid)}
    return {**found, "worker": worker} if worker is not None else found


def request_fields(*, size: int, steps: int) -> Fields:
    """The benchmark's request: a fixed prompt, size and steps, a new seed each time."""

    def fields(number: int) -> dict[str, Any]:
        return {"prompt": "a lighthouse at dusk", "seed": number, "steps": steps, "width": size, "height": size}

    return fields


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
    size, steps = args.size, args.steps
    per_client = {4: 1, 8: 1} if args.quick else {4: 8, 8: 8}
    raw = {
        batch: raw_pipeline(model, size=size, steps=steps, requests_count=2 if args.quick else 10, batch=batch)
        for batch in (1, LOADED_USERS)
    }
    with ExitStack() as running:
        s3 = running.enter_context(running_s3_server())
        peer_url = running.enter_context(running_peer(model, work))
        app = running.enter_context(launched_app(Path(model), work, env=app_environment(s3)))
        lone = lone_user_side_by_side(
            peer_url, app.url, calls=3 if args.quick else 20, size=size, steps=steps, downloads=work / "lone"
        )
        light_users(app.url, clients=1, per_client=2, size=size, steps=steps)  # warms the light client's path
        peer = {
            n: light_users(peer_url, clients=n, per_client=per_client[n], size=size, steps=steps)
            for n in LIGHT_CLIENT_COUNTS
        }
        ours = {
            n: light_users(app.url, clients=n, per_client=per_client[n], size=size, steps=steps, app=app)
            for n in LIGHT_CLIENT_COUNTS
        }
    print(table(*serving_table(raw, lone, peer, ours)))
    added = (lone["app_p50_s"] - lone["peer_p50_s"]) * 1000
    loaded = ours[LOADED_USERS]["images_per_s"]
    ratios = {
        "lone_user_p50_minus_peer_ms": added,
        "loaded_over_raw_batch": loaded / raw[LOADED_USERS]["images_per_s"],
        "loaded_over_peer": loaded / peer[LOADED_USERS]["images_per_s"],
        "ceiling_over_raw_batch": cpu_ceiling(ours[LOADED_USERS]) / raw[LOADED_USERS]["images_per_s"],
    }
    print(
        f"\n1 gradio_client user: this app's p50 is {added:+.0f} ms against the naive peer's "
        f"(target <= +20; calls alternate between the two); Gradio's own round trip (echo) is "
        f"{lone['echo_p50_s'] * 1000:.0f} ms"
    )
    print(
        f"{LOADED_USERS} light HTTP users: {ratios['loaded_over_raw_batch']:.2f}x the raw pipeline called with "
        f"{LOADED_USERS} images at once (target >= 0.9), {ratios['loaded_over_peer']:.2f}x the peer (target >= 1.5); "
        f"the app's worker denoises for {ours[LOADED_USERS]['denoising_seconds_per_image'] * 1000:.0f} ms per image "
        f"(mean batch {ours[LOADED_USERS]['mean_batch']:.1f}) and is busy "
        f"{ours[LOADED_USERS]['pipeline_busy_fraction'] * 100:.0f} % of the time; CPU per image: web process "
        f"{ours[LOADED_USERS]['web_cpu_seconds_per_image'] * 1000:.0f} ms, worker "
        f"{ours[LOADED_USERS].get('worker_cpu_seconds_per_image', 0) * 1000:.0f} ms"
    )
    print(
        f"With the cores this machine has ({psutil.cpu_count()}) and the pipeline on them, those two processes alone "
        f"allow at most {cpu_ceiling(ours[LOADED_USERS]):.1f} images/s even if nothing ever waited: "
        f"{ratios['ceiling_over_raw_batch']:.2f}x the raw pipeline at batch {LOADED_USERS}"
    )
    results = {
        "machine": machine(),
        "settings": {"size": size, "steps": steps, "quick": args.quick, "per_client": per_client},
        "raw": {str(k): v for k, v in raw.items()},
        "lone_user": lone,
        "peer": {str(k): v for k, v in peer.items()},
        "ours": {str(k): v for k, v in ours.items()},
        "ratios": ratios,
    }
    print(f"written {write_json('serving.json', results, folder=args.out)}")
    return results


def app_environment(s3: S3Server) -> dict[str, str]:
    """The app's settings for a benchmark: S3 on the loopback server, the harness's limits lifted."""
    s3.create_bucket("bench")
    return {
        "S3_BUCKET": "bench",
        "S3_ENDPOINT_URL": s3.endpoint_url,
        "S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        **HARNESS_LIMITS,
    }


def serving_table(
    raw: dict[int, dict[str, float]],
    lone: dict[str, float],
    peer: dict[int, dict[str, float]],
    ours: dict[int, dict[str, float]],
) -> tuple[list[str], list[list[str]]]:
    """The printed table: raw at batch 1 and 8, the lone user, and the light users on peer and app."""
    headers = ["scenario", "users", "images/s", "p50 ms", "p95 ms", "mean batch", "x raw batch 8", "x peer"]
    full = raw[LOADED_USERS]["images_per_s"]
    rows = []
    for batch, r in raw.items():
        speed = [f"{r['images_per_s']:.1f}", f"{r['p50_s'] * 1000:.0f}", f"{r['p95_s'] * 1000:.0f}"]
        rows.append(
            [
                f"raw pipeline, {batch} image(s) per call",
                "-",
                *speed,
                str(batch),
                f"{r['images_per_s'] / full:.2f}",
                "-",
            ]
        )
    rows.append(["naive Gradio peer (gradio_client)", "1", "-", f"{lone['peer_p50_s'] * 1000:.0f}", "-", "1", "-", "-"])
    rows.append(["this app (gradio_client)", "1", "-", f"{lone['app_p50_s'] * 1000:.0f}", "-", "-", "-", "-"])
    for name, measured in (("naive Gradio peer (light HTTP)", peer), ("this app, S3 (light HTTP)", ours)):
        for users, r in measured.items():
            batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "1"
            speed = [f"{r['images_per_s']:.1f}", f"{r['p50_s'] * 1000:.0f}", f"{r['p95_s'] * 1000:.0f}"]
            ratios = [f"{r['images_per_s'] / full:.2f}", f"{r['images_per_s'] / peer[users]['images_per_s']:.2f}"]
            rows.append([name, str(users), *speed, batch, *ratios])
    return headers, rows


if __name__ == "__main__":
    main()
