"""Image-to-image and inpainting on the step engine: what serving them together saves, side by side in one run.

python -m bench.pictures [--family sd|sdxl|sd3|flux] [--kind tiny|heavy] [--size 64] [--steps 10] [--repeats 5]

Four requests arriving together (text-to-image, image-to-image at strength 0.5 and 0.75,
inpainting at 0.75: three different start steps) against the same four one after another; and
one image-to-image request at strength 0.5 against the same request drawn from text (it runs
half the steps, plus a VAE encode). Measures are interleaved repeat by repeat.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import interleaved, machine, table, write_json
from sd_pipeline.contract.request import GenerationRequest, check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline
from sd_pipeline.tiny import KINDS, build_tiny_pipeline


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux"), default="sd")
    parser.add_argument("--kind", choices=sorted(KINDS), default="tiny", help="sd only: heavy: compute dominates")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "model", family=args.family, kind=args.kind)
    loaded = load_pipeline(PipelineSettings(model=str(model)))
    engine = StepEngine(loaded)
    rules = loaded.family.rules
    side = args.size
    start = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)))
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rectangle([side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill=255)
    fields = {"steps": args.steps, "width": side, "height": side, "scheduler": rules.default_sampler}

    def ask(seed: int, **more: object) -> GenerationRequest:
        return check_inputs({"prompt": "a lighthouse", "seed": seed, **fields, **more}, rules=rules)

    mixed = [
        ask(0),
        ask(1, init_image=start, strength=0.5),
        ask(2, init_image=start, strength=0.75),
        ask(3, init_image=start, mask=png(mask), strength=0.75),
    ]
    from_picture, from_text = [ask(1, init_image=start, strength=0.5)], [ask(1)]
    engine.generate(mixed)  # warm-up
    seconds = interleaved(
        {
            "4 requests together (txt2img, img2img x2, inpaint)": lambda: engine.generate(mixed),
            "the same 4 one after another": lambda: [engine.generate([request]) for request in mixed],
            "1 image-to-image request, strength 0.5": lambda: engine.generate(from_picture),
            "1 text-to-image request": lambda: engine.generate(from_text),
        },
        args.repeats,
    )
    together = seconds["4 requests together (txt2img, img2img x2, inpaint)"] / seconds["the same 4 one after another"]
    half = seconds["1 image-to-image request, strength 0.5"] / seconds["1 text-to-image request"]
    print(table(["measure", "median seconds"], [[name, f"{value:.3f}"] for name, value in seconds.items()]))
    print(f"\n{loaded.family.title}, {side}x{side}, {args.steps} steps:")
    print(f"4 mixed requests together vs one after another: {together:.2f}x the time")
    print(f"image-to-image at strength 0.5 vs text-to-image: {half:.2f}x the time (half the steps, plus an encode)")
    results = {
        "machine": machine(),
        "settings": {**vars(args), "model": loaded.model},
        "median_seconds": seconds,
        "together_vs_one_after_another": together,
        "img2img_half_vs_txt2img": half,
    }
    print(f"written {write_json('pictures.json', results)}")


if __name__ == "__main__":
    main()
