"""Catalog snapshots for the databases the proxy serves.

Analysis needs the upstream catalog to expand ``*``, resolve unqualified
names and look inside views.  The proxy keeps one snapshot per (database,
role), loaded over a connection of its own on first use, refreshed after DDL
passes through and on an interval.  Loading runs on the writer's thread,
never on the relay's; a failure is remembered (and retried later) so that
records say the catalog was unavailable instead of guessing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scalple.analysis.catalog import Catalog, load_catalog

__all__ = ["CatalogProvider", "CatalogSource"]

log = logging.getLogger(__name__)

_RETRY_AFTER_FAILURE = 30.0


@dataclass(frozen=True)
class CatalogSource:
    """How to reach a database's catalog (see ``[catalog]`` in the docs)."""

    host: str
    port: int
    dsn: str = ""
    """libpq key=value base; ``dbname`` and ``user`` are set per database and role."""
    password_file: str | None = None
    sslmode: str = "disable"
    sslrootcert: str | None = None

    def conninfo(self, database: str, role: str) -> str:
        from psycopg.conninfo import make_conninfo

        params: dict[str, str] = {}
        if not self.dsn:
            params.update(host=self.host, port=str(self.port), user=role, sslmode=self.sslmode)
            if self.sslrootcert:
                params["sslrootcert"] = self.sslrootcert
        if self.password_file:
            params["password"] = Path(self.password_file).read_text(encoding="utf-8").strip()
        params["dbname"] = database
        params.setdefault("application_name", "scalple-catalog")
        params.setdefault("connect_timeout", "5")
        return make_conninfo(self.dsn, **params)


@dataclass
class _Entry:
    catalog: Catalog | None
    loaded_at: float
    error: str | None = None
    stale: bool = False


@dataclass
class CatalogProvider:
    """Snapshots by (database, role); thread-safe, loads outside the lock."""

    source: CatalogSource
    refresh_interval: float = 300.0
    loader: Callable[[str], Catalog] = load_catalog
    _entries: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    loads: int = 0
    failures: int = 0

    def get(self, database: str, role: str) -> tuple[Catalog | None, str | None]:
        """The current snapshot, or None and why it is unavailable."""
        key = (database, role)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            age = now - entry.loaded_at
            if entry.catalog is not None and not entry.stale and age < self.refresh_interval:
                return entry.catalog, None
            if entry.catalog is None and age < _RETRY_AFTER_FAILURE:
                return None, entry.error
        return self._load(key, now)

    def invalidate(self, database: str) -> None:
        """DDL ran in ``database``: reload its snapshots before the next use."""
        with self._lock:
            for (db, _role), entry in self._entries.items():
                if db == database:
                    entry.stale = True

    def _load(self, key: tuple[str, str], now: float) -> tuple[Catalog | None, str | None]:
        database, role = key
        try:
            catalog = self.loader(self.source.conninfo(database, role))
        except Exception as exc:  # any driver or auth failure: record it, retry later
            reason = f"catalog of database {database!r} unavailable: {_short(exc)}"
            log.warning("%s (role %s); retrying in %.0fs", reason, role, _RETRY_AFTER_FAILURE)
            with self._lock:
                self.failures += 1
                self._entries[key] = _Entry(None, now, reason)
            return None, reason
        with self._lock:
            self.loads += 1
            self._entries[key] = _Entry(catalog, now)
        return catalog, None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
