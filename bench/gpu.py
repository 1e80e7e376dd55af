"""GPU benchmark: Stable Diffusion 1.5's architecture with random weights (speed does not
depend on the weights), 512x512, 25 steps with classifier-free guidance, batch 1, 4 and 8.

    python -m bench.gpu                 # on a CUDA machine, no network needed
    python -m bench.gpu --tiny          # tiny configuration on the CPU (its own test)

Modes, each adding one real optimisation to the one before, all against (a): (a) plain
diffusers fp16 eager (SDPA attention is already diffusers' default); (b) this project's
step engine with channels-last; (c) + fused QKV projections; (d) + torch.compile (CUDA, or
--tiny). Reports images/s, UNet iterations/s and model FLOP utilisation, both from the time
spent inside the UNet alone (timed with CUDA events, so the text encoder, VAE decode and
PIL conversion do not count against UNet FLOPs), against a matmul peak measured over at
least two seconds, and how far each mode's images are from (a)'s. Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode

from bench.common import machine, table, write_json
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline
from sd_pipeline.model.schedulers import make_scheduler
from sd_pipeline.tiny import TOKEN_LIMIT, build_tiny_pipeline, random_sdxl_pipeline, save_random_pipeline

# Published configuration of runwayml/stable-diffusion-v1-5 (unet, vae, text_encoder).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": TOKEN_LIMIT,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# Published configuration of stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, both text encoders).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_2 = {  # OpenCLIP ViT-bigG/14's text tower, with its projection (the pooled text)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": TOKEN_LIMIT,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# What each family's GPU rows run: its published shape, native size and usual step count.
FAMILY_SHAPES = {"sd": (512, 25), "sdxl": (1024, 30)}
MODES = {
    "a: diffusers fp16 eager": None,
    "b: + channels_last": {"channels_last": True},
    "c: + fused qkv": {"channels_last": True, "fuse_qkv": True},
    "d: + torch.compile": {"channels_last": True, "fuse_qkv": True, "compile_unet": True},
}
PEAK_WINDOW_SECONDS = 2.0


def build_sd15(folder: Path) -> Path:
    """SD 1.5's architecture with random weights, saved like a downloaded model."""
    return save_random_pipeline(folder, unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT)


def build_sdxl(folder: Path) -> Path:
    """SDXL base's architecture with random weights, saved in float16 (about 7 GB) like a downloaded model."""
    random_sdxl_pipeline(unet=SDXL_UNET, vae=SDXL_VAE, text=SD15_TEXT, text_2=SDXL_TEXT_2).to(
        dtype=torch.float16
    ).save_pretrained(folder)
    return folder


def benchmark_model(folder: Path | None, *, tiny: bool, family: str = "sd") -> Path:
    """The random model the GPU scripts run (``family`` sd or sdxl, at its published shape; tiny: the
    family's tiny pipeline): built in ``folder`` (or a temporary one) unless already there."""
    folder = folder or Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "model"
    if (folder / "model_index.json").exists():
        return folder
    if tiny:
        return build_tiny_pipeline(folder, family=family)
    return build_sdxl(folder) if family == "sdxl" else build_sd15(folder)


