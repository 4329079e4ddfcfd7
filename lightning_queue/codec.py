"""How snapshot payloads are stored: JSON, zlib-compressed above a size threshold, checksummed.

Prompt-heavy snapshots are mostly text and compress several times over, which
cuts Redis memory and the bytes a worker pulls on a cold fetch. The checksum
(BLAKE2b of the uncompressed JSON) catches a payload damaged in storage: it
fails the rollout with :class:`SnapshotCorruptedError` instead of running an
agent on garbage.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

from .errors import SnapshotCorruptedError, SnapshotTooLargeError

PLAIN = "json"
ZLIB = "zlib+json"


@dataclass(frozen=True)
class EncodedPayload:
    data: bytes
    encoding: str
    checksum: str
    size: int  # bytes of the uncompressed JSON


def checksum(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def encode(raw: bytes, compress_threshold: int, max_bytes: int, resources_id: str = "") -> EncodedPayload:
    """Encode serialized resources for storage; raise :class:`SnapshotTooLargeError` past ``max_bytes``."""
    if len(raw) > max_bytes:
        raise SnapshotTooLargeError(resources_id, len(raw), max_bytes)
    digest = checksum(raw)
    if len(raw) >= compress_threshold:
        packed = zlib.compress(raw, 6)
        if len(packed) < len(raw):
            return EncodedPayload(packed, ZLIB, digest, len(raw))
    return EncodedPayload(raw, PLAIN, digest, len(raw))


def decode(data: bytes, encoding: str, expected_checksum: str | None, resources_id: str) -> bytes:
    """The uncompressed JSON; :class:`SnapshotCorruptedError` on a bad payload or checksum."""
    if encoding == ZLIB:
        try:
            raw = zlib.decompress(data)
        except zlib.error as exc:
            raise SnapshotCorruptedError(resources_id, f"payload does not decompress: {exc}") from None
    elif encoding == PLAIN:
        raw = data
    else:
        raise SnapshotCorruptedError(resources_id, f"unknown payload encoding {encoding!r}")
    if expected_checksum is not None and checksum(raw) != expected_checksum:
        raise SnapshotCorruptedError(resources_id, "checksum mismatch")
    return raw
