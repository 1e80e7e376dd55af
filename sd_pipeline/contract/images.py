"""Input images (image-to-image and inpainting), read safely before anything else sees them.

An upload is judged by its bytes, never by its name: the first bytes must be a PNG, JPEG or
WebP signature, the whole must fit ``max_bytes``, and the pixel count read from the header
must fit ``max_pixels`` before a single pixel is decoded (a PNG of a few kilobytes can claim
30000x30000 pixels). What passes is decoded, converted (RGB for an image, greyscale for a
mask), resized to the request's size as AUTOMATIC1111's "Just resize" does, and re-encoded as
a PNG: the only form in which an input crosses to a worker, is stored, and is shown again.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from sd_pipeline.contract.errors import InvalidRequestError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_UPLOAD_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP")
_SIGNATURES: tuple[tuple[bytes, str], ...] = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
ImageMode = Literal["RGB", "L"]


@dataclass(frozen=True)
class InputImage:
    """A checked input picture at the request's size, as PNG bytes (RGB image or greyscale mask)."""

    png: bytes = field(repr=False)
    width: int
    height: int

    @classmethod
    def filled(cls, size: tuple[int, int], mode: ImageMode, value: int) -> InputImage:
        """A picture of one grey level (warm-up requests to an inpainting model)."""
        return cls(png=_png(Image.new(mode, size, value)), width=size[0], height=size[1])

    @classmethod
    def stand_ins(cls, size: tuple[int, int]) -> tuple[InputImage, InputImage]:
        """A grey picture and a mask that redraws all of it: what an inpainting model is warmed up and
        its recommended settings checked with (it refuses a request without both)."""
        return cls.filled(size, "RGB", 128), cls.filled(size, "L", 255)

    def picture(self) -> Image.Image:
        """The decoded picture (its PNG was written by ``read_input_image``, so it is trusted)."""
        with Image.open(io.BytesIO(self.png), formats=["PNG"]) as image:
            image.load()
            return image


def sniff_format(data: bytes) -> str | None:
    """The image format ``data`` starts with (PNG, JPEG or WEBP), or None."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def read_input_image(
    field: str,
    data: object,
    *,
    size: tuple[int, int],
    mode: ImageMode,
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
) -> InputImage:
    """``data`` (bytes, or an ``InputImage`` already read) checked, decoded and resized to ``size``.

    Raises ``InvalidRequestError`` naming ``field`` for anything that is not a PNG, JPEG or WebP
    within ``max_bytes`` and ``max_pixels``."""
    picture = decode_checked(field, data, max_bytes=max_bytes, max_pixels=max_pixels).convert(mode)
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return InputImage(png=_png(picture), width=size[0], height=size[1])


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_checked(field: str, data: object, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """``data`` decoded once it passed the checks: bytes, at most ``max_bytes``, a PNG, JPEG or WebP
    signature, at most ``max_pixels`` by its header."""
    if isinstance(data, InputImage):
        data = data.png
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequestError(field, f"must be an image file (PNG, JPEG or WebP), got {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidRequestError(field, f"must be at most {max_bytes} bytes, got {len(data)}")
    if sniff_format(bytes(data[:16])) is None:
        raise InvalidRequestError(field, "must be a PNG, JPEG or WebP image (the file's contents are not one)")
    return _decode(field, bytes(data), max_pixels)


def _decode(field: str, data: bytes, max_pixels: int) -> Image.Image:
    """The picture, its pixel count checked from the header before decoding."""
    unreadable = InvalidRequestError(field, "could not be read as a PNG, JPEG or WebP image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            picture = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except Image.DecompressionBombError:
            raise InvalidRequestError(
                field, f"must be at most {max_pixels} pixels; this file claims far more"
            ) from None
        except (OSError, ValueError, Image.DecompressionBombWarning):
            raise unreadable from None
        width, height = picture.size
        if width * height > max_pixels:
            raise InvalidRequestError(field, f"must be at most {max_pixels} pixels, got {width}x{height}")
        try:
            picture.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning):
            raise unreadable from None
    return picture