def matmul_peak_flops(device: torch.device, *, window: float = PEAK_WINDOW_SECONDS) -> float:
    """Measured dense matmul throughput over at least ``window`` seconds (clocks settle):
    fp16 8192^3 on CUDA (the dtype the UNet runs in), float32 1024^3 on the CPU."""
    size, dtype = (8192, torch.float16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 0
    started = time.perf_counter()
    while time.perf_counter() - started < window:
        for _ in range(10):
            a @ b
        repeats += 10
        synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


class UNetTimer:
    """Time spent inside the UNet's forward calls: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.spans: list[tuple[Any, Any]] = []
        self._open: Any = None
        self._handles = [unet.register_forward_pre_hook(self._before), unet.register_forward_hook(self._after)]

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, *_: Any) -> None:
        self._open = self._mark()

    def _after(self, *_: Any) -> None:
        self.spans.append((self._open, self._mark()))

    def reset(self) -> None:
        self.spans = []

    def seconds(self) -> float:
        synchronize(self.device)
        if self.device.type == "cuda":
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return float(sum(end - start for start, end in self.spans))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_flops_per_image_step(pipeline: StableDiffusionPipeline, size: int) -> float:
    """FLOPs of the UNet for one image and one step, classifier-free guidance included (2 samples)."""
    unet = getattr(pipeline.unet, "_orig_mod", pipeline.unet)  # count the eager module, compiled or not
    latent = size // pipeline.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, latent, latent, device=unet.device, dtype=unet.dtype)
    context = torch.randn(2, TOKEN_LIMIT, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, torch.tensor(500, device=unet.device), encoder_hidden_states=context)
    return float(counter.get_total_flops())


def run_mode(
    mode: dict[str, Any] | None, model: Path, device: torch.device, args: argparse.Namespace
) -> tuple[dict[int, dict[str, float]], dict[int, np.ndarray], float]:
    fields = {
        "prompt": "a lighthouse at dusk",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "guidance_scale": 7.5,
        "scheduler": "Euler",
    }
    if mode is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipeline = StableDiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.scheduler = make_scheduler("Euler", pipeline.scheduler.config)

        def generate(batch: int) -> np.ndarray:
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(batch)]
            out = pipeline(
                ["a lighthouse at dusk"] * batch,
                negative_prompt=[""] * batch,
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                generator=generators,
                output_type="np",
            )
            return np.asarray(out.images)
    else:
        settings = PipelineSettings(model=str(model), device=device.type, **mode)
        loaded = load_pipeline(settings)
        pipeline = loaded.pipeline
        engine = StepEngine(loaded, max_batch_images=max(args.batches))

        def generate(batch: int) -> np.ndarray:
            requests = [check_inputs({**fields, "seed": seed}) for seed in range(batch)]
            results = engine.generate(requests)
            return np.stack([np.asarray(r[0].image, dtype=np.float32) / 255 for r in results])

    flops = unet_flops_per_image_step(pipeline, args.size)
    timings: dict[int, dict[str, float]] = {}
    images: dict[int, np.ndarray] = {}
    timer = UNetTimer(pipeline.unet, device)
    for batch in args.batches:
        images[batch] = generate(batch)  # warm-up (and compilation)
        synchronize(device)
        timer.reset()
        started = time.perf_counter()
        for _ in range(args.repeats):
            generate(batch)
        synchronize(device)
        seconds = (time.perf_counter() - started) / args.repeats
        unet_seconds = timer.seconds() / args.repeats
        timings[batch] = {
            "images_per_s": batch / seconds,
            "unet_it_per_s": args.steps / unet_seconds,
            "unet_fraction_of_call": unet_seconds / seconds,
            "achieved_flops": flops * args.steps * batch / unet_seconds,
        }
    timer.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timings, images, flops


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configuration (CPU-sized), for testing the script")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--model", type=Path, help="folder for the random model: reused if it holds one, else built there"
    )
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = benchmark_model(args.model, tiny=args.tiny)
    peak = matmul_peak_flops(device, window=0.5 if args.tiny else PEAK_WINDOW_SECONDS)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "matmul_peak_flops": peak,
        "modes": {},
    }
    reference: dict[int, np.ndarray] = {}
    reference_timings: dict[int, dict[str, float]] = {}
    rows = []
    for name, mode in MODES.items():
        if args.skip_compile and mode and mode.get("compile_unet"):
            continue
        if device.type != "cuda" and mode and mode.get("compile_unet") and not args.tiny:
            continue
        timings, images, flops = run_mode(mode, model, device, args)
        if not reference:
            reference, reference_timings = images, timings
        for batch in args.batches:
            difference = (
                float(np.nanmax(np.abs(images[batch] - reference[batch]))) if batch in reference else float("nan")
            )
            timings[batch]["max_abs_diff_vs_a"] = difference
            timings[batch]["mfu"] = timings[batch]["achieved_flops"] / peak
            rows.append(
                [
                    name,
                    str(batch),
                    f"{timings[batch]['images_per_s']:.2f}",
                    f"{timings[batch]['unet_it_per_s']:.1f}",
                    f"{timings[batch]['mfu'] * 100:.1f}%",
                    f"{timings[batch]['unet_fraction_of_call'] * 100:.0f}%",
                    f"{difference:.4f}",
                    f"{timings[batch]['images_per_s'] / reference_timings[batch]['images_per_s']:.2f}",
                ]
            )
        results["modes"][name] = timings
        results["unet_flops_per_image_step"] = flops
        print(f"done {name}: {rows[-len(args.batches) :]}", flush=True)
        write_json("gpu.json", results, folder=args.out)  # partial results survive a timeout
    print(table(["mode", "batch", "images/s", "UNet it/s", "UNet MFU", "UNet share", "max |diff| vs a", "x a"], rows))
    print(
        f"\nmatmul peak: {peak / 1e12:.1f} TFLOP/s; UNet: "
        f"{results['unet_flops_per_image_step'] / 1e9:.1f} GFLOP per image-step (CFG included)"
    )
    print(f"written {write_json('gpu.json', results, folder=args.out)}")
    return results


if __name__ == "__main__":
    main()
