"""How often a pipeline draws what it is asked: the colour and the shape of every prompt.

The same measure serves the tests (through the app), ``python -m sd_pipeline.shapes check``
and the GPU script (float16, compiled): a wrong sign in guidance, a scheduler stepping the
wrong slice, an embedding sent to the wrong image or black float16 output all show up here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sd_pipeline.shapes.drawing import COLOURS, SHAPES, read_picture

# What the committed model must reach at guidance 1 to 4 with every sampler, and at 7.5 with the
# default sampler (tests, ``check`` and the GPU script agree).
COLOUR_TARGET = 0.90
SHAPE_TARGET = 0.75


@dataclass(frozen=True)
class Ask:
    """One prompt: the colour and shape it names."""

    colour: str
    shape: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape}"


def every_ask() -> list[Ask]:
    """Every colour with every shape."""
    return [Ask(colour, shape) for colour in COLOURS for shape in SHAPES]


@dataclass
class Adherence:
    """Counts of pictures whose colour and shape match their prompt."""

    pictures: int = 0
    colour: int = 0
    shape: int = 0
    blank: int = 0  # black, NaN-filled or empty pictures
    misses: list[str] = field(default_factory=list)

    def add(self, ask: Ask, picture: Image.Image) -> None:
        self.pictures += 1
        pixels = np.asarray(picture.convert("RGB"))
        if pixels.max() < 8:
            self.blank += 1
            self.misses.append(f"{ask.prompt}: black")
            return
        reading = read_picture(picture)
        self.colour += reading.colour == ask.colour
        self.shape += reading.shape == ask.shape
        if (reading.colour, reading.shape) != (ask.colour, ask.shape):
            self.misses.append(f"{ask.prompt}: read as {reading.colour} {reading.shape} (fill {reading.fill:.2f})")

    def add_all(self, asks: Iterable[Ask], pictures: Iterable[Image.Image]) -> Adherence:
        for ask, picture in zip(asks, pictures, strict=True):
            self.add(ask, picture)
        return self

    @property
    def colour_rate(self) -> float:
        return self.colour / max(self.pictures, 1)

    @property
    def shape_rate(self) -> float:
        return self.shape / max(self.pictures, 1)

    @property
    def meets_targets(self) -> bool:
        return self.blank == 0 and self.colour_rate >= COLOUR_TARGET and self.shape_rate >= SHAPE_TARGET

    def summary(self) -> dict[str, float | int]:
        return {"pictures": self.pictures, "colour": self.colour_rate, "shape": self.shape_rate, "blank": self.blank}


@dataclass
class AdherenceReport:
    """Adherence per (sampler, guidance scale)."""

    rows: dict[tuple[str, float], Adherence] = field(default_factory=dict)

    def table(self) -> str:
        lines = ["| sampler | guidance | pictures | colour | shape | blank |", "|---|---|---|---|---|---|"]
        for (sampler, guidance), counts in self.rows.items():
            lines.append(
                f"| {sampler} | {guidance:g} | {counts.pictures} | {counts.colour_rate:.0%} | "
                f"{counts.shape_rate:.0%} | {counts.blank} |"
            )
        return "\n".join(lines)


def measure_folder(
    folder: Path,
    *,
    seeds: int = 4,
    steps: int = 20,
    samplers: Sequence[str] | None = None,
    guidances: Sequence[float] = (7.5, 4.0, 1.0),
    device: str = "auto",
    dtype: str = "auto",
    compile_unet: bool = False,
    compile_backend: str = "inductor",
) -> AdherenceReport:
    """Load ``folder`` with the app's loading code and measure every sampler at each guidance scale."""
    from sd_pipeline.contract.request import GenerationRequest
    from sd_pipeline.contract.samplers import SCHEDULER_NAMES
    from sd_pipeline.contract.settings import PipelineSettings
    from sd_pipeline.model.engine import StepEngine
    from sd_pipeline.model.loading import load_pipeline

    settings = PipelineSettings(
        model=str(folder),
        device=device,
        dtype=dtype,
        compile_unet=compile_unet,
        compile_backend=compile_backend,
        warmup=False,
    )
    engine = StepEngine(load_pipeline(settings), max_batch_images=len(every_ask()) * seeds)
    report = AdherenceReport()
    asks = [ask for ask in every_ask() for _ in range(seeds)]
    for sampler in samplers or SCHEDULER_NAMES:
        for guidance in guidances:
            requests = [
                GenerationRequest(
                    prompt=ask.prompt,
                    seed=1000 + number,
                    steps=steps,
                    guidance_scale=guidance,
                    width=64,
                    height=64,
                    scheduler=sampler,
                )
                for number, ask in enumerate(asks)
            ]
            pictures = [results[0].image for results in engine.generate(requests)]
            report.rows[(sampler, guidance)] = Adherence().add_all(asks, pictures)
    return report
