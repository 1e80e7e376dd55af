"""What live previews cost: the launched app with SD_PREVIEW=off, approx and taesd, in one run.

    python -m bench.previews [--model DIR] [--size 64] [--steps 25] [--clients 8] [--interval 0.5] [--quick]
    python -m bench.serving --previews [...]   # the same

The app (local storage, tiny model) runs once per mode; ``--clients`` gradio_client clients make
requests in a row through ``submit`` (so they receive the previews as intermediate outputs),
keeping the links they are sent; then again downloading every file (preview and image), which on
a 2-core machine takes CPU from the server (the table shows both).
``taesd`` decodes with diffusers' AutoencoderTiny at its real size, random weights (the Hub is out
of reach: the cost is the same). Also per mode: how long after the first denoising step the first
preview reaches a lone client (target: within one preview interval). Prints a table with each
mode's images/s against ``off`` (targets: approx >= 0.97x, taesd >= 0.9x) and writes
bench/results/previews.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from gradio_client import Client

from bench.common import add_serving_arguments, machine, table, write_json
from bench.serving import drive
from harness.app_server import RunningApp, launched_app
from sd_pipeline.contract.settings import DEFAULT_PREVIEW_INTERVAL
from sd_pipeline.tiny import build_tiny_pipeline

MODES = ("off", "approx", "taesd")
QUICK_INTERVAL = 0.001  # --quick's requests end within 0.5 s: none would be previewed (the engine's rule)


def tiny_decoder(folder: Path) -> Path:
    """diffusers' AutoencoderTiny with TAESD's default architecture and random weights."""
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(folder)
    return folder


def first_preview_delay(app: RunningApp, fields: dict[str, Any], downloads: Path) -> float:
    """Seconds from the end of a lone request's first denoising step to its first preview at the client.

    The client sees the preview ``seen`` seconds after submitting; the first step ended after the
    request's wait in the queue and in the worker plus one step, which the app's metrics give."""
    names = ("sdapp_queue_wait_seconds_sum", "sdapp_first_step_wait_seconds_sum")
    names += ("sdapp_denoising_step_seconds_sum", "sdapp_denoising_step_seconds_count")
    before = {name: app.metric(name) for name in names}
    client = Client(app.url, verbose=False, download_files=str(downloads))
    submitted = time.perf_counter()
    job = client.submit(prompt="a lighthouse at dusk", api_name="/generate", **{**fields, "steps": 4 * fields["steps"]})
    seen = None
    while seen is None and not job.done():
        if any(result.get("preview") for _, result in job.outputs()):
            seen = time.perf_counter() - submitted
        time.sleep(0.005)
    job.result(timeout=300)
    delta = {name: app.metric(name) - before[name] for name in names}
    one_step = delta["sdapp_denoising_step_seconds_sum"] / max(delta["sdapp_denoising_step_seconds_count"], 1)
    first_step_done = delta["sdapp_queue_wait_seconds_sum"] + delta["sdapp_first_step_wait_seconds_sum"] + one_step
    return float("nan") if seen is None else max(0.0, seen - first_step_done)


def measure_mode(mode: str, model: Path, args: argparse.Namespace, work: Path, decoder: Path) -> dict[str, Any]:
    env = {"SD_PREVIEW": mode, "PREVIEW_INTERVAL_SECONDS": str(args.interval), "SD_PREVIEW_DECODER": str(decoder)}
    fields = {"steps": args.steps, "width": args.size, "height": args.size}
    previews: list[int] = []
    (work / mode).mkdir()
    with launched_app(model, work / mode, env=env) as app:

        def call(client: Client, *, seed: int) -> None:
            job = client.submit(prompt="a lighthouse at dusk", seed=seed, api_name="/generate", **fields)
            job.result(timeout=300)
            previews.append(sum(bool(result.get("preview")) for _, result in job.outputs()))

        drive(app.url, clients=1, per_client=1, call=call, downloads=work / f"{mode}-warm")
        previews.clear()
        measured = drive(app.url, clients=args.clients, per_client=args.per_client, call=call, downloads=None)
        measured["previews_per_request"] = sum(previews) / max(len(previews), 1)
        downloading = drive(app.url, clients=args.clients, per_client=args.per_client, call=call, downloads=work / mode)
        measured["downloading_images_per_s"] = downloading["images_per_s"]
        if mode != "off":
            measured["first_preview_after_first_step_s"] = first_preview_delay(app, fields, work / f"{mode}-first")
    print(f"{mode}: {measured}", flush=True)
    return measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serving_arguments(parser, "previews.json")
    parser.set_defaults(steps=25)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=6)
    parser.add_argument("--interval", type=float, default=DEFAULT_PREVIEW_INTERVAL, help="PREVIEW_INTERVAL_SECONDS")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.per_client, args.steps, args.interval = 2, 1, 12, QUICK_INTERVAL
    work = Path(tempfile.mkdtemp(prefix="bench-previews-"))
    model = Path(args.model) if args.model else build_tiny_pipeline(work / "tiny")
    decoder = tiny_decoder(work / "taesd-decoder")
    modes = {mode: measure_mode(mode, model, args, work, decoder) for mode in MODES}
    off, off_downloading = modes["off"]["images_per_s"], modes["off"]["downloading_images_per_s"]
    rows = [
        [
            mode,
            f"{m['images_per_s']:.2f}",
            f"{m['p50_s'] * 1000:.0f}",
            f"{m['p95_s'] * 1000:.0f}",
            f"{m['previews_per_request']:.1f}",
            "-" if mode == "off" else f"{m['first_preview_after_first_step_s'] * 1000:.0f}",
            f"{m['images_per_s'] / off:.2f}",
            f"{m['downloading_images_per_s']:.2f}",
            f"{m['downloading_images_per_s'] / off_downloading:.2f}",
        ]
        for mode, m in modes.items()
    ]
    headers = ["previews", "images/s", "p50 ms", "p95 ms", "previews/request", "1st preview after step 1 ms", "x off"]
    headers += ["images/s, clients download all", "x off"]
    print(table(headers, rows))
    ratios = {mode: modes[mode]["images_per_s"] / off for mode in ("approx", "taesd")}
    print(f"\napprox: {ratios['approx']:.2f}x off (target >= 0.97); taesd: {ratios['taesd']:.2f}x off (target >= 0.9)")
    print("(clients that take links; when the clients on this machine also download every preview, they take")
    print(" CPU from the server: the last two columns)")
    results = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "interval_s": args.interval,
        "modes": modes,
        "ratios": ratios,
    }
    print(f"written {write_json('previews.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
