"""Local-folder backend: the same layout on disk, links signed with HMAC and served by the app."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

from storage import keys
from storage.base import StorageError, disk_full
from storage.files import write_atomic
from storage.records import HistoryPage, ImageRecord, InputPictures, Link, LinkedImage

LINK_ROUTE = "/files"
SECRET_FILE = ".link-secret"
MIN_SECRET_BYTES = 32  # an HMAC key shorter than its hash (SHA-256) is a weak one
_MAX_EXPIRES_DIGITS = 12  # a Unix time in seconds until the year 33658


class ForbiddenLinkError(PermissionError):
    """A link whose signature is wrong or expired (403)."""


class NoSuchImageError(ForbiddenLinkError):
    """A link whose key is not one of ours, or whose image is gone (404)."""


def load_or_create_secret(data_dir: Path, name: str = SECRET_FILE, *, initial: bytes | None = None) -> bytes:
    """The signing secret kept in ``data_dir`` (made once, readable by the owner only). Written to a
    temporary file, fsynced, then linked into place, which fails if another front end on the same
    folder made it first (its secret is then used): an interrupted first start never leaves an empty
    secret, two front ends never sign with two secrets, and a file shorter than
    ``MIN_SECRET_BYTES`` stops start-up instead of signing with it. A new file holds ``initial``
    when given, else 32 random bytes."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{name}.{secrets.token_hex(4)}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(initial if initial is not None else secrets.token_bytes(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another front end got there first: use its secret
        finally:
            temporary.unlink()
    secret = path.read_bytes()
    if len(secret) < MIN_SECRET_BYTES:
        raise StorageError(
            f"{path} holds {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}: remove it (links signed with it "
            "stop working) and start again, or set LINK_SECRET"
        )
    return secret


class LocalStore:
    """Images and records under ``data_dir/objects``; links point at ``{base_url}/files/...``."""

    def __init__(self, data_dir: Path, *, secret: bytes, link_ttl_seconds: int, base_url: str = "") -> None:
        self.root = data_dir / "objects"
        self.secret = secret
        self.link_ttl_seconds = link_ttl_seconds
        self.base_url = base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        return self.root / key

    def save(self, png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> LinkedImage:
        """Write the input pictures, the PNG and its record (atomically, via a temporary file and rename)."""
        stored = record.model_copy(update={"status": "stored"})
        try:
            for input_id, picture in (inputs or {}).items():
                write_atomic(self._path(keys.image_key("", record.owner, input_id)), picture)
            write_atomic(self._path(keys.image_key("", record.owner, record.id)), png)
            write_atomic(self._path(keys.record_key("", record.owner, record.id)), stored.model_dump_json().encode())
        except OSError as error:
            raise disk_full(error, self.root) or StorageError(
                f"cannot write to data folder {self.root}: {error.strerror}"
            ) from error
        return LinkedImage(stored, self.link(record.owner, record.id))

    def history(self, owner: str, *, page: int, page_size: int) -> HistoryPage:
        """Newest first: file names sort that way, as S3 keys do."""
        keys.check_owner(owner)
        folder = self._path(keys.records_prefix("", owner))
        names = sorted(path.name for path in folder.glob("*.json")) if folder.is_dir() else []
        page_names = names[(page - 1) * page_size : page * page_size]
        images = []
        for name in page_names:
            record = ImageRecord.model_validate_json((folder / name).read_bytes())
            images.append(LinkedImage(record, self.link(owner, record.id)))
        return HistoryPage(images=images, page=page, has_more=len(names) > page * page_size)

    def adopt(self, earlier_owner: str, owner: str) -> int:
        """Move ``earlier_owner``'s images and records under ``owner``: image first, then the new
        record, then the old record goes; an adoption killed half-way is finished by the next one."""
        keys.check_owner(owner)
        keys.check_owner(earlier_owner)
        folder = self._path(keys.records_prefix("", earlier_owner))
        moved = 0
        try:
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                record = ImageRecord.model_validate_json(path.read_bytes()).model_copy(update={"owner": owner})
                self._path(keys.image_key("", owner, record.id)).parent.mkdir(parents=True, exist_ok=True)
                # Already moved when an earlier adoption was killed before it wrote the record: go on.
                for image_id in (*record.input_ids, record.id):  # an input shared by several images moves once
                    moved_to = self._path(keys.image_key("", owner, image_id))
                    with contextlib.suppress(FileNotFoundError):
                        self._path(keys.image_key("", earlier_owner, image_id)).replace(moved_to)
                write_atomic(self._path(keys.record_key("", owner, record.id)), record.model_dump_json().encode())
                path.unlink()
                moved += 1
        except OSError as error:
            raise StorageError(f"cannot move a history in {self.root}: {error.strerror}") from error
        return moved

    def fetch(self, owner: str, image_id: str) -> bytes:
        """Read one image."""
        try:
            return self._path(keys.image_key("", owner, image_id)).read_bytes()
        except OSError as error:
            raise StorageError(f"cannot read image {image_id} from {self.root}: {error.strerror}") from error

    def link(self, owner: str, image_id: str) -> Link:
        """A signed, expiring link to the app's file route."""
        key = keys.image_key("", owner, image_id)
        expires = int(time.time()) + self.link_ttl_seconds
        query = urlencode({"expires": expires, "signature": self._sign(key, expires)})
        return Link(
            url=f"{self.base_url}{LINK_ROUTE}/{key}?{query}",
            expires_at=dt.datetime.fromtimestamp(expires, dt.UTC),
        )

    def _sign(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def open_signed(self, key: str, *, expires: str, signature: str) -> Path:
        """The file for a signed link: ``NoSuchImageError`` for a key that is not an image's (or a
        missing image), ``ForbiddenLinkError`` for a bad or expired signature."""
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "owners" or parts[2] != "images" or not parts[3].endswith(".png"):
            raise NoSuchImageError("not an image key")
        try:
            keys.check_ids(parts[1], parts[3].removesuffix(".png"))
        except ValueError as error:
            raise NoSuchImageError("not an image key") from error
        # "²" is a digit to isdigit, not to int(); a 5000-digit number is beyond int()'s limit.
        if not (expires.isascii() and expires.isdigit() and len(expires) <= _MAX_EXPIRES_DIGITS):
            raise ForbiddenLinkError("bad expiry")
        if int(expires) < time.time():
            raise ForbiddenLinkError("link expired")
        # Bytes, not str: compare_digest refuses a str with non-ASCII characters (TypeError, a 500).
        if not hmac.compare_digest(self._sign(key, int(expires)).encode(), signature.encode("utf-8", "replace")):
            raise ForbiddenLinkError("bad signature")
        path = self._path(key).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise NoSuchImageError("no such image")
        return path

    def check(self) -> None:
        """The data folder must be writable."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"data folder {self.root} is not writable")

    def degraded(self) -> str | None:
        """The folder either works (``check``) or it does not: never degraded."""
        return None

    def close(self) -> None:
        """Nothing to release."""
