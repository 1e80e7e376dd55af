"""A version's ``manifest.json``: every file with its size and sha256, when and from what it was made."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field, field_validator

from sd_pipeline.contract.models import DEFAULTS_FILE, ModelDefaults
from sd_pipeline.versions.location import MANIFEST, check_version_name

_CHUNK = 1 << 20


class FileEntry(BaseModel):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What a published version holds; written last, so its presence means the version is complete."""

    version: str
    created_at: str
    source: str = Field("", description="where it was published from (a folder's name, a training run)")
    pipeline_class: str = Field("", description="model_index.json's pipeline class: the model family it belongs to")
    adapter_family: str = Field("", description='a LoRA adapter\'s: the model family it was made for ("": unknown)')
    files: dict[str, FileEntry]
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)

    @field_validator("files")
    @classmethod
    def _relative_paths_only(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or name != path.as_posix() or name == MANIFEST:
                raise ValueError(f"files: {name!r} is not a plain relative path inside the version")
        return files

    @property
    def digest(self) -> str:
        """sha256 over every file's name, size and hash: the version's identity."""
        canonical = json.dumps({name: entry.model_dump() for name, entry in sorted(self.files.items())})
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        """The first 10 hex digits of the digest, as AUTOMATIC1111 shows a checkpoint's hash."""
        return self.digest[:10]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def problems(self, folder: Path) -> list[str]:
        """What in ``folder`` differs from this manifest (missing, extra-sized or changed files)."""
        found = []
        for name, entry in sorted(self.files.items()):
            path = folder / name
            if not path.is_file():
                found.append(f"{name}: missing")
            elif path.stat().st_size != entry.size:
                found.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry.size}")
            elif file_sha256(path) != entry.sha256:
                found.append(f"{name}: sha256 differs from the manifest")
        return found

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path (hidden files and an old manifest left out)."""
    names = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (
            path.is_file()
            and not any(part.startswith(".") for part in relative.parts)
            and relative.as_posix() != MANIFEST
        ):
            names.append(relative.as_posix())
    return names


def build_manifest(folder: Path, *, version: str, source: str = "") -> Manifest:
    """The manifest of a diffusers pipeline folder about to be published as ``version``."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    files = {
        name: FileEntry(size=(folder / name).stat().st_size, sha256=file_sha256(folder / name))
        for name in folder_files(folder)
    }
    return Manifest(
        version=check_version_name(version),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source or folder.resolve().name,
        files=files,
        defaults=read_folder_defaults(folder),
        pipeline_class=str(json.loads(index.read_text()).get("_class_name", "")),
    )


def build_adapter_manifest(file: Path, *, name: str, version: str, family: str, source: str = "") -> Manifest:
    """The manifest of a LoRA adapter's file about to be published as ``version``: the one file, as ``name``."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    return Manifest(
        version=check_version_name(version),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source or file.name,
        adapter_family=family,
        files={name: FileEntry(size=file.stat().st_size, sha256=file_sha256(file))},
    )


def read_folder_defaults(folder: Path) -> ModelDefaults:
    """A plain folder's recommended settings (``model_defaults.json`` beside ``model_index.json``)."""
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    return ModelDefaults.model_validate_json(path.read_bytes())
