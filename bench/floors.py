"""What the frameworks cost before any of this app's code: Gradio's queue and Ray Serve's streaming calls, bare.

    python -m bench.floors [--quick]

1. **Gradio**: a bare Blocks app shaped like ``/generate`` (a prompt and 14 numbers in; an async
   generator that yields ``P`` previews, each a 64x64 PIL picture in a Gallery with a progress
   update, then a PNG file in the Gallery and a JSON), with ``P`` = 0 and 2, driven by light HTTP
   users (``bench.load``, as ``bench.serving`` and ``bench.scaleout --simulate`` drive the app;
   one server, the prompt says how many previews): the server process's CPU per request.
   Gradio's queue, its SSE stream and its output processing are all there is, so this is the
   least any Gradio front end spends per request.
2. **Ray Serve**: a bare deployment whose streaming method yields ``I`` small messages spread over
   about 1.1 s (one request's step reports, previews and result through a replica stream, over a
   simulated H200's time), 8 replicas holding no core, 32 requests at a time from this process
   through a handle, with ``I`` = 1 and 9: CPU per request of this process (what a front end pays
   for its calls) and of Ray's processes (replicas, controller, raylet, GCS). The instance is
   private and on loopback, as the app's own, and started once (each call says how many
   messages).

Prints each floor beside issue 31's per-image targets for ``bench.scaleout --simulate`` (front
end <= 20 ms, replicas + Ray <= 25 ms) and writes bench/results/floors.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench.common import cpu_seconds, machine, table, write_json
from bench.load import Fields, drive_http
from harness.servers import free_port, running_gradio_module
from sd_pipeline.contract.plans import RayPlan

FRONT_END_TARGET_MS = 20.0  # issue 31, bench.scaleout --simulate: front-end CPU per image
RAY_TARGET_MS = 25.0  # issue 31: replicas + Ray CPU per image
PREVIEW_COUNTS = (0, 2)
MESSAGE_COUNTS = (1, 9)
REQUEST_SECONDS = 1.1  # one request on a simulated H200 (25 steps at a batch of about 4, and the decode)


def serve_bare_gradio(port: int) -> None:
    """The bare ``/generate``-shaped Gradio app on 127.0.0.1:``port`` (run in a process of its own);
    the prompt says how many previews a request yields."""
    import gradio as gr
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bare-gradio-"))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    tracker = gr.Progress()  # Gradio fills in the request's tracker (it finds the parameter by its default's type)

    async def generate(prompt: str, *numbers: float, progress: Any = tracker) -> AsyncIterator[Any]:
        for step in range(int(prompt)):
            progress(step / 10, desc=f"step {step}/10")
            yield [(picture, f"preview · step {step}/10")], {"images": [], "preview": {"step": step, "total": 10}}
        path = folder / f"{os.urandom(8).hex()}.png"
        picture.save(path)
        yield [(str(path), "seed 1")], {"images": [{"prompt": prompt, "seed": 1, "link": "https://example.invalid"}]}

    with gr.Blocks(analytics_enabled=False) as demo:
        fields = [gr.Textbox(label="prompt"), *(gr.Number(label=f"number {n}") for n in range(14))]
        outputs = [gr.Gallery(format="jpeg"), gr.JSON()]
        gr.Button().click(generate, fields, outputs, api_name="generate", concurrency_limit=None)
    demo.queue(default_concurrency_limit=16).launch(server_name="127.0.0.1", server_port=port, quiet=True)


@contextmanager
def bare_gradio() -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="bench-floors-"))
    arguments = ["bench.floors", "--serve-bare-gradio", str(port)]
    with running_gradio_module(arguments, port=port, work=work, name="bare-gradio") as process:
        yield f"http://127.0.0.1:{port}/", psutil.Process(process.pid)


def gradio_floors(*, users: int, requests: int) -> dict[int, dict[str, float]]:
    """The bare app's CPU per request for each preview count, ``users`` light HTTP users making ``requests``."""
    results = {}
    with bare_gradio() as (url, server):
        drive_http(url, clients=2, per_client=3, fields=lambda number: {"prompt": str(max(PREVIEW_COUNTS))})
        per_client = requests // users
        for previews in PREVIEW_COUNTS:
            before = cpu_seconds([server])
            measured = drive_http(url, clients=users, per_client=per_client, fields=_asking_for(previews))
            spent = cpu_seconds([server]) - before
            results[previews] = {"server_cpu_ms_per_request": spent / (users * per_client) * 1000, **measured}
    return results


def _asking_for(previews: int) -> Fields:
    return lambda number: {"prompt": str(previews)}


