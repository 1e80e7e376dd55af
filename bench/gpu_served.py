"""The served app end to end on a GPU against the raw pipeline at the same batch, in one run.

    python -m bench.gpu_served [--model DIR] [--clients 8,16] [--batch 8] [--per-client 3] [--compile]
    python -m bench.gpu_served --family sdxl --raw-batches 1,4,8 --clients 1,4,8
    python -m bench.gpu_served --tiny          # the tiny pipeline on the CPU (its own test)

SD 1.5's architecture with random weights (``bench.gpu``), 512x512, 25 steps with guidance;
``--family sdxl``: SDXL base's, 1024x1024, 30 steps. First the raw diffusers pipeline in this
process, ``--batch`` images per call (or each of ``--raw-batches``), one call at a time; then
the launched app (step engine, ``MAX_BATCH_SIZE=--batch``, S3 storage on a loopback
moto server, live previews ``approx``) driven by each count of concurrent ``gradio_client``
clients (``x raw``: against the raw pipeline at a batch of as many images as clients when it was
measured, else at ``--batch``). ``--compile`` compiles the raw UNet and starts the app with ``SD_COMPILE=true`` (its
warm-up compiles; keep ``TORCHINDUCTOR_CACHE_DIR`` warm). Prints images/s, p50/p95, the app's
mean UNet batch and served / raw; writes bench/results/gpu_served.json (gpu_served_sdxl.json for SDXL).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json
from bench.gpu import FAMILY_SHAPES, benchmark_model
from bench.serving import measure_app, raw_pipeline


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="the family's model folder (default: built with random weights)")
    parser.add_argument("--family", choices=sorted(FAMILY_SHAPES), default="sd", help="the architecture to build")
    parser.add_argument("--tiny", action="store_true", help="the family's tiny pipeline at 64x64, 4 steps (CPU check)")
    parser.add_argument("--clients", default="8,16", help="concurrent client counts, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="raw images per call, and the app's MAX_BATCH_SIZE")
    parser.add_argument("--per-client", type=int, default=3, help="requests each client makes in a row")
    parser.add_argument("--raw-calls", type=int, default=4, help="timed raw calls")
    parser.add_argument("--raw-batches", default="", help="raw batch sizes to time, comma-separated (default: --batch)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the raw UNet; SD_COMPILE=true in the app")
    parser.add_argument("--out", type=Path, help="folder for the results file (default bench/results)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # for the loopback S3 server only
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-served-"))
    model = str(benchmark_model(args.model, tiny=args.tiny, family=args.family))
    size, steps = (64, 4) if args.tiny else FAMILY_SHAPES[args.family]
    counts = tuple(int(n) for n in args.clients.split(","))
    batches = sorted({args.batch, *(int(n) for n in args.raw_batches.split(",") if n)})
    raws: dict[int, dict[str, float]] = {}
    for batch in batches:
        raws[batch] = raw_pipeline(
            model, size=size, steps=steps, requests_count=args.raw_calls, batch=batch, compile_unet=args.compile
        )
        print(f"raw pipeline, batch {batch}: {raws[batch]['images_per_s']:.2f} images/s", flush=True)
    raw = raws[args.batch]
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
    rows = [
        [
            f"raw pipeline, batch {batch}",
            "-",
            f"{r['images_per_s']:.2f}",
            f"{r['p50_s'] * 1000:.0f}",
            f"{r['p95_s'] * 1000:.0f}",
            str(batch),
            "1.00",
        ]
        for batch, r in raws.items()
    ]
    for clients, r in served.items():
        against = raws.get(clients, raw)
        rows.append(
            [
                "this app (S3 storage)",
                str(clients),
                f"{r['images_per_s']:.2f}",
                f"{r['p50_s'] * 1000:.0f}",
                f"{r['p95_s'] * 1000:.0f}",
                f"{r['mean_batch']:.1f}",
                f"{r['images_per_s'] / against['images_per_s']:.2f}",
            ]
        )
    print(table(["scenario", "clients", "images/s", "p50 ms", "p95 ms", "mean batch", "x raw"], rows))
    best = max(r["images_per_s"] for r in served.values()) / raw["images_per_s"]
    print(f"\nserved / raw at batch {args.batch}: {best:.2f} (target >= 0.9)")
    results = {
        "machine": machine(),
        "settings": {
            "family": args.family,
            "size": size,
            "steps": steps,
            "batch": args.batch,
            "compile": args.compile,
            "tiny": args.tiny,
        },
        "raw": raw,
        "raw_by_batch": {str(batch): r for batch, r in raws.items()},
        "served": {str(k): v for k, v in served.items()},
        "served_over_raw": best,
    }
    name = "gpu_served.json" if args.family == "sd" else f"gpu_served_{args.family}.json"
    print(f"written {write_json(name, results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
