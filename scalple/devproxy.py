"""A Scalple proxy process for tests, benchmarks and the demo.

Runs the real ``scalple serve`` in a subprocess (its own event loop, signals
and exit code, as in production) with a generated configuration file, and
reads back what it wrote.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from scalple.devcluster import free_port
from scalple.query.reader import LogReader

__all__ = ["ScalpleServer"]


def _toml_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else quoted (``"public.users.email"``)."""
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _toml_value(key)


def render_toml(tables: Mapping[str, Mapping[str, object]]) -> str:
    """A TOML document of flat tables (all the configuration needs)."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


class ScalpleServer:
    """``scalple serve`` in front of ``upstream`` (``host:port``)."""

    def __init__(
        self,
        upstream: str,
        base_dir: Path | None = None,
        *,
        config: Mapping[str, Mapping[str, object]] | None = None,
        port: int | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="scalple-proxy-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log_dir = self.base_dir / "log"
        self.stderr_path = self.base_dir / "scalple.stderr"
        tables: dict[str, dict[str, object]] = {
            "server": {"listen": f"{self.host}:{self.port}"},
            "upstream": {"address": upstream},
            "log": {"dir": str(self.log_dir)},
        }
        for table, values in (config or {}).items():
            tables.setdefault(table, {}).update(values)
        self.config_path = self.base_dir / "scalple.toml"
        self.config_path.write_text(render_toml(tables), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def log_bytes(self) -> bytes:
        """Every byte the proxy wrote under its log directory (for leak scans)."""
        if not self.log_dir.is_dir():
            return b""
        return b"".join(
            path.read_bytes() for path in sorted(self.log_dir.rglob("*")) if path.is_file()
        )

    def start(self, timeout: float = 15.0) -> None:
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scalple", "serve", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        stderr.close()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if b"listening on" not in line:
            self.process.wait(timeout)
            raise RuntimeError(
                f"scalple did not start (exit {self.process.returncode}):\n{self.stderr()}"
            )

    def dsn(self, **params: str) -> str:
        """libpq key=value connection string to the proxy."""
        base = {"host": self.host, "port": str(self.port)}
        base.update(params)
        return " ".join(f"{k}='{v}'" for k, v in base.items())

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_contains(self, text: str) -> bool:
        return text in self.stderr()

    def records(self, kind: str | None = "statement") -> list[dict[str, Any]]:
        """Every record written so far (of ``kind``, or all when None)."""
        if not self.log_dir.is_dir():
            return []
        kinds = None if kind is None else frozenset({kind})
        return list(LogReader(self.log_dir).records(kinds=kinds))

    def wait_for_records(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        kind: str | None = "statement",
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Poll the audit log until ``predicate(records)`` holds; return them."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records(kind)
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"audit log never satisfied the condition; have {len(records)} records"
                )
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the proxy and its audit worker at once: a crash, as a power
        cut would leave it (minus the page cache)."""
        if self.process is None:
            return
        pids = [self.process.pid, *_descendants(self.process.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.returncode = self.process.returncode
        self.process = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.process is None:
            return self.returncode
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.returncode = self.process.returncode
        self.process = None
        return self.returncode

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            import shutil

            with contextlib.suppress(OSError):
                shutil.rmtree(self.base_dir)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            children = [
                int(child) for task in tasks for child in (task / "children").read_text().split()
            ]
        except OSError:
            continue
        found.extend(children)
        pending.extend(children)
    return found
