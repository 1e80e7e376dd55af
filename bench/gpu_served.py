"""The served app end to end on a GPU against the raw pipeline at the same batch, in one run.

    python -m bench.gpu_served [--model DIR] [--clients 8,16] [--batch 8] [--per-client 3] [--compile]
    python -m bench.gpu_served --tiny          # the tiny pipeline on the CPU (its own test)

SD 1.5's architecture with random weights (``bench.gpu``), 512x512, 25 steps with guidance.
First the raw diffusers pipeline in this process, ``--batch`` images per call, one call at a
time; then the launched app (step engine, ``MAX_BATCH_SIZE=--batch``, S3 storage on a loopback
moto server, live previews ``approx``) driven by each count of concurrent ``gradio_client``
clients. ``--compile`` compiles the raw UNet and starts the app with ``SD_COMPILE=true`` (its
warm-up compiles; keep ``TORCHINDUCTOR_CACHE_DIR`` warm). Prints images/s, p50/p95, the app's
mean UNet batch and served / raw; writes bench/results/gpu_served.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json
from bench.gpu import benchmark_model
from bench.serving import measure_app, raw_pipeline


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="SD 1.5-architecture folder (default: built with random weights)")
    parser.add_argument("--tiny", action="store_true", help="the tiny pipeline at 64x64, 4 steps (CPU check)")
    parser.add_argument("--clients", default="8,16", help="concurrent client counts, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="raw images per call, and the app's MAX_BATCH_SIZE")
    parser.add_argument("--per-client", type=int, default=3, help="requests each client makes in a row")
    parser.add_argument("--raw-calls", type=int, default=4, help="timed raw calls")
    parser.add_argument("--compile", action="store_true", help="torch.compile the raw UNet; SD_COMPILE=true in the app")
    parser.add_argument("--out", type=Path, help="folder for gpu_served.json (default bench/results)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # for the loopback S3 server only
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-served-"))
    model = str(benchmark_model(args.model, tiny=args.tiny))
    size, steps = (64, 4) if args.tiny else (512, 25)
    counts = tuple(int(n) for n in args.clients.split(","))
    raw = raw_pipeline(
        model, size=size, steps=steps, requests_count=args.raw_calls, batch=args.batch, compile_unet=args.compile
    )
    print(f"raw pipeline, batch {args.batch}: {raw['images_per_s']:.2f} images/s", flush=True)
    env = {"MAX_BATCH_SIZE": str(args.batch), "QUEUE_MAX_SIZE": str(max(64, 2 * max(counts)))}
    if args.compile:
        env["SD_COMPILE"] = "true"
    served = measure_app(
        model,
        size=size,
        steps=steps,
        per_client=dict.fromkeys(counts, args.per_client),
        work=work,
        client_counts=counts,
        env=env,
        ready_timeout=900,
    )
    raw_row = [f"raw pipeline, batch {args.batch}", "-", f"{raw['images_per_s']:.2f}", f"{raw['p50_s'] * 1000:.0f}"]
    rows = [[*raw_row, f"{raw['p95_s'] * 1000:.0f}", str(args.batch), "1.00"]]
    for clients, r in served.items():
        rows.append(
            [
                "this app (S3 storage)",
                str(clients),
                f"{r['images_per_s']:.2f}",
                f"{r['p50_s'] * 1000:.0f}",
                f"{r['p95_s'] * 1000:.0f}",
                f"{r['mean_batch']:.1f}",
                f"{r['images_per_s'] / raw['images_per_s']:.2f}",
            ]
        )
    print(table(["scenario", "clients", "images/s", "p50 ms", "p95 ms", "mean batch", "x raw"], rows))
    best = max(r["images_per_s"] for r in served.values()) / raw["images_per_s"]
    print(f"\nserved / raw at batch {args.batch}: {best:.2f} (target >= 0.9)")
    results = {
        "machine": machine(),
        "settings": {"size": size, "steps": steps, "batch": args.batch, "compile": args.compile, "tiny": args.tiny},
        "raw": raw,
        "served": {str(k): v for k, v in served.items()},
        "served_over_raw": best,
    }
    print(f"written {write_json('gpu_served.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
