"""Reading the audit log back: every command that looks at records goes
through here, so the on-disk layout is known in one place."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from scalple.records import AUDIT_FILE

__all__ = ["LogReader", "parse_time"]

_decoder = msgspec.json.Decoder()


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from the command line.

    Accepts RFC 3339 / ISO 8601 (``2026-05-01``, ``2026-05-01T10:00:00Z``;
    a time without zone is UTC) or an age relative to now: ``90s``, ``15m``,
    ``12h``, ``7d``.
    """
    text = text.strip()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if text[:-1].isdigit() and text[-1:] in units:
        delta = timedelta(**{units[text[-1]]: int(text[:-1])})
        return (now or datetime.now(UTC)) - delta
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time: use 2026-05-01, 2026-05-01T10:00:00Z or 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stamp(when: datetime) -> str:
    """The record ``ts`` form, so that times compare as strings."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LogReader:
    """Records of one log directory, oldest first."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / AUDIT_FILE
        if not self.log_dir.is_dir():
            raise FileNotFoundError(f"no audit log directory {self.log_dir}")

    def records(
        self,
        *,
        kinds: frozenset[str] | None = frozenset({"statement"}),
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Matching records; ``since`` is inclusive, ``until`` exclusive."""
        low = _stamp(since) if since else None
        high = _stamp(until) if until else None
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                record = self._decode(line)
                if record is None or (kinds is not None and record.get("kind") not in kinds):
                    continue
                ts = record.get("ts", "")
                if (low is not None and ts < low) or (high is not None and ts >= high):
                    continue
                yield record

    def follow(
        self, *, kinds: frozenset[str] | None = frozenset({"statement"}), poll: float = 0.2
    ) -> Iterator[dict[str, Any]]:
        """New records as they are appended, until interrupted."""
        while not self.path.exists():
            time.sleep(poll)
        with self.path.open("rb") as handle:
            handle.seek(0, 2)
            pending = b""
            while True:
                chunk = handle.readline()
                if not chunk:
                    time.sleep(poll)
                    continue
                pending += chunk
                if not pending.endswith(b"\n"):
                    continue  # a line still being written
                record = self._decode(pending)
                pending = b""
                if record is not None and (kinds is None or record.get("kind") in kinds):
                    yield record

    @staticmethod
    def _decode(line: bytes) -> dict[str, Any] | None:
        line = line.strip()
        if not line:
            return None
        try:
            record = _decoder.decode(line)
        except msgspec.DecodeError:
            return None  # a torn last line after a crash
        return record if isinstance(record, dict) else None
