"""The inpainting mask painted in the browser: Gradio's image editor over the input picture.

The editor shows a checked, re-encoded copy of the uploaded picture (never the upload itself)
with one white brush; each stroke turns the painted layer into the ``mask`` input (white =
redraw); while nothing is painted the mask input keeps what it has. The editor's own ``preprocess`` would decode
every layer it is sent; here the layer's bytes go through the same checks as any upload
(``decode_checked``: signature, bytes and header pixels first).
"""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.images import decode_checked
from sd_pipeline.contract.request import RequestLimits


def mask_painter() -> gr.ImageEditor:
    """The editor: no uploads of its own, one fixed white brush and an eraser, a single layer."""
    editor = gr.ImageEditor(
        label="Paint what to redraw (white), or upload a mask below",
        sources=(),
        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=12),
        eraser=gr.Eraser(default_size=12),
        layers=False,
        transforms=(),
        format="png",
        height=260,
        elem_id="mask-painter",
    )
    editor.preprocess = lambda payload: _painted_layer(editor, payload)
    return editor


def _painted_layer(editor: gr.ImageEditor, payload: Any) -> bytes | None:
    """The painted layer's bytes, unopened (sent as a file, or as a blob kept by the editor)."""
    if payload is None:
        return None
    if payload.id is not None:
        blobs = editor.blob_storage.pop(payload.id, None)
        return blobs.layers[0] if blobs is not None and blobs.layers else None
    layers = payload.layers or []
    return Path(layers[0].path).read_bytes() if layers and layers[0] is not None and layers[0].path else None


class Painting:
    """The editor's two handlers, writing their pictures into ``folder`` (pruned with the gallery copies)."""

    def __init__(self, limits: RequestLimits, folder: Path) -> None:
        self.limits = limits
        self.folder = folder

    def background(self, upload: str | None) -> dict[str, Any] | None:
        """On a new input picture: the editor shows a checked copy of it, unpainted; none for a bad one."""
        if not upload:
            return None
        try:
            picture = decode_checked(
                "init_image",
                Path(upload).read_bytes(),
                max_bytes=self.limits.max_upload_bytes,
                max_pixels=self.limits.max_upload_pixels,
            )
        except (InvalidRequestError, OSError):
            return None  # Generate names the problem
        return {"background": self._write(picture.convert("RGB")), "layers": [], "composite": None}

    def mask(self, layer: bytes | None) -> Any:
        """The painted layer as a mask (white where painted); the mask input is left as it is while
        nothing is painted (a fresh background, or a mask uploaded or restored from history)."""
        if layer is None:
            return gr.skip()
        try:
            painted = decode_checked(
                "mask", layer, max_bytes=self.limits.max_upload_bytes, max_pixels=self.limits.max_upload_pixels
            )
        except InvalidRequestError as error:
            raise gr.Error(str(error), print_exception=False) from None
        alpha = painted.convert("RGBA").getchannel("A")
        if alpha.getbbox() is None:
            return gr.skip()
        return self._write(alpha.point(lambda level: 255 if level else 0))

    def _write(self, picture: Image.Image) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"painting-{secrets.token_hex(8)}.png"
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        return str(path)
