"""LoRA per request: what several different adapters in one step batch cost, side by side in one run.

python -m bench.loras [--family sd|sdxl|sd3|flux] [--kind tiny|heavy] [--size 64] [--steps 10] [--rank 16] [--repeats 5]

Four requests stepping together, each with its own adapter, against the same four sharing one
adapter; one request with an adapter against the same request without. Every adapter is already
loaded (the cache), so this is the per-step cost of applying them per row. Measures are interleaved
repeat by repeat so a slower moment of the machine touches every measure alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import interleaved, machine, table, write_json
from sd_pipeline.contract.request import GenerationRequest, check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.loras.folder import LoraFolder
from sd_pipeline.loras.random import write_random_lora
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline
from sd_pipeline.model.loras import LoraAdapters
from sd_pipeline.tiny import KINDS, build_tiny_pipeline

ADAPTERS = ("one", "two", "three", "four")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux"), default="sd")
    parser.add_argument("--kind", choices=sorted(KINDS), default="tiny", help="sd only: heavy: compute dominates")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp())
    model = build_tiny_pipeline(work / "model", family=args.family, kind=args.kind)
    for seed, name in enumerate(ADAPTERS):
        write_random_lora(model, work / "loras" / f"{name}.safetensors", seed=seed, rank=args.rank, file_format="peft")
    loaded = load_pipeline(PipelineSettings(model=str(model)))
    adapters = LoraAdapters(loaded.pipeline, LoraFolder(work / "loras"), cache_bytes=2**34)
    engine = StepEngine(loaded, loras=adapters)
    rules = loaded.family.rules
    fields = {"steps": args.steps, "width": args.size, "height": args.size, "scheduler": rules.default_sampler}

    def ask(prompt: str, seed: int) -> GenerationRequest:
        return check_inputs(
            {"prompt": prompt, "seed": seed, **fields}, rules=rules, adapters=lambda: dict.fromkeys(ADAPTERS, "")
        )

    shared = [ask("a lighthouse <lora:one:0.8>", seed) for seed in range(4)]
    mixed = [ask(f"a lighthouse <lora:{name}:0.8>", seed) for seed, name in enumerate(ADAPTERS)]
    lone_with, lone_without = [ask("a lighthouse <lora:one:0.8>", 0)], [ask("a lighthouse", 0)]
    engine.generate(mixed)  # loads every adapter and warms up
    seconds = interleaved(
        {
            "4 requests, one shared adapter": lambda: engine.generate(shared),
            "4 requests, 4 different adapters": lambda: engine.generate(mixed),
            "1 request, no adapter": lambda: engine.generate(lone_without),
            "1 request, one adapter": lambda: engine.generate(lone_with),
        },
        args.repeats,
    )
    mixed_ratio = seconds["4 requests, 4 different adapters"] / seconds["4 requests, one shared adapter"]
    lone_ratio = seconds["1 request, one adapter"] / seconds["1 request, no adapter"]
    print(table(["measure", "median seconds"], [[name, f"{value:.3f}"] for name, value in seconds.items()]))
    print(f"\n{loaded.family.title}, rank {args.rank}, {args.size}x{args.size}, {args.steps} steps:")
    print(f"4 different adapters vs one shared: {mixed_ratio:.2f}x the time (target <= 1.25x)")
    print(f"a lone request with an adapter vs without: {lone_ratio:.2f}x the time (target <= 1.15x)")
    results = {
        "machine": machine(),
        "settings": {**vars(args), "model": loaded.model},
        "median_seconds": seconds,
        "four_adapters_vs_one_shared": mixed_ratio,
        "lone_with_adapter_vs_without": lone_ratio,
    }
    print(f"written {write_json('loras.json', results)}")


if __name__ == "__main__":
    main()
