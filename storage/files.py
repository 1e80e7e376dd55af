"""Writes that survive a crash or a power cut: fsync the file, rename it into place, fsync the folder."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync_folder(folder: Path) -> None:
    """fsync a folder, so the names created or renamed in it are on disk."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside ``path``, fsync it, rename it into place, fsync the folder:
    readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    write_synced(temporary, data)
    temporary.replace(path)
    sync_folder(path.parent)
