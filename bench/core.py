"""The step engine: time per image, and 4 requests stepping together against 4 run one after another, in one run.

python -m bench.core [--model DIR | --family sd|sd2|sdxl|sd3|flux|flux-schnell] [--size 64] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import machine, median, table, timed, write_json
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline
from sd_pipeline.tiny import FAMILIES, build_tiny_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder or id (default: a fresh tiny pipeline of --family)")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="the tiny pipeline's family")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model = args.model or str(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny", family=args.family))
    engine = StepEngine(load_pipeline(PipelineSettings(model=model)))
    fields = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size, "height": args.size}
    rules = engine.loaded.family.rules
    singles = [check_inputs({**fields, "seed": seed}, rules=rules) for seed in range(4)]
    engine.generate(singles[:1])  # warm-up

    one = timed(lambda: engine.generate(singles[:1]), repeats=args.repeats)
    four_single = timed(lambda: [engine.generate([request]) for request in singles], repeats=args.repeats)
    four_batched = timed(lambda: engine.generate(singles), repeats=args.repeats)
    results = {
        "machine": machine(),
        "settings": {
            "model": engine.loaded.model,
            "family": engine.loaded.family.name,
            "size": args.size,
            "steps": args.steps,
            "repeats": args.repeats,
        },
        "seconds_per_image_single": median(one),
        "four_single_calls_seconds": median(four_single),
        "one_batch_of_four_seconds": median(four_batched),
    }
    results["batch_speedup"] = results["four_single_calls_seconds"] / results["one_batch_of_four_seconds"]
    print(
        table(
            ["measure", "median seconds", "images/s"],
            [
                ["1 image, 1 call", f"{median(one):.3f}", f"{1 / median(one):.1f}"],
                ["4 images, 4 calls", f"{median(four_single):.3f}", f"{4 / median(four_single):.1f}"],
                ["4 images, 1 batched call", f"{median(four_batched):.3f}", f"{4 / median(four_batched):.1f}"],
            ],
        )
    )
    print(f"\n{engine.loaded.family.title}: batch of 4 vs 4 single calls: {results['batch_speedup']:.2f}x throughput")
    print(f"written {write_json('core.json', results)}")


if __name__ == "__main__":
    main()
