"""A modelled accelerator, for benchmarks only: how long each UNet and VAE call would take.

``SD_SIMULATED_GPU="unet=32.6+1.1*n,vae=13*n"`` (milliseconds; ``n`` = images in the call,
guidance counting twice) makes every UNet and VAE call of the loaded pipeline last the modelled
time: the real (tiny) module runs, then the process sleeps the rest, holding no core, as a
process waiting on a GPU does. Everything above the UNet runs for real. ``h200`` names the
model fitted to the H200 table in docs/BENCHMARKS.md. Plain data: no torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Fitted to docs/BENCHMARKS.md, NVIDIA H200, mode a (diffusers fp16 eager, the app's default), SD 1.5
# at 512x512 with guidance: UNet step 34.6 / 41.7 / 50.0 ms at 2 / 8 / 16 images (batch 1 / 4 / 8,
# least squares: 32.6 + 1.1 n), and the rest of a call (VAE decode, mostly) 52 / 88 / 141 ms at
# 1 / 4 / 8 images (about 13 ms an image).
PRESETS = {"h200": "unet=32.6+1.1*n,vae=13*n"}
PARTS = ("unet", "vae")
_TERM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(\*\s*n)?\s*$")


@dataclass(frozen=True)
class CallCost:
    """Milliseconds of one call: ``fixed_ms + per_image_ms * n``."""

    fixed_ms: float = 0.0
    per_image_ms: float = 0.0

    def seconds(self, images: int) -> float:
        return (self.fixed_ms + self.per_image_ms * images) / 1000


@dataclass(frozen=True)
class SimulatedAccelerator:
    """The modelled time of each UNet and VAE call; ``spec`` is the text it was read from."""

    spec: str
    unet: CallCost
    vae: CallCost

    @classmethod
    def parse(cls, text: str) -> SimulatedAccelerator:
        """Read ``unet=A+B*n,vae=C*n`` or a preset name; raises ``ValueError`` saying what is wrong."""
        spec = PRESETS.get(text.strip().lower(), text.strip())
        costs: dict[str, CallCost] = {}
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            name, equals, formula = part.partition("=")
            name = name.strip().lower()
            if not equals or name not in PARTS:
                raise ValueError(f"'{part}': expected unet=... or vae=... (or one of: {', '.join(PRESETS)})")
            if name in costs:
                raise ValueError(f"'{name}' is given twice")
            costs[name] = _cost(name, formula)
        if "unet" not in costs:
            raise ValueError(f"needs at least unet=A+B*n (milliseconds), or one of: {', '.join(PRESETS)}")
        return cls(spec=spec, unet=costs["unet"], vae=costs.get("vae", CallCost()))


def _cost(name: str, formula: str) -> CallCost:
    fixed = per_image = 0.0
    for term in formula.split("+"):
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"{name}={formula.strip()}: each term is milliseconds, e.g. 32.6 or 1.1*n")
        if match.group(2):
            per_image += float(match.group(1))
        else:
            fixed += float(match.group(1))
    return CallCost(fixed_ms=fixed, per_image_ms=per_image)
