"""The pictures the tiny shapes model learns from, and the measures that read its pictures back.

A picture is one coloured shape (circle, square or triangle) on a white background, 64x64,
varied in size and position. ``read_picture`` finds the foreground (pixels far from white),
names its colour by the nearest hue and its shape by how much of its bounding box it fills
(square ~1.0, circle ~0.79, triangle ~0.5).
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
# A shape the committed model was never shown: the demo LoRA adapter teaches it (``train-lora``).
# (Not a new colour: the model's autoencoder, trained on four colours, cannot give back a fifth.)
RING = "ring"
RING_HOLE = 0.45  # the hole's diameter, as a share of the ring's
BACKGROUND = (255, 255, 255)
_CAPTIONS = ("a {colour} {shape}", "a {colour} {shape} on a white background", "{colour} {shape}")


@dataclass(frozen=True)
class Reading:
    """What a picture shows, as ``read_picture`` measures it."""

    colour: str | None
    shape: str | None
    foreground: float  # share of the picture that is not background
    fill: float  # share of the foreground's bounding box that the foreground covers


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """One ``colour`` ``shape`` on white, its size and place drawn from ``rng``."""
    side = rng.randint(26, 46)
    left, top = rng.randint(4, SIZE - 4 - side), rng.randint(4, SIZE - 4 - side)
    box = (left, top, left + side - 1, top + side - 1)
    picture = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(picture)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == RING:
        pen.ellipse(box, fill=fill)
        margin = side * (1 - RING_HOLE) / 2
        pen.ellipse((left + margin, top + margin, left + side - 1 - margin, top + side - 1 - margin), fill=BACKGROUND)
    elif shape == "triangle":
        pen.polygon([(left + side / 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill)
    else:
        raise ValueError(f"shape: must be one of {', '.join((*SHAPES, RING))}, got {shape!r}")
    return picture


def caption(colour: str, shape: str, rng: random.Random) -> str:
    """A caption in one of the phrasings the model is trained on."""
    return rng.choice(_CAPTIONS).format(colour=colour, shape=shape)


def examples(count: int, seed: int) -> list[tuple[Image.Image, str, str, str]]:
    """``count`` (picture, caption, colour, shape) tuples, every colour and shape equally often."""
    rng = random.Random(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    drawn = []
    for index in range(count):
        colour, shape = pairs[index % len(pairs)]
        drawn.append((draw(colour, shape, rng), caption(colour, shape, rng), colour, shape))
    rng.shuffle(drawn)
    return drawn


def read_picture(picture: Image.Image) -> Reading:
    """The colour and shape a picture shows; ``None`` where there is no clear foreground."""
    pixels, mask = _foreground(picture)
    foreground = float(mask.mean())
    if mask.sum() < 40:
        return Reading(None, None, foreground, 0.0)
    rows, columns = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    fill = float(mask.sum() / box_area)
    return Reading(_nearest_colour(pixels[mask].mean(axis=0)), _shape_from_fill(fill), foreground, fill)


def shows_ring(picture: Image.Image) -> bool:
    """Whether the picture shows a ring: a foreground around a hole of background at its centre."""
    _, mask = _foreground(picture)
    if mask.sum() < 40:
        return False
    rows, columns = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
    middle_row, middle_column = (top + bottom) // 2, (left + right) // 2
    hole = mask[middle_row - 2 : middle_row + 3, middle_column - 2 : middle_column + 3]
    fill = mask.sum() / ((bottom - top + 1) * (right - left + 1))
    return bool(hole.mean() < 0.2 and 0.3 <= fill <= 0.72)


def _foreground(picture: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The picture's pixels in [0, 1] and where they are far from the white background."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return pixels, np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32) / 255.0, axis=-1) > 0.35


def _nearest_colour(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*(float(v) for v in rgb))[0]
    hues = {name: colorsys.rgb_to_hsv(*(v / 255 for v in value))[0] for name, value in COLOURS.items()}
    return min(hues, key=lambda name: min(abs(hue - hues[name]), 1 - abs(hue - hues[name])))


def _shape_from_fill(fill: float) -> str:
    if fill >= 0.9:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"
