"""Object key layout. Keys are made by the server: no prompt text, no raw user name.

``{prefix}owners/{owner}/images/{id}.png`` and ``.../records/{id}.json``, where ``owner`` is a
hash of the owner's identity and ``id`` starts with an inverted millisecond timestamp, so a
plain lexicographic listing (what S3 returns) is newest first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import uuid

_INVERSION_BASE = 10**13  # milliseconds: good until the year 2286
IMAGE_ID_PATTERN = re.compile(r"^[0-9]{13}-[0-9a-f]{12}$")
OWNER_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def owner_key(identity: str, secret: bytes | None = None) -> str:
    """A stable, opaque key for a user name, browser token or session: keyed with ``secret`` (the
    secret every front end shares), so nobody holding a link can confirm a guessed user name.
    Without a secret, the unkeyed hash earlier versions used (read once, to adopt old histories)."""
    text = f"sd-service-owner:{identity}".encode()
    if secret is None:
        return hashlib.sha256(text).hexdigest()[:32]
    return hmac.new(secret, text, hashlib.sha256).hexdigest()[:32]


def new_image_id(now: dt.datetime) -> str:
    """An id that sorts newest first and is unique across processes."""
    millis = int(now.timestamp() * 1000)
    return f"{_INVERSION_BASE - millis:013d}-{uuid.uuid4().hex[:12]}"


def check_owner(owner: str) -> None:
    """Refuse an owner key this module did not make (so no path can escape)."""
    if not OWNER_PATTERN.fullmatch(owner):
        raise ValueError("not a valid owner key")


def check_ids(owner: str, image_id: str) -> None:
    """Refuse anything that is not a key this module made (so no path can escape)."""
    check_owner(owner)
    if not IMAGE_ID_PATTERN.fullmatch(image_id):
        raise ValueError("not a valid image id")


def owner_prefix(prefix: str, owner: str) -> str:
    return f"{prefix}owners/{owner}/"


def image_key(prefix: str, owner: str, image_id: str) -> str:
    check_ids(owner, image_id)
    return f"{owner_prefix(prefix, owner)}images/{image_id}.png"


def record_key(prefix: str, owner: str, image_id: str) -> str:
    check_ids(owner, image_id)
    return f"{owner_prefix(prefix, owner)}records/{image_id}.json"


def records_prefix(prefix: str, owner: str) -> str:
    return f"{owner_prefix(prefix, owner)}records/"
