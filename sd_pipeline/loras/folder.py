"""A folder of LoRA adapters as AUTOMATIC1111 keeps them: ``NAME.safetensors``, the name is the tag's.

``LoraFolder`` lists the adapters with the model family each was made for (read from the file's
header: kohya's ``ss_base_model_version`` where it is written, else the layer names and shapes;
"" when it cannot tell), finds an adapter's file by name (never by a path a user wrote), and
gives AUTOMATIC1111's short hash of it for PNG parameters (``Lora hashes``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sd_pipeline.contract.errors import InvalidRequestError

logger = logging.getLogger(__name__)
SUFFIX = ".safetensors"
SHORT_HASH_CHARS = 12  # AUTOMATIC1111's shorthash
_HEADER_LIMIT = 100 * 1024 * 1024  # a safetensors header larger than this is not an adapter's
# Names only one family has: SDXL's second text encoder, its original (ldm) UNet block names as kohya
# writes them, two or more transformer blocks per attention; SD 1.x / 2.x's one text encoder in
# kohya's names, attention at the first UNet level (SDXL has none there).
_SDXL_NAMES = re.compile(r"lora_te[12]_|text_encoder_2\.|lora_unet_(input|output)_blocks|transformer_blocks[._][1-9]")
_SD_NAMES = re.compile(r"^lora_te_|down_blocks[._]0[._]attentions")
_CROSS_ATTENTION_DOWN = re.compile(r"attn2[._]to_k[._]lora(_down|[._]down|_A)[._]weight$")
SDXL_CROSS_ATTENTION = 2048  # the text width SDXL's cross-attention reads
SD_CROSS_ATTENTION = {768, 1024}  # SD 1.x's and SD 2.x's
# kohya's ss_base_model_version values, by their start.
_KOHYA_BASES = (("sdxl", "sdxl"), ("sd_v1", "sd"), ("sd_v2", "sd"), ("sd3", "sd3"), ("flux", "flux"))


@dataclass(frozen=True)
class FetchedLora:
    """An adapter's file on this host, ready to load, with AUTOMATIC1111's short hash of it."""

    path: Path
    short_hash: str


@dataclass(frozen=True)
class LoraFile:
    """One adapter in the folder."""

    name: str
    path: Path
    family: str  # "sd", "sdxl", "sd3", "flux", or "" when the file does not say


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (tensor names, shapes, ``__metadata__``) without its tensors."""
    with path.open("rb") as file:
        length = _header_length(file)
        if length > _HEADER_LIMIT:
            raise ValueError(f"header of {length} bytes")
        header: dict[str, Any] = json.loads(file.read(length))
    return header


def family_of(header: dict[str, Any]) -> str:
    """The family an adapter was made for, from its header; "" when its names and shapes do not
    settle it (then loading it decides: a mismatch is refused there)."""
    metadata = header.get("__metadata__") or {}
    base = str(metadata.get("ss_base_model_version", ""))
    for start, family in _KOHYA_BASES:
        if base.startswith(start):
            return family
    keys = [key for key in header if key != "__metadata__"]
    if any(re.search(r"single_transformer_blocks|double_blocks|single_blocks", key) for key in keys):
        return "flux"
    if any("joint_blocks" in key for key in keys):
        return "sd3"
    if any(key.startswith(("transformer.", "lora_transformer_")) for key in keys):
        return ""  # SD3 and FLUX.1 share these names
    cross_attention = {
        int(header[key]["shape"][1]) for key in keys if _CROSS_ATTENTION_DOWN.search(key) and header[key].get("shape")
    }
    sdxl = (_SDXL_NAMES.search(key) for key in keys)
    if any(sdxl) or SDXL_CROSS_ATTENTION in cross_attention:
        return "sdxl"
    sd = (_SD_NAMES.search(key) for key in keys)
    if any(sd) or cross_attention & SD_CROSS_ATTENTION:
        return "sd"
    return ""


def _header_length(file: BinaryIO) -> int:
    """The length of a safetensors file's JSON header (its first 8 bytes, little-endian)."""
    (length,) = struct.unpack("<Q", file.read(8))
    return int(length)


def short_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash: sha256 of the file after its header (``addnet_hash_safetensors``), 12 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(8 + _header_length(file))
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()[:SHORT_HASH_CHARS]


class LoraFolder:
    """The adapters in one folder (read anew on each listing: files may be added while serving)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._families: dict[tuple[str, float, int], str] = {}
        self._hashes: dict[tuple[str, float, int], str] = {}

    def files(self) -> list[LoraFile]:
        """Every adapter file, by name, with the family its header names."""
        return [LoraFile(name=name, path=path, family=self._family(path)) for name, path in self._paths().items()]

    def available(self) -> dict[str, str]:
        """Name -> family of every adapter (what ``check_inputs`` takes)."""
        return {lora.name: lora.family for lora in self.files()}

    def has(self, name: str) -> bool:
        return name in self._paths()

    def fetch(self, name: str) -> FetchedLora:
        """Adapter ``name``'s file and its hash (reads the file once while it is unchanged)."""
        return FetchedLora(self.path_of(name), self.hash_of(name))

    def path_of(self, name: str) -> Path:
        """The file of adapter ``name`` (one of the listed names: a name is never joined into a path)."""
        path = self._paths().get(name)
        if path is None:
            raise InvalidRequestError("prompt", f"names LoRA {name!r}, which is not available")
        return path

    def hash_of(self, name: str) -> str:
        """AUTOMATIC1111's short hash of adapter ``name``'s file (kept while the file is unchanged)."""
        path = self.path_of(name)
        key = _identity(path)
        if key not in self._hashes:
            self._hashes[key] = short_hash(path)
        return self._hashes[key]

    def _paths(self) -> dict[str, Path]:
        """Name -> file of every ``NAME.safetensors`` in the folder, sorted by name."""
        if not self.root.is_dir():
            return {}
        files = (path for path in sorted(self.root.glob(f"*{SUFFIX}")) if path.is_file())
        return {path.name[: -len(SUFFIX)]: path for path in files}

    def _family(self, path: Path) -> str:
        key = _identity(path)
        if key not in self._families:
            try:
                self._families[key] = family_of(read_header(path))
            except (OSError, ValueError, struct.error) as error:
                logger.warning("LoRA file %s is not readable safetensors: %s", path.name, error)
                self._families[key] = ""
        return self._families[key]


def _identity(path: Path) -> tuple[str, float, int]:
    stat = path.stat()
    return (str(path), stat.st_mtime, stat.st_size)
