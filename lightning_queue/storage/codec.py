"""How snapshot payloads are stored: JSON, zstd-compressed above a size threshold, checksummed.

Prompt-heavy snapshots are mostly text and compress several times over, which
cuts Redis memory and the bytes a worker pulls on a cold fetch. zstd (level 9)
compresses this text at least as well as zlib and decompresses it about 4x
faster, which is what a cold fetch waits on. The checksum
(BLAKE2b of the uncompressed JSON) catches a payload damaged in storage: it
fails the rollout with :class:`SnapshotCorruptedError` instead of running an
agent on garbage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lightning_queue.core.errors import SnapshotCorruptedError, SnapshotTooLargeError

PLAIN = "json"
ZSTD = "zstd+json"
LEVEL = 9


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
        # A (de)compressor object must not be shared between threads; making one costs ~8 µs, nothing
        # next to the work it does on a payload above the threshold, so each call gets its own.
        import zstandard  # here: reading and writing small snapshots (most CLI calls) never needs it

        packed = zstandard.ZstdCompressor(level=LEVEL).compress(raw)
        if len(packed) < len(raw):
            return EncodedPayload(packed, ZSTD, digest, len(raw))
    return EncodedPayload(raw, PLAIN, digest, len(raw))


def decode(data: bytes, encoding: str, expected_checksum: str | None, resources_id: str) -> bytes:
    """The uncompressed JSON; :class:`SnapshotCorruptedError` on a bad payload or checksum."""
    if encoding == ZSTD:
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as exc:
            raise SnapshotCorruptedError(resources_id, f"payload does not decompress: {exc}") from None
        except MemoryError:  # a damaged frame header can claim an absurd content size
            raise SnapshotCorruptedError(resources_id, "payload's frame header declares an impossible size") from None
    elif encoding == PLAIN:
        raw = data
    else:
        raise SnapshotCorruptedError(resources_id, f"unknown payload encoding {encoding!r}")
    if expected_checksum is not None and checksum(raw) != expected_checksum:
        raise SnapshotCorruptedError(resources_id, "checksum mismatch")
    return raw
