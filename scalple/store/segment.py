"""The segment file format: a header, then framed records, append-only.

A segment holds a contiguous run of the log's leaves::

    b"SCLPSEG1" | u32 header length | msgpack SegmentHeader
    then per record:  u32 payload length | payload | 32-byte leaf hash

All integers are little-endian.  The leaf hash is blake3(0x00 || payload),
stored beside the payload so that a reader finds a torn or damaged frame
without decoding anything, and so that the stored bytes are exactly what the
tree commits to (a record is never re-encoded to be verified).

The header carries the compact range of the tree before the segment's first
leaf (the roots of the perfect subtrees of ``[0, first_index)``): with it a
segment can be verified and proved from even when every older segment was
removed by retention.  Its root must equal the signed checkpoint of size
``first_index`` (the segment's opening checkpoint).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from scalple.store.hashing import HASH_SIZE, leaf_hash

__all__ = [
    "FRAME_OVERHEAD",
    "MAGIC",
    "MAX_PAYLOAD",
    "Frame",
    "SegmentError",
    "SegmentHeader",
    "frame",
    "read_file_header",
    "read_header",
    "scan_frames",
    "write_header",
]

MAGIC = b"SCLPSEG1"
MAX_PAYLOAD = 64 << 20  # a record is at most capture_limit plus fields; far below
_LENGTH = struct.Struct("<I")
FRAME_OVERHEAD = _LENGTH.size + HASH_SIZE


class SegmentError(ValueError):
    """A segment file is not what the format says; the message names it."""


class SegmentHeader(msgspec.Struct, array_like=True, frozen=True):
    """What a segment says about itself, written once when it is created."""

    version: int
    origin: str
    number: int
    first_index: int  # leaf index (0-based) of the segment's first record
    created_ns: int
    start_hashes: list[bytes]  # compact range of [0, first_index)


_encode_header = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(SegmentHeader).decode


def write_header(fd: int, header: SegmentHeader) -> int:
    """Write ``header`` at the start of the empty file ``fd``; returns its size."""
    body = _encode_header(header)
    data = MAGIC + _LENGTH.pack(len(body)) + body
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def read_header(data: bytes | memoryview, path: Path | str) -> tuple[SegmentHeader, int]:
    """The header of a segment's bytes and the offset of its first frame."""
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise SegmentError(f"{path}: not a Scalple segment (bad magic)")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise SegmentError(f"{path}: header cut short")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if len(data) < start + length:
        raise SegmentError(f"{path}: header cut short")
    try:
        header = _decode_header(data[start : start + length])
    except msgspec.DecodeError as exc:
        raise SegmentError(f"{path}: unreadable header ({exc})") from None
    return header, start + length


def read_file_header(handle: BinaryIO, path: Path | str) -> tuple[SegmentHeader, int]:
    """The header of an open segment file, reading no more than it takes."""
    fixed = handle.read(len(MAGIC) + _LENGTH.size)
    if len(fixed) == len(MAGIC) + _LENGTH.size and fixed.startswith(MAGIC):
        (length,) = _LENGTH.unpack_from(fixed, len(MAGIC))
        fixed += handle.read(min(length, MAX_PAYLOAD))
    return read_header(fixed, path)


def frame(payload: bytes, digest: bytes) -> bytes:
    """The stored form of one record."""
    return _LENGTH.pack(len(payload)) + payload + digest


class Frame(msgspec.Struct, array_like=True):
    """One stored record as found in a segment."""

    offset: int  # where the frame starts in the file
    payload: bytes
    digest: bytes  # the stored leaf hash
    intact: bool  # the stored hash is the hash of the stored payload


def scan_frames(data: bytes | memoryview, start: int, *, check: bool = True) -> Iterator[Frame]:
    """Frames from ``start`` until the data ends or stops making sense.

    Stops before an incomplete frame (a record still being written, or a
    torn tail after a crash): the caller compares the last frame's end with
    the file size to tell.  With ``check`` each frame's hash is recomputed.
    """
    size = len(data)
    offset = start
    unpack = _LENGTH.unpack_from
    while offset + _LENGTH.size <= size:
        (length,) = unpack(data, offset)
        end = offset + _LENGTH.size + length + HASH_SIZE
        if length > MAX_PAYLOAD or end > size:
            return
        payload = bytes(data[offset + _LENGTH.size : end - HASH_SIZE])
        digest = bytes(data[end - HASH_SIZE : end])
        intact = leaf_hash(payload) == digest if check else True
        yield Frame(offset, payload, digest, intact)
        offset = end


def frame_end(item: Frame) -> int:
    """Where the frame after ``item`` starts."""
    return item.offset + FRAME_OVERHEAD + len(item.payload)