@contextmanager
def bare_ray_serve(replicas: int) -> Iterator[Any]:
    """A private loopback Ray instance with a bare streaming deployment; yields its handle. Each call
    says how many messages it streams."""
    from sd_pipeline.backends.ray.loopback import LOOPBACK_SWITCH, start_private_instance

    os.environ.setdefault(LOOPBACK_SWITCH, "0")  # before Ray is imported: the node stays on 127.0.0.1
    import ray
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
    class Messages:
        def __init__(self) -> None:
            from sd_pipeline.backends.ray.loopback import keep_this_replica_on_loopback

            keep_this_replica_on_loopback()

        async def generate(self, messages: int, request: bytes) -> AsyncIterator[bytes]:
            for _ in range(messages):
                await asyncio.sleep(REQUEST_SECONDS / messages)
                yield b"m" * 200

    private_dir = start_private_instance(num_cpus=2, object_store_bytes=RayPlan(address="local").object_store_bytes)
    try:
        serve.start(http_options={"location": "NoServer"})
        yield serve.run(Messages.bind(), name="floor")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(private_dir, ignore_errors=True)


def ray_floors(*, replicas: int, concurrent: int, per_user: int) -> dict[int, dict[str, float]]:
    """For each message count: CPU per request of this process (the caller) and of Ray's processes."""

    async def user(handle: Any, messages: int, count: int) -> None:
        for _ in range(count):
            async for _ in handle.options(stream=True).generate.remote(messages, b"r" * 300):
                pass

    async def measure(handle: Any, messages: int) -> dict[str, float]:
        await asyncio.gather(*(user(handle, messages, 2) for _ in range(replicas)))
        caller = psutil.Process()
        ray_processes = caller.children(recursive=True)
        caller_before, ray_before = cpu_seconds([caller]), cpu_seconds(ray_processes)
        started = time.perf_counter()
        await asyncio.gather(*(user(handle, messages, per_user) for _ in range(concurrent)))
        wall = time.perf_counter() - started
        made = concurrent * per_user
        return {
            "caller_cpu_ms_per_request": (cpu_seconds([caller]) - caller_before) / made * 1000,
            "ray_cpu_ms_per_request": (cpu_seconds(ray_processes) - ray_before) / made * 1000,
            "requests_per_s": made / wall,
        }

    with bare_ray_serve(replicas) as handle:
        return {messages: asyncio.run(measure(handle, messages)) for messages in MESSAGE_COUNTS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-bare-gradio"]:
        serve_bare_gradio(int(argv[1]))
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few requests: checks the script, not the speed")
    parser.add_argument("--out", type=Path, help="folder for floors.json (default bench/results)")
    args = parser.parse_args(argv)
    users, requests = (4, 24) if args.quick else (32, 320)
    replicas, concurrent, per_user = (2, 4, 1) if args.quick else (8, 32, 8)
    gradio = gradio_floors(users=users, requests=requests)
    ray = ray_floors(replicas=replicas, concurrent=concurrent, per_user=per_user)
    rows = [
        [f"bare Gradio /generate, {p} previews", f"{users} HTTP users", f"{g['server_cpu_ms_per_request']:.1f}", "-"]
        for p, g in gradio.items()
    ]
    rows += [
        [
            f"bare Ray Serve stream, {m} messages",
            f"{replicas} replicas, {concurrent} at once",
            f"{r['caller_cpu_ms_per_request']:.1f}",
            f"{r['ray_cpu_ms_per_request']:.1f}",
        ]
        for m, r in ray.items()
    ]
    print(table(["framework alone", "load", "front-end CPU ms/request", "Ray processes CPU ms/request"], rows))
    front_end_floor = gradio[max(PREVIEW_COUNTS)]["server_cpu_ms_per_request"]
    front_end_floor += ray[max(MESSAGE_COUNTS)]["caller_cpu_ms_per_request"]
    print(
        f"\nA front end that streams {max(PREVIEW_COUNTS)} previews and calls Ray replicas spends at least "
        f"{front_end_floor:.1f} ms of CPU per request in Gradio and Ray alone (target for the whole front end: "
        f"<= {FRONT_END_TARGET_MS:.0f}); Ray's processes at least "
        f"{ray[max(MESSAGE_COUNTS)]['ray_cpu_ms_per_request']:.1f} ms per request before the engine's own work "
        f"(target for replicas + Ray: <= {RAY_TARGET_MS:.0f})"
    )
    results = {
        "machine": machine(),
        "settings": {"quick": args.quick, "users": users, "requests": requests, "replicas": replicas},
        "gradio": {str(p): g for p, g in gradio.items()},
        "ray": {str(m): r for m, r in ray.items()},
        "front_end_floor_ms": front_end_floor,
    }
    print(f"written {write_json('floors.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
