"""Command line: ``python -m sd_pipeline "a prompt" --out images/`` (or ``--prompts-file FILE``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd_pipeline.contract.errors import InvalidRequestError, ModelLoadError
from sd_pipeline.contract.prompt_reader import prompt_reader
from sd_pipeline.contract.recommended import RECOMMENDABLE, recommended_request
from sd_pipeline.contract.request import (
    DEFAULT_STRENGTH,
    GenerationRequest,
    RequestLimits,
    TokenBudget,
    check_inputs,
)
from sd_pipeline.contract.samplers import SCHEDULER_NAMES
from sd_pipeline.contract.settings import DEFAULT_MODEL, PipelineSettings
from sd_pipeline.loras.folder import LoraFolder
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.families.sd3 import FLOW_SAMPLERS
from sd_pipeline.model.loading import load_pipeline
from sd_pipeline.model.loras import LoraAdapters
from sd_pipeline.png import encode_png


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sd_pipeline", description="Generate images to PNG files.")
    parser.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line; blank lines are skipped")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNG files")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face id or local pipeline folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed")
    recommended = "default: the model's recommendation, else %s"
    parser.add_argument("--steps", type=int, help=recommended % GenerationRequest.steps)
    parser.add_argument("--guidance-scale", type=float, help=recommended % GenerationRequest.guidance_scale)
    parser.add_argument("--width", type=int, help=recommended % "its native size (512 for SD 1.x)")
    parser.add_argument("--height", type=int, help=recommended % "its native size")
    parser.add_argument("--num-images", type=int, default=1)
    samplers = (
        f"one of the model's samplers ({', '.join(SCHEDULER_NAMES)} for SD 1.x/2.x and SDXL; "
        f"{', '.join(FLOW_SAMPLERS)} for SD3 and FLUX.1)"
    )
    parser.add_argument("--scheduler", help=f"{samplers}; {recommended % GenerationRequest.scheduler}")
    parser.add_argument("--no-safety-checker", action="store_true", help="skip the model's safety checker")
    parser.add_argument("--lora-dir", type=Path, help="folder of LoRA adapters the prompts name with <lora:NAME:W>")
    parser.add_argument("--init-image", type=Path, help="image-to-image: start from this picture (PNG, JPEG, WebP)")
    parser.add_argument(
        "--strength",
        type=float,
        help=f"denoising strength, 0 < s <= 1 (default: the model's; {DEFAULT_STRENGTH}, or 1 for an inpainting model)",
    )
    parser.add_argument("--mask", type=Path, help="inpainting: white = redraw (needs --init-image)")
    parser.add_argument(
        "--true-cfg-scale",
        type=float,
        default=1.0,
        help="FLUX.1: true classifier-free guidance with --negative-prompt above 1 (each step runs twice)",
    )
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        return [line for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.prompt is None:
        raise SystemExit("error: give a prompt or --prompts-file")
    return [args.prompt]


def _pictures(args: argparse.Namespace) -> dict[str, bytes]:
    """The --init-image and --mask files' bytes (what they hold is judged by ``check_inputs``)."""
    pictures = {}
    for name in ("init_image", "mask"):
        path: Path | None = getattr(args, name)
        if path is not None:
            try:
                pictures[name] = path.read_bytes()
            except OSError as error:
                raise InvalidRequestError(name, f"cannot read {path}: {error.strerror}") from None
    return pictures


def main(argv: list[str] | None = None) -> int:
    """Generate every prompt and write ``<seed>-<n>.png`` files; returns the exit code."""
    args = _parser().parse_args(argv)
    prompts = _prompts(args)
    lora_dir = str(args.lora_dir.resolve()) if args.lora_dir else None
    settings = PipelineSettings(
        model=args.model, device=args.device, safety_checker=not args.no_safety_checker, lora_dir=lora_dir
    )
    folder = LoraFolder(lora_dir) if lora_dir else None
    try:
        loaded = load_pipeline(settings)
        limits = RequestLimits(max_pixels=settings.max_pixels)
        index = {**loaded.pipeline.config, "_class_name": loaded.family.pipeline_class}  # as model_index.json
        reader = prompt_reader(index, t5_encoder=settings.t5_encoder)
        tokens = TokenBudget.of(getattr(loaded.pipeline, reader.subfolder), reader.max_tokens)
        rules = loaded.family.rules
        start = recommended_request(limits, native_size=loaded.native_size, model=loaded.defaults, rules=rules)
        chosen = {name: getattr(args, name) for name in RECOMMENDABLE}
        fields = {name: getattr(start, name) if value is None else value for name, value in chosen.items()}
        fields |= {"negative_prompt": args.negative_prompt, "seed": args.seed, "num_images": args.num_images}
        fields |= {"true_cfg_scale": args.true_cfg_scale}
        fields |= _pictures(args)
        requests = [
            check_inputs(
                {"prompt": prompt, **fields},
                limits=limits,
                tokens=tokens,
                rules=rules,
                adapters=folder.available if folder else None,
            )
            for prompt in prompts
        ]
    except (InvalidRequestError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    loras = LoraAdapters(loaded.pipeline, folder, cache_bytes=settings.lora_cache_mb * 2**20) if folder else None
    engine = StepEngine(loaded, max_batch_images=max(8, len(requests)), loras=loras)
    try:
        generated = engine.generate(requests)
    except InvalidRequestError as error:  # an adapter that cannot serve this model
        print(f"error: {error}", file=sys.stderr)
        return 2
    for number, results in enumerate(generated):
        for result in results:
            path = args.out / f"{number:04d}-{result.seed}.png"
            path.write_bytes(encode_png(result))
            print(f"{path}  ({result.timings.generation_seconds:.2f}s, batch of {result.timings.batch_images})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
