"""Where the store keeps what: the one place that knows the directory layout.

::

    <log dir>/
      catalog.sqlite                 sealed segments of every origin (search)
      keys/signing.key, signing.pub  created on first start when none is configured
      <origin dir>/                  one per origin (one proxy process)
        lock                         held by the one process writing this origin
        seq                          the sequence-number high-water mark reserved
        checkpoint                   the newest signed checkpoint
        00000001.seg                 records (scalple/store/segment.py)
        00000001.ckpt                checkpoints signed while it was the newest
        00000001.idx                 its postings, written when it is sealed

A segment's ``.ckpt`` file starts with its opening checkpoint (the tree
before its first record) and, once sealed, ends with its sealing one; so a
segment removed by retention takes nothing with it that a kept one needs.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "CATALOG_FILE",
    "CHECKPOINT_FILE",
    "KEYS_DIR",
    "LOCK_FILE",
    "SEQ_FILE",
    "checkpoints_path",
    "index_path",
    "origin_dir",
    "origin_dirs",
    "segment_numbers",
    "segment_path",
]

CATALOG_FILE = "catalog.sqlite"
CHECKPOINT_FILE = "checkpoint"
KEYS_DIR = "keys"
LOCK_FILE = "lock"
SEQ_FILE = "seq"

_SEGMENT = re.compile(r"\A(\d{8,})\.seg\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def origin_dir(log_dir: Path, origin: str) -> Path:
    """The directory of ``origin``: its name made safe for any file system."""
    name = _UNSAFE.sub("_", origin).strip(".") or "_"
    return log_dir / name


def origin_dirs(log_dir: Path) -> list[Path]:
    """Every origin directory of a log directory (those holding a segment)."""
    if not log_dir.is_dir():
        return []
    return sorted(child for child in log_dir.iterdir() if child.is_dir() and segment_numbers(child))


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:08d}.seg"


def checkpoints_path(directory: Path, number: int) -> Path:
    return directory / f"{number:08d}.ckpt"


def index_path(directory: Path, number: int) -> Path:
    return directory / f"{number:08d}.idx"


def segment_numbers(directory: Path) -> list[int]:
    """The segment numbers present in an origin directory, ascending."""
    numbers = []
    for child in directory.iterdir():
        match = _SEGMENT.match(child.name)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)
