#!/usr/bin/env python3
"""pgbench through Scalple, PgBouncer and straight to PostgreSQL, in one invocation.

Why one script does everything: the numbers only mean something *relative to each
other*, measured on the same machine, in the same minutes.  So this script starts its
own private PostgreSQL, PgBouncer pools and Scalple proxies, runs the same pgbench
workloads against every target, interleaving them (round after round, every target in
turn) so that noise from a shared, busy machine spreads evenly instead of penalising
whichever target happened to run during a bad minute, and reports each Scalple row as
a ratio against its PgBouncer reference measured in the same rounds.

Scalple runs with its audit log on (the only mode it has): after every run through a
proxy the script counts the statement records the proxy wrote, so nobody can publish a
number for a proxy that was not auditing.

With ``--store`` the script compares audit logs instead of proxies, in the same
interleaved way: Scalple -> PostgreSQL with the JSON-lines sink the store replaced
(commit f736e1d, run from a git worktree), with the store in ``durability = "async"``
and with the store in ``durability = "strict"``, at 16 clients and 1 client.

With ``--subjects`` it compares PII masking and data subjects, in the same interleaved
way: two Scalple -> PostgreSQL proxies, one with the default configuration ("plain"),
one with ``[subjects] "public.pgbench_accounts.aid" = "account"``, ``[log] literals =
"all"`` and a ``[masking] key_file`` ("subjects"), at 16 clients and 1 client (simple
protocol), 16 clients with ``-M extended`` (parameters are masked too) and 1 client
running a 10,000-row range SELECT (the relay reads ``aid`` out of every row).  The
two proxies swap places every other round, and every run waits for its records and
then until the proxy and its audit worker are idle, so that no run inherits the
previous one's backlog.  The audit log of both is then read back to show that the
subjects proxy's records do name subjects and hold masked queries (and the plain
proxy's do not).

Usage::

    python benchmarks/pgbench_compare.py [--duration S] [--rounds N] [--scale 10] [--json]
                                         [--store [--jsonl-tree DIR] | --subjects]

Progress goes to stderr; the report (a table, or JSON with ``--json``) to stdout.  The
exit status is 0 whether the performance targets are met or not: this is a measurement,
not a test.  It is 1 when the benchmark itself could not run and 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.machinery
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast

import scalple
from scalple.devcluster import PgBouncer, PostgresCluster, Role
from scalple.devproxy import ScalpleServer
from scalple.store import layout
from scalple.store.segment import FRAME_OVERHEAD, SegmentError, read_header

USER = "app_user"
PASSWORD = "app_pass"
DATABASE = "app"
POOL_SIZE = 20  # >= the 16 pgbench clients, so no client ever waits for a server connection
TPS_RE = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")
PROCESSED_RE = re.compile(r"number of transactions actually processed: (\d+)")
FAILED_RE = re.compile(r"number of failed transactions: (\d+)")
STATEMENT_MARK = b'"kind":"statement"'
"""Occurs exactly once in every statement record of the JSON-lines sink (f736e1d),
wherever the field sits: inside JSON strings quotes are escaped (``\\"``), so no value
can contain it."""
STATEMENT_TYPE = ord("S")
"""The first byte of a statement record's stored payload in the store
(scalple/records.py ``encode_record``); session records start with ``E``."""
_FRAME_LENGTH = struct.Struct("<I")  # a store frame: u32 length | payload | 32-byte hash
JSONL_COMMIT = "f736e1d"  # the last commit whose audit log was the JSON-lines file
JSONL_FILE = "audit.jsonl"
DEFAULT_JSONL_TREE = Path("/tmp/scalple-jsonl")
STORE_WORKLOADS = ("c16_simple", "c1_simple")
DEFAULT_WORKLOADS = ("c16_simple", "c16_prepared", "c1_simple", "c1_prepared")
SUBJECT_WORKLOADS = ("c16_simple", "c1_simple", "c16_extended", "c1_rows")
SUBJECT_COLUMN = "public.pgbench_accounts.aid"
SUBJECT_KIND = "account"
RANGE_ROWS = 10_000  # rows of the c1_rows workload's SELECT
SUBJECTS_TARGET = 0.90  # the issue: within 10% of the same run without subjects


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Workload:
    """One pgbench invocation shape (``-S``: select-only, the relay's worst case).

    Select-only transactions are tiny, so per-message overhead of a proxy dominates;
    that is the honest stress test for a relay that must observe every statement.
    A workload with a ``script`` runs that pgbench script (``-f``) instead of ``-S``;
    ``{max_start}`` in it is replaced by the highest ``aid`` a 10,000-row range may
    start at for the scale in use.
    """

    key: str
    label: str
    clients: int
    threads: int
    mode: str  # pgbench -M: simple | prepared | extended
    script: str | None = None


@dataclass(frozen=True)
class Target:
    """Where pgbench connects, and what its row is compared against."""

    key: str
    label: str
    host: str
    port: int
    short: str  # for the table's "vs" column
    reference: str | None  # target key for the ratio column; None = no ratio
    proxy: ScalpleServer | None = None  # set for Scalple targets: audit records are checked
    may_fail: frozenset[str] = frozenset()  # workload keys expected to fail: not retried
    proxy_pid: Callable[[], int] | None = None  # the process in front of the server, if any


@dataclass
class Run:
    """The outcome of one pgbench run (or of its failure)."""

    round: int
    workload: str
    target: str
    ok: bool
    seconds: float
    tps: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    logged_transactions: int = 0
    mean_ms: float | None = None
    p99_ms: float | None = None
    audit_records: int | None = None
    audit_lag_s: float | None = None  # how long after pgbench ended the last record landed
    proxy_cpu_us_per_tx: float | None = None  # CPU (user+sys) of the proxy process per tx
    relay_cpu_us_per_tx: float | None = None  # the same, its own process only (no children)
    load_before: float | None = None  # 1-minute load average when the run started
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One line of the table: a (workload, target) pair summarised over the rounds."""

    workload: str
    target: str
    runs_ok: int
    runs: int
    tps_median: float | None
    tps_spread_pct: float | None  # (max - min) / median over rounds
    mean_ms: float | None  # median over rounds of the per-run mean
    p99_ms: float | None  # median over rounds of the per-run p99
    proxy_cpu_us: float | None  # median over rounds of the proxy's CPU microseconds per tx
    ratio: float | None  # median over rounds of tps / reference tps in the same round
    reference: str | None
    error: str | None
    warnings: list[str]
    relay_cpu_us: float | None = None  # median of the proxy's own process (no children)


@dataclass
class Check:
    """One of the issue's performance targets and whether this measurement met it."""

    name: str
    workload: str
    target: str
    reference: str
    threshold: float
    ratio: float | None
    status: str  # PASS | MISS | N/A
    note: str = ""


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload("c16_simple", "-S c16 simple", 16, 2, "simple"),
        Workload("c16_prepared", "-S c16 prepared", 16, 2, "prepared"),
        Workload("c1_simple", "-S c1 simple", 1, 1, "simple"),
        Workload("c1_prepared", "-S c1 prepared", 1, 1, "prepared"),
        Workload("c16_extended", "-S c16 extended", 16, 2, "extended"),
        Workload(
            "c1_rows",
            "c1 10k rows",
            1,
            1,
            "simple",
            script="\\set a random(1, {max_start})\n"
            f"SELECT aid, bid, abalance FROM pgbench_accounts "
            f"WHERE aid BETWEEN :a AND :a + {RANGE_ROWS - 1};\n",
        ),
    )
}


# --------------------------------------------------------------------------- small helpers


class Interrupted(Exception):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C so every process is cleaned up."""


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def progress(message: str) -> None:
    """Progress for the human watching; stdout stays clean for the report/JSON."""
    print(message, file=sys.stderr, flush=True)


def fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, sec = divmod(seconds, 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def pg_bindir() -> Path:
    """Client binaries (pgbench) live with the server's on Debian, not on PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out and (Path(out) / "pgbench").is_file():
            return Path(out)
    fallback = Path("/usr/lib/postgresql/15/bin")
    if (fallback / "pgbench").is_file():
        return fallback
    raise SystemExit("pgbench not found: install postgresql-15 (pg_config --bindir)")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_cpu_seconds(pid: int) -> float:
    """user+system CPU of ``pid`` and of all its descendants, from /proc, in seconds.

    CPU per transaction is the number that survives a noisy shared machine best: other
    load changes how long a transaction waits, much less how much CPU it needs.
    Descendants count because a proxy may do part of its work in helper processes
    (Scalple's audit worker); a child's CPU only reaches the parent's own counters
    when it exits.
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(_stat_fields(int(entry.name))[1])
                children.setdefault(ppid, []).append(int(entry.name))
    ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = _stat_fields(current)
        except OSError:
            if current == pid:
                raise
            continue  # a helper that just exited
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        todo.extend(children.get(current, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, limit: float, step: float = 0.5, busy: float = 0.1) -> float:
    """Wait until ``pid`` and its descendants use less than ``busy`` of a CPU over
    ``step`` seconds, or ``limit`` seconds passed; returns the seconds waited."""
    started = time.monotonic()
    before = process_cpu_seconds(pid)
    while time.monotonic() - started < limit:
        time.sleep(step)
        now = process_cpu_seconds(pid)
        if now - before < busy * step:
            break
        before = now
    return time.monotonic() - started


def own_cpu_seconds(pid: int) -> float:
    """user+system CPU of ``pid`` alone (every thread, no child process), in seconds.

    For Scalple this is the relay (event loop, hand-off and acknowledgement threads);
    the rest of :func:`process_cpu_seconds` is its audit worker process.
    """
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return os.getloadavg()[0]


def client_env() -> dict[str, str]:
    """libpq environment: none of the caller's PG* settings, no TLS anywhere (fair)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10", LC_ALL="C")
    return env


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def machine_info(bindir: Path) -> dict[str, Any]:
    """What a reader needs to judge the absolute numbers (which mean little on their own)."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = first_line(
        ["git", "-C", str(Path(scalple.__file__).parent), "rev-parse", "--short", "HEAD"]
    )
    dirty = subprocess.run(
        ["git", "-C", str(Path(scalple.__file__).parent), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "postgresql": first_line([str(bindir / "postgres"), "--version"]),
        "pgbench": first_line([str(bindir / "pgbench"), "--version"]),
        "pgbouncer": first_line([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"]),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "scalple": f"{scalple.__version__} (git {git}"
        + (f" + uncommitted changes in {len(dirty.splitlines())} files)" if dirty else ")"),
    }


# --------------------------------------------------------------------------- pgbench


def parse_latency_logs(files: Sequence[Path]) -> tuple[int, float | None, float | None]:
    """(transactions, mean ms, p99 ms) from pgbench ``--log`` files.

    Column 3 is the transaction's latency in microseconds, or ``failed``/``skipped``;
    only numeric latencies count.  p99 is nearest-rank.
    """
    latencies: list[int] = []
    for path in files:
        with path.open("rb") as fh:
            for line in fh:
                parts = line.split(b" ", 3)
                if len(parts) >= 3 and parts[2].isdigit():
                    latencies.append(int(parts[2]))
    if not latencies:
        return 0, None, None
    latencies.sort()
    rank = max(1, math.ceil(0.99 * len(latencies)))
    mean_us = sum(latencies) / len(latencies)
    return len(latencies), mean_us / 1000.0, latencies[rank - 1] / 1000.0


def summarize_stderr(stderr: str) -> tuple[str | None, list[str]]:
    """Condense pgbench's stderr: 16 identical "client N aborted" lines become one.

    Returns (abort summary or None, other error lines as warnings).
    """
    aborted: dict[str, int] = {}
    warnings: dict[str, int] = {}
    for raw in stderr.splitlines():
        line = raw.strip()
        if not line or "error" not in line.lower():
            continue
        match = re.search(
            r"client \d+ (?:script \d+ )?aborted in command \d+ query \d+: (.*)", line
        )
        if match:
            reason = " ".join(match.group(1).split())
            aborted[reason] = aborted.get(reason, 0) + 1
        elif "Run was aborted" not in line:
            # Two pgbench threads may interleave their lines: keep the server's message.
            found = re.search(r"((?:ERROR|FATAL|WARNING):.*)", line)
            text = " ".join((found.group(1) if found else line).split())
            warnings[text] = warnings.get(text, 0) + 1
    summary = None
    if aborted:
        summary = "; ".join(f"{n} client(s) aborted: {reason}" for reason, n in aborted.items())
    notes = [f"{text} (x{n})" if n > 1 else text for text, n in warnings.items()]
    return summary, notes


def run_pgbench(
    pgbench: Path,
    workload: Workload,
    target: Target,
    *,
    duration: int,
    log_dir: Path,
    round_no: int,
    audit: AuditCounter | None = None,
    scale: int = 10,
    settle: float = 0.0,
) -> Run:
    """One measured pgbench run; never raises for pgbench's own failures (they become rows).

    ``-n``: no vacuum before the run (it would add statements that are not the workload
    and take locks); the tables were vacuumed by ``pgbench -i``.  With ``audit`` the run
    also waits for the proxy's audit writer to catch up before reading the proxy's CPU
    time, so that the writer's work for this run's statements is charged to this run.
    ``scale`` is the ``pgbench -i`` scale (a workload's script may need it).  With
    ``settle`` > 0 the run then waits (at most that many seconds) until the proxy's
    processes are idle: work an audit worker still does after writing the records (such
    as posting them to the segment index) is then charged to this run, and does not
    slow down the next one.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = log_dir / "tx"
    what = ["-S"]
    if workload.script is not None:
        script = log_dir / "workload.sql"
        script.write_text(workload.script.format(max_start=100_000 * scale - RANGE_ROWS + 1))
        what = ["-f", str(script)]
    cmd = [
        str(pgbench),
        "-n",
        *what,
        "-M",
        workload.mode,
        "-c",
        str(workload.clients),
        "-j",
        str(workload.threads),
        "-T",
        str(duration),
        "--log",
        f"--log-prefix={prefix}",
        "-h",
        target.host,
        "-p",
        str(target.port),
        "-U",
        USER,
        DATABASE,
    ]
    run = Run(round=round_no, workload=workload.key, target=target.key, ok=False, seconds=0.0)
    run.load_before = load_average()
    proxy_pid: int | None = None
    cpu_before: float | None = None
    own_before: float | None = None
    if target.proxy_pid is not None:
        # A proxy that died makes pgbench fail, which is reported; CPU is then unknown.
        with contextlib.suppress(Exception):
            proxy_pid = target.proxy_pid()
            cpu_before = process_cpu_seconds(proxy_pid)
            own_before = own_cpu_seconds(proxy_pid)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=log_dir,
            env=client_env(),
            capture_output=True,
            text=True,
            timeout=duration + 120,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        run.seconds = time.monotonic() - started
        run.error = f"pgbench did not finish within {duration + 120}s (killed)"
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        if stderr:
            run.error += ": " + stderr.strip()[-500:]
        return run
    run.seconds = time.monotonic() - started
    abort_summary, run.warnings = summarize_stderr(proc.stderr)
    if m := TPS_RE.search(proc.stdout):
        run.tps = float(m.group(1))
    if m := PROCESSED_RE.search(proc.stdout):
        run.transactions = int(m.group(1))
    if m := FAILED_RE.search(proc.stdout):
        run.failed_transactions = int(m.group(1))
    if audit is not None:
        ended = time.monotonic()
        expected = (run.transactions or 0) + (run.failed_transactions or 0)
        run.audit_records = audit.collect(expected)
        run.audit_lag_s = audit.last_record_at - ended if audit.last_record_at > ended else 0.0
        audit.total_transactions += expected
        audit.run_seconds += duration
    if settle > 0 and proxy_pid is not None:
        with contextlib.suppress(OSError):
            wait_idle(proxy_pid, settle)
    cpu_used = own_used = None
    if proxy_pid is not None and cpu_before is not None:
        with contextlib.suppress(OSError):
            cpu_used = process_cpu_seconds(proxy_pid) - cpu_before
            if own_before is not None:
                own_used = own_cpu_seconds(proxy_pid) - own_before
    logs = sorted(log_dir.glob("tx.*"))
    run.logged_transactions, run.mean_ms, run.p99_ms = parse_latency_logs(logs)
    if cpu_used is not None and run.transactions:
        run.proxy_cpu_us_per_tx = 1e6 * cpu_used / run.transactions
    if own_used is not None and run.transactions:
        run.relay_cpu_us_per_tx = 1e6 * own_used / run.transactions
    for path in logs:  # a 10 s run at 60k tps logs ~20 MB: do not keep them around
        path.unlink()
    if proc.returncode != 0 or run.tps is None or abort_summary:
        detail = abort_summary or (proc.stderr.strip()[-800:] or proc.stdout.strip()[-800:])
        run.error = f"pgbench exit {proc.returncode}: {detail}"
        return run
    run.ok = True
    return run


# --------------------------------------------------------------------------- audit check


class AuditCounter:
    """Counts the statement records a proxy appended since the previous call.

    Reads only what is new (the log grows by gigabytes over a benchmark), in chunks,
    and counts whole records only, so a record being written is counted next time.
    Subclasses know one log format each.
    """

    def __init__(self) -> None:
        self.total = 0
        self.total_transactions = 0
        self.run_seconds = 0.0
        self.last_record_at = 0.0  # time.monotonic() when new records were last seen
        self.timeout = 30.0  # the longest ``collect`` waits by default
        self.quiet = 5.0  # ... and how long it waits for the next record by default

    def _count_new(self) -> int:
        raise NotImplementedError

    def size(self) -> int:
        """Bytes of the log so far."""
        raise NotImplementedError

    def collect(
        self, expected: int, timeout: float | None = None, quiet: float | None = None
    ) -> int:
        """New records, waiting (bounded) for the proxy's writer to catch up.

        Stop waiting once ``expected`` records arrived (the usual case: records may
        exceed pgbench's count, never fall short) or nothing new appeared for ``quiet``
        seconds.  Records do not arrive evenly: when the audit worker falls behind, the
        proxy hands it everything queued meanwhile as one batch, written with one write
        once the whole batch is built (at 16 clients tens of thousands of records,
        seconds later), so a short quiet time would charge them to the next run and
        let the worker's catching up slow that run down.
        """
        got = self._count_new()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        quiet = self.quiet if quiet is None else quiet
        quiet_since = time.monotonic()
        while got < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            new = self._count_new()
            got += new
            if new:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > quiet:
                break
        self.total += got
        return got


class JsonlCounter(AuditCounter):
    """The JSON-lines sink's ``audit.jsonl`` (commit f736e1d): one line per record."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.offset = 0

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def _count_new(self) -> int:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return 0
        count = 0
        with fh:
            fh.seek(self.offset)
            while chunk := fh.read(8 << 20):
                end = chunk.rfind(b"\n") + 1
                if end == 0:  # a partial record bigger than the chunk, or mid-write
                    break
                count += chunk.count(STATEMENT_MARK, 0, end)
                self.offset += end
                self.last_record_at = time.monotonic()
                if end < len(chunk):
                    fh.seek(self.offset)
        return count


class StoreCounter(AuditCounter):
    """The store's segments under a proxy's log directory (every origin in it).

    Counts frames whose payload is a statement record, from each frame's length and
    type byte: nothing is decoded or re-hashed (``scalple verify`` checks hashes; this
    only checks that every statement has its record).  A frame still being written
    (its length points past the end of the file) is counted next time.  Sealed
    segments are finished before the next one exists, so only the newest segment
    seen, and any after it, are read again.
    """

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir = log_dir
        self.offsets: dict[Path, int] = {}  # segment -> offset after its last counted frame
        self.newest: dict[Path, int] = {}  # origin directory -> newest segment number seen

    def size(self) -> int:
        return sum(
            path.stat().st_size
            for directory in layout.origin_dirs(self.log_dir)
            for path in directory.glob("*.seg")
        )

    def _count_new(self) -> int:
        count = 0
        for directory in layout.origin_dirs(self.log_dir):
            numbers = [
                n for n in layout.segment_numbers(directory) if n >= self.newest.get(directory, 0)
            ]
            for number in numbers:
                count += self._count_segment(layout.segment_path(directory, number))
            if numbers:
                self.newest[directory] = numbers[-1]
        return count

    def _count_segment(self, path: Path) -> int:
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            return 0
        count = 0
        with fh:
            offset = self.offsets.get(path)
            if offset is None:
                try:
                    _, offset = read_header(fh.read(1 << 16), path)
                except SegmentError:
                    return 0  # the header is still being written
            fh.seek(offset)
            while chunk := fh.read(8 << 20):
                used, found = _statement_frames(chunk)
                if used == 0:  # a frame being written (records are far below 8 MB)
                    break
                count += found
                offset += used
                self.last_record_at = time.monotonic()
                if used < len(chunk):
                    fh.seek(offset)
            self.offsets[path] = offset
        return count


def _statement_frames(data: bytes) -> tuple[int, int]:
    """(bytes of the whole frames at the start of ``data``, statement records among them)."""
    unpack = _FRAME_LENGTH.unpack_from
    size = len(data)
    offset = found = 0
    while offset + _FRAME_LENGTH.size < size:
        (length,) = unpack(data, offset)
        end = offset + FRAME_OVERHEAD + length
        if end > size:
            break
        if data[offset + _FRAME_LENGTH.size] == STATEMENT_TYPE:
            found += 1
        offset = end
    return offset, found


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class _BouncerUpstream:
    """What PgBouncer reads from its upstream: lets one PgBouncer sit in front of another."""

    host: str
    port: int
    roles: tuple[Role, ...]


@dataclass
class Environment:
    """All processes the benchmark owns; cleaned up by the ExitStack in ``main``.

    The PgBouncers are None with ``--store`` and ``--subjects`` (every target goes
    straight to PostgreSQL).
    """

    cluster: PostgresCluster
    bouncer: PgBouncer | None
    session_bouncer: PgBouncer | None
    front_bouncer: PgBouncer | None
    targets: dict[str, Target]
    counters: dict[str, AuditCounter]
    store: bool = False
    subjects: bool = False


class TreeScalpleServer(ScalpleServer):
    """``scalple serve`` run from another source tree (an older commit's git worktree).

    The same Python and venv, with the tree first on the module path (its working
    directory and PYTHONPATH), so that the proxy and its audit worker (a spawned
    process, which inherits both) import that tree's ``scalple`` instead of this one.
    """

    def __init__(
        self, tree: Path, upstream: str, *, config: dict[str, dict[str, object]] | None = None
    ) -> None:
        super().__init__(upstream, config=config)
        self.tree = tree

    def start(self, timeout: float = 15.0) -> None:
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - handed to the child
        path = os.pathsep.join(filter(None, (str(self.tree), os.environ.get("PYTHONPATH"))))
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scalple", "serve", "--config", str(self.config_path)],
            cwd=self.tree,
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
                f"scalple ({self.tree}) did not start (exit {self.process.returncode}):\n"
                f"{self.stderr()}"
            )


def ensure_jsonl_tree(tree: Path) -> str:
    """A git worktree of the JSON-lines commit at ``tree``, its Cython extension built.

    Created when missing (``git worktree add --detach``); refused when it holds another
    commit.  The extension is built in place with this Python, so its ABI matches.
    Returns the commit's short hash.
    """
    repo = Path(scalple.__file__).resolve().parent.parent

    def git(*argv: str, cwd: Path = repo) -> str:
        return subprocess.run(
            ["git", "-C", str(cwd), *argv], capture_output=True, text=True, check=True
        ).stdout.strip()

    expected = git("rev-parse", f"{JSONL_COMMIT}^{{commit}}")
    if not (tree / ".git").exists():
        progress(f"git worktree add --detach {tree} {JSONL_COMMIT}")
        git("worktree", "add", "--detach", str(tree), expected)
    head = git("rev-parse", "HEAD", cwd=tree)
    if head != expected:
        raise RuntimeError(
            f"{tree} is at {head[:7]}, not {JSONL_COMMIT}: pass another --jsonl-tree, or "
            f"remove it (git worktree remove {tree})"
        )
    source = tree / "scalple" / "_wire.pyx"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    built = tree / "scalple" / f"_wire{suffix}"
    if not built.exists() or built.stat().st_mtime < source.stat().st_mtime:
        progress(f"building {JSONL_COMMIT}'s Cython extension in {tree}...")
        build = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=False,
        )
        if build.returncode != 0 or not built.exists():
            raise RuntimeError(f"building {built} failed:\n{build.stderr.strip()[-1500:]}")
    return head[:7]


def start_environment(stack: contextlib.ExitStack, args: argparse.Namespace) -> Environment:
    """PostgreSQL, pgbench -i, three PgBouncers (transaction, session, one in front of the
    transaction pool for calibration) and four Scalple proxies; with ``--store`` only
    PostgreSQL and the three audit-log proxies (see ``start_store_proxies``).

    Every process is registered for cleanup *before* it is started, so a failure
    half-way leaves nothing behind.  TLS is off everywhere so that no target pays for
    encryption the others skip; fsync is off because the workload is read-only anyway.
    """
    bindir = pg_bindir()
    progress("starting PostgreSQL (fsync=off, TLS off, shared_buffers=256MB)...")
    cluster = PostgresCluster(
        tls=False, pgaudit=False, fsync=False, extra_conf={"shared_buffers": "256MB"}
    )
    stack.callback(cluster.cleanup)
    cluster.start()
    progress(f"    PostgreSQL on port {cluster.port}, {cluster.base_dir}")

    progress(f"pgbench -i -s {args.scale} ...")
    init = subprocess.run(
        [
            *(str(bindir / "pgbench"), "-i", "-s", str(args.scale), "-q"),
            *("-h", cluster.host, "-p", str(cluster.port), "-U", USER, DATABASE),
        ],
        env=client_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if init.returncode != 0:
        raise RuntimeError(f"pgbench -i failed (exit {init.returncode}):\n{init.stderr.strip()}")
    if args.store:
        return start_store_proxies(stack, args, cluster)
    if args.subjects:
        return start_subject_proxies(stack, args, cluster)

    progress(f"starting PgBouncer (transaction and session pools, pool size {POOL_SIZE})...")
    bouncer = PgBouncer(cluster, pool_mode="transaction", default_pool_size=POOL_SIZE)
    stack.callback(bouncer.cleanup)
    bouncer.start()
    # pgbench -M prepared cannot work through a transaction pool of PgBouncer 1.18 (its
    # named statements live on one server connection; the next transaction may get
    # another).  A session pool keeps each client on one server connection, so prepared
    # runs get an honest, separately labelled PgBouncer reference there.
    session_bouncer = PgBouncer(cluster, pool_mode="session", default_pool_size=POOL_SIZE)
    stack.callback(session_bouncer.cleanup)
    session_bouncer.start()
    # Calibration: a second PgBouncer in front of the first costs one more hop exactly
    # as cheap as PgBouncer itself, which shows what *any* extra hop can reach on this
    # machine (Scalple->PgBouncer is also two hops).
    front_bouncer = PgBouncer(
        cast(PostgresCluster, _BouncerUpstream(bouncer.host, bouncer.port, cluster.roles)),
        pool_mode="transaction",
        default_pool_size=POOL_SIZE,
    )
    stack.callback(front_bouncer.cleanup)
    front_bouncer.start()
    progress(
        f"    PgBouncer transaction pool on port {bouncer.port} (pid {bouncer.pid()}), "
        f"session pool on port {session_bouncer.port} (pid {session_bouncer.pid()}), "
        f"PgBouncer->PgBouncer on port {front_bouncer.port} (pid {front_bouncer.pid()})"
    )

    progress("starting Scalple proxies (audit log on)...")
    proxy_config = scalple_config(stack)
    for table, values in args.scalple_set.items():
        proxy_config.setdefault(table, {}).update(values)
    proxies: dict[str, ScalpleServer] = {}
    # The relay-only proxy writes records without statement analysis: the
    # same run then shows what analysis costs (issue 3's 5% target).
    relay_only = {
        **proxy_config,
        "analysis": {**proxy_config.get("analysis", {}), "enabled": False},
    }
    for key, upstream, config in (
        ("scalple_pgb", bouncer, proxy_config),
        ("scalple_pgb_session", session_bouncer, proxy_config),
        ("scalple_pg", cluster, proxy_config),
        ("scalple_pgb_relay", bouncer, relay_only),
    ):
        proxy = ScalpleServer(f"{upstream.host}:{upstream.port}", config=config)
        stack.callback(proxy.cleanup)
        proxy.start()
        proxies[key] = proxy
        assert proxy.process is not None
        progress(
            f"    Scalple on port {proxy.port} (pid {proxy.process.pid}) -> {upstream.port}, "
            f"audit log in {proxy.log_dir}"
        )

    prepared_16 = frozenset({"c16_prepared"})
    targets = [
        Target("pg", "PostgreSQL", cluster.host, cluster.port, "PG", None),
        Target(
            "pgb",
            "PgBouncer",
            bouncer.host,
            bouncer.port,
            "PgB",
            "pg",
            may_fail=prepared_16,
            proxy_pid=bouncer.pid,
        ),
        Target(
            "scalple_pgb",
            "Scalple->PgBouncer",
            proxies["scalple_pgb"].host,
            proxies["scalple_pgb"].port,
            "S->PgB",
            "pgb",
            proxies["scalple_pgb"],
            may_fail=prepared_16,
            proxy_pid=_pid_of(proxies["scalple_pgb"]),
        ),
        Target(
            "pgb_pgb",
            "PgBouncer->PgBouncer",
            front_bouncer.host,
            front_bouncer.port,
            "PgB2",
            "pgb",
            proxy_pid=front_bouncer.pid,
        ),
        Target(
            "pgb_session",
            "PgBouncer[session]",
            session_bouncer.host,
            session_bouncer.port,
            "PgB[s]",
            "pg",
            proxy_pid=session_bouncer.pid,
        ),
        Target(
            "scalple_pgb_session",
            "Scalple->PgBouncer[session]",
            proxies["scalple_pgb_session"].host,
            proxies["scalple_pgb_session"].port,
            "S->PgB[s]",
            "pgb_session",
            proxies["scalple_pgb_session"],
            proxy_pid=_pid_of(proxies["scalple_pgb_session"]),
        ),
        Target(
            "scalple_pgb_relay",
            "Scalple->PgB, no analysis",
            proxies["scalple_pgb_relay"].host,
            proxies["scalple_pgb_relay"].port,
            "S->PgB[r]",
            "pgb",
            proxies["scalple_pgb_relay"],
            proxy_pid=_pid_of(proxies["scalple_pgb_relay"]),
        ),
        Target(
            "scalple_pg",
            "Scalple->PostgreSQL",
            proxies["scalple_pg"].host,
            proxies["scalple_pg"].port,
            "S->PG",
            "pgb",
            proxies["scalple_pg"],
            proxy_pid=_pid_of(proxies["scalple_pg"]),
        ),
    ]
    counters: dict[str, AuditCounter] = {
        t.key: StoreCounter(t.proxy.log_dir) for t in targets if t.proxy is not None
    }
    return Environment(
        cluster, bouncer, session_bouncer, front_bouncer, {t.key: t for t in targets}, counters
    )


def start_store_proxies(
    stack: contextlib.ExitStack, args: argparse.Namespace, cluster: PostgresCluster
) -> Environment:
    """Three Scalple proxies straight to PostgreSQL (so PgBouncer's own limits mask
    nothing), the same but for the audit log: the JSON-lines sink of commit f736e1d
    (from a git worktree), the store with ``durability = "async"``, the store with
    ``durability = "strict"``.  All logs are on the same file system (the temporary
    directory); PostgreSQL keeps fsync=off, so only the audit logs fsync.
    """
    commit = ensure_jsonl_tree(args.jsonl_tree)
    progress("starting Scalple proxies -> PostgreSQL (JSON-lines sink, store async, strict)...")
    proxy_config = scalple_config(stack)
    for table, values in args.scalple_set.items():
        proxy_config.setdefault(table, {}).update(values)

    def with_durability(mode: str) -> dict[str, dict[str, object]]:
        return {**proxy_config, "log": {**proxy_config.get("log", {}), "durability": mode}}

    upstream = f"{cluster.host}:{cluster.port}"
    proxies: dict[str, ScalpleServer] = {}
    for key, proxy in (
        ("jsonl", TreeScalpleServer(args.jsonl_tree, upstream, config=proxy_config)),
        ("store_async", ScalpleServer(upstream, config=with_durability("async"))),
        ("store_strict", ScalpleServer(upstream, config=with_durability("strict"))),
    ):
        stack.callback(proxy.cleanup)
        proxy.start()
        proxies[key] = proxy
        assert proxy.process is not None
        progress(
            f"    {key}: Scalple on port {proxy.port} (pid {proxy.process.pid}) -> "
            f"{cluster.port}, audit log in {proxy.log_dir}"
        )
    labels = {
        "jsonl": (f"S->PG, JSON-lines ({commit})", "jsonl", None),
        "store_async": ("S->PG, store async", "async", "jsonl"),
        "store_strict": ("S->PG, store strict", "strict", "store_async"),
    }
    targets = {
        key: Target(
            key,
            label,
            proxies[key].host,
            proxies[key].port,
            short,
            reference,
            proxies[key],
            proxy_pid=_pid_of(proxies[key]),
        )
        for key, (label, short, reference) in labels.items()
    }
    counters: dict[str, AuditCounter] = {
        "jsonl": JsonlCounter(proxies["jsonl"].log_dir / JSONL_FILE),
        "store_async": StoreCounter(proxies["store_async"].log_dir),
        "store_strict": StoreCounter(proxies["store_strict"].log_dir),
    }
    return Environment(cluster, None, None, None, targets, counters, store=True)


def start_subject_proxies(
    stack: contextlib.ExitStack, args: argparse.Namespace, cluster: PostgresCluster
) -> Environment:
    """Two Scalple proxies straight to PostgreSQL, both with the catalog: "plain" with the
    default configuration, "subjects" with ``aid`` a subject column, every literal
    masked and a masking key (48 random bytes in a 0600 file of a private directory).

    The audit counters of both wait up to 300 s for a run's records, and up to 150 s
    for the next one: a 10,000-row result costs the subjects proxy's audit worker far
    more than the relay, so its records come long after pgbench ended (the lag is
    reported).  They come in one burst: the proxy hands the worker everything queued
    meanwhile as one batch, which the worker builds in full (tens of seconds) before it
    writes any of it.  Waiting keeps that work in the run that caused it, instead of
    charging it to (and slowing down) whichever run comes next.
    """
    progress("starting Scalple proxies -> PostgreSQL (plain, subjects)...")
    proxy_config = scalple_config(stack)
    for table, values in args.scalple_set.items():
        proxy_config.setdefault(table, {}).update(values)
    secret_dir = Path(tempfile.mkdtemp(prefix="scalple-bench-key-"))
    stack.callback(shutil.rmtree, secret_dir, True)
    key_file = secret_dir / "masking-key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(48))
    subjects_config: dict[str, dict[str, object]] = {
        **proxy_config,
        "subjects": {SUBJECT_COLUMN: SUBJECT_KIND},
        "log": {**proxy_config.get("log", {}), "literals": "all"},
        "masking": {**proxy_config.get("masking", {}), "key_file": str(key_file)},
    }
    upstream = f"{cluster.host}:{cluster.port}"
    proxies: dict[str, ScalpleServer] = {}
    for key, config in (("plain", proxy_config), ("subjects", subjects_config)):
        proxy = ScalpleServer(upstream, config=config)
        stack.callback(proxy.cleanup)
        proxy.start()
        proxies[key] = proxy
        assert proxy.process is not None
        progress(
            f"    {key}: Scalple on port {proxy.port} (pid {proxy.process.pid}) -> "
            f"{cluster.port}, audit log in {proxy.log_dir}"
        )
    labels = {
        "plain": ("S->PG, default config", "plain", None),
        "subjects": ("S->PG, subjects + literals", "subjects", "plain"),
    }
    targets = {
        key: Target(
            key,
            label,
            proxies[key].host,
            proxies[key].port,
            short,
            reference,
            proxies[key],
            proxy_pid=_pid_of(proxies[key]),
        )
        for key, (label, short, reference) in labels.items()
    }
    counters: dict[str, AuditCounter] = {}
    for key in targets:
        counters[key] = StoreCounter(proxies[key].log_dir)
        counters[key].timeout = 300.0
        counters[key].quiet = 150.0
    return Environment(cluster, None, None, None, targets, counters, subjects=True)


def scalple_config(stack: contextlib.ExitStack) -> dict[str, dict[str, object]]:
    """Scalple's configuration: the defaults, plus catalog credentials when supported.

    Statement analysis needs the upstream catalog; without a password the proxy would
    run with "catalog unavailable" and skip part of the per-record work that
    production does.  Older configurations have no ``[catalog]`` table: then nothing.
    """
    from scalple import config as scalple_config_module

    catalog = getattr(scalple_config_module, "CatalogConfig", None)
    if catalog is None or "password_file" not in getattr(catalog, "__struct_fields__", ()):
        return {}
    secret_dir = Path(tempfile.mkdtemp(prefix="scalple-bench-secret-"))
    stack.callback(shutil.rmtree, secret_dir, True)
    password_file = secret_dir / "catalog-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(PASSWORD + "\n")
    return {"catalog": {"password_file": str(password_file)}}


def _pid_of(proxy: ScalpleServer) -> Callable[[], int]:
    def pid() -> int:
        if proxy.process is None:
            raise RuntimeError("the Scalple process is not running")
        return proxy.process.pid

    return pid


def targets_for(workload: Workload, store: bool = False, subjects: bool = False) -> list[str]:
    """Session-pool targets only where the transaction pool cannot serve the workload; the
    PgBouncer->PgBouncer calibration only for the 16-client simple run (time budget).
    With ``--store``: the three audit logs, the same for every workload; with
    ``--subjects``: the plain and the subjects proxy."""
    if store:
        return ["jsonl", "store_async", "store_strict"]
    if subjects:
        return ["plain", "subjects"]
    if workload.key == "c16_prepared":
        return ["pg", "pgb", "scalple_pgb", "pgb_session", "scalple_pgb_session", "scalple_pg"]
    if workload.key == "c16_simple":
        return ["pg", "pgb", "scalple_pgb", "scalple_pgb_relay", "pgb_pgb", "scalple_pg"]
    return ["pg", "pgb", "scalple_pgb", "scalple_pg"]


def warm_up(env: Environment, pgbench: Path, log_dir: Path) -> None:
    """A short unmeasured simple-protocol run per target.

    Fills PgBouncer's pools, pages the table into shared buffers and lets each Scalple
    process reach its steady state, so round 1 is not penalised for being first.
    Simple protocol only: prepared statements left behind on transaction-pool server
    connections would change what the measured prepared runs see.
    """
    warm = Workload("warmup", "warm-up", 16, 2, "simple")
    for target in env.targets.values():
        progress(f"warm-up (2 s, unmeasured): {target.label}")
        counter = env.counters.get(target.key)
        run = run_pgbench(
            pgbench, warm, target, duration=2, log_dir=log_dir, round_no=0, audit=counter
        )
        if not run.ok:
            raise RuntimeError(f"warm-up against {target.label} failed: {run.error}")
        if isinstance(counter, JsonlCounter) and not counter.path.exists():
            # f736e1d writes audit.jsonl; today's tree never does: this is the proof
            # that the proxy really ran the worktree's code.
            raise RuntimeError(f"{target.label} wrote no {counter.path}: not the JSON-lines sink")
        if counter is not None:  # the warm-up does not count towards the audit check
            counter.total = counter.total_transactions = 0
            counter.run_seconds = 0.0


# --------------------------------------------------------------------------- main loop


def measure(env: Environment, pgbench: Path, args: argparse.Namespace, workdir: Path) -> list[Run]:
    """Round after round, every workload against every target in turn.

    Interleaving (rather than all rounds of one target, then the next) spreads slow
    phases of a shared machine evenly over the targets.  A pair marked ``may_fail`` that
    failed is not retried: it fails for a structural reason, and retrying only burns time.
    With ``--subjects`` the two proxies also swap places every other round, so that
    neither always runs right after the other.
    """
    workloads = [WORKLOADS[k] for k in args.workloads]

    def order(round_no: int, workload: Workload) -> list[str]:
        keys = targets_for(workload, env.store, env.subjects)
        return keys[::-1] if env.subjects and round_no % 2 == 0 else keys

    plan = [
        (r, w, env.targets[t])
        for r in range(1, args.rounds + 1)
        for w in workloads
        for t in order(r, w)
    ]
    runs: list[Run] = []
    skip: set[tuple[str, str]] = set()
    dead: dict[str, str] = {}
    started = time.monotonic()
    done = 0
    for index, (round_no, workload, target) in enumerate(plan, 1):
        if (workload.key, target.key) in skip:
            continue
        remaining = sum(1 for (_, w, t) in plan[index - 1 :] if (w.key, t.key) not in skip)
        total = done + remaining
        eta = ""
        if done:
            eta = f", ETA {fmt_duration((time.monotonic() - started) / done * remaining)}"
        progress(
            f"[{done + 1}/{total}] round {round_no}/{args.rounds} {workload.label:<15} "
            f"-> {target.label}{eta}"
        )
        if target.key in dead:
            run = Run(round_no, workload.key, target.key, False, 0.0, error=dead[target.key])
        else:
            run = run_pgbench(
                pgbench,
                workload,
                target,
                duration=args.duration,
                log_dir=workdir / f"run{index}",
                round_no=round_no,
                audit=env.counters.get(target.key),
                scale=args.scale,
                settle=60.0 if env.subjects else 0.0,
            )
            proxy = target.proxy
            if proxy is not None and (proxy.process is None or proxy.process.poll() is not None):
                tail = proxy.stderr().strip()[-1500:]
                dead[target.key] = f"the Scalple process exited; its stderr:\n{tail}"
                run.ok = False
                run.error = (run.error + "\n" if run.error else "") + dead[target.key]
        done += 1
        runs.append(run)
        if run.ok:
            progress(
                f"    tps {_num(run.tps, ',.0f')}  mean {_num(run.mean_ms, '.3f')} ms"
                f"  p99 {_num(run.p99_ms, '.3f')} ms"
                + (
                    f"  audit records {run.audit_records:,} (+{run.audit_lag_s:.2f} s)"
                    if run.audit_records is not None and run.audit_lag_s is not None
                    else ""
                )
                + (f"  [warning: {'; '.join(run.warnings)}]" if run.warnings else "")
            )
        else:
            progress(f"    FAILED: {run.error}")
            if (workload.key in target.may_fail) and round_no < args.rounds:
                progress("    (expected for this target; not retried in later rounds)")
                skip.add((workload.key, target.key))
    progress(f"measurements done in {fmt_duration(time.monotonic() - started)}")
    return runs


# --------------------------------------------------------------------------- summary


def summarize(env: Environment, runs: list[Run], args: argparse.Namespace) -> list[Row]:
    """Medians over rounds; ratios are medians of same-round ratios (paired, noise-robust)."""
    rows: list[Row] = []
    by_pair: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_pair.setdefault((run.workload, run.target), []).append(run)
    for wkey in args.workloads:
        for tkey in targets_for(WORKLOADS[wkey], env.store, env.subjects):
            pair_runs = by_pair.get((wkey, tkey), [])
            if not pair_runs:
                continue
            ok = [r for r in pair_runs if r.ok]
            target = env.targets[tkey]
            reference = target.reference
            if tkey == "scalple_pg" and not [r for r in by_pair.get((wkey, "pgb"), []) if r.ok]:
                reference = "pgb_session"  # the transaction pool cannot run this workload
            ratio = None
            if reference is not None and ok:
                ref_by_round = {
                    r.round: r.tps for r in by_pair.get((wkey, reference), []) if r.ok and r.tps
                }
                paired = [
                    r.tps / ref_by_round[r.round]
                    for r in ok
                    if r.tps is not None and r.round in ref_by_round
                ]
                ratio = statistics.median(paired) if paired else None
            tps = [r.tps for r in ok if r.tps is not None]
            median_tps = statistics.median(tps) if tps else None
            errors = sorted({r.error for r in pair_runs if r.error})
            warnings = sorted({w for r in pair_runs for w in r.warnings})
            rows.append(
                Row(
                    workload=wkey,
                    target=tkey,
                    runs_ok=len(ok),
                    runs=len(pair_runs),
                    tps_median=median_tps,
                    tps_spread_pct=(100 * (max(tps) - min(tps)) / median_tps)
                    if median_tps and len(tps) > 1
                    else None,
                    mean_ms=_median([r.mean_ms for r in ok]),
                    p99_ms=_median([r.p99_ms for r in ok]),
                    proxy_cpu_us=_median([r.proxy_cpu_us_per_tx for r in ok]),
                    ratio=ratio,
                    reference=reference if ratio is not None else None,
                    error="\n".join(errors) or None,
                    warnings=warnings,
                    relay_cpu_us=_median([r.relay_cpu_us_per_tx for r in ok]),
                )
            )
    return rows


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def checks(rows: list[Row]) -> list[Check]:
    """The issue's targets.  Prepared runs are checked against whichever pool can run them."""
    index = {(r.workload, r.target): r for r in rows}
    out: list[Check] = []

    def add(name: str, wkey: str, tkey: str, ref: str, threshold: float, note: str = "") -> None:
        row = index.get((wkey, tkey))
        if row is None:
            return
        ref_row = index.get((wkey, ref))
        if ref_row is None or ref_row.runs_ok == 0:
            status, why = "N/A", f"reference {ref} has no successful run"
        elif row.ratio is None:
            status, why = "MISS", "Scalple has no successful run"
        else:
            status, why = ("PASS" if row.ratio >= threshold else "MISS"), ""
        out.append(
            Check(
                name,
                wkey,
                tkey,
                ref,
                threshold,
                row.ratio,
                status,
                "; ".join(filter(None, (note, why))),
            )
        )

    add("Scalple->PgBouncer >= 0.75x PgBouncer", "c16_simple", "scalple_pgb", "pgb", 0.75)
    full = index.get(("c16_simple", "scalple_pgb"))
    relay = index.get(("c16_simple", "scalple_pgb_relay"))
    if full is not None and relay is not None:
        # Issue 3: full records within 5% of records without analysis, same run.
        ratio = full.tps_median / relay.tps_median if full.tps_median and relay.tps_median else None
        status = "N/A" if ratio is None else ("PASS" if ratio >= 0.95 else "MISS")
        out.append(
            Check(
                "records with analysis >= 0.95x records without",
                "c16_simple",
                "scalple_pgb",
                "scalple_pgb_relay",
                0.95,
                ratio,
                status,
                "ratio of the median TPS of the two proxies in this run",
            )
        )
    add("Scalple->PgBouncer >= 0.85x PgBouncer", "c16_prepared", "scalple_pgb", "pgb", 0.85)
    add(
        "Scalple->PgBouncer >= 0.85x PgBouncer",
        "c16_prepared",
        "scalple_pgb_session",
        "pgb_session",
        0.85,
        "session pool: the transaction pool cannot run pgbench -M prepared",
    )
    for wkey in WORKLOADS:
        row = index.get((wkey, "scalple_pg"))
        if row is None:
            continue
        ref = row.reference or "pgb"
        note = (
            "vs the session pool: the transaction pool cannot run it"
            if ref == "pgb_session"
            else ""
        )
        add("Scalple->PostgreSQL >= 0.95x PgBouncer", wkey, "scalple_pg", ref, 0.95, note)
    for wkey in WORKLOADS:  # --store: the store's issue; strict has no target, only figures
        add("store async >= 0.95x JSON-lines sink", wkey, "store_async", "jsonl", 0.95)
    for wkey in WORKLOADS:  # --subjects: within 10% of the same run without subjects
        add(
            f"subjects >= {SUBJECTS_TARGET:.2f}x default config",
            wkey,
            "subjects",
            "plain",
            SUBJECTS_TARGET,
        )
    return out


def store_summary(rows: list[Row]) -> list[dict[str, Any]]:
    """Per workload of a ``--store`` run: the two ratios and each log's latency."""
    index = {(r.workload, r.target): r for r in rows}
    out = []
    for wkey in WORKLOADS:
        jsonl, store_async, strict = (
            index.get((wkey, key)) for key in ("jsonl", "store_async", "store_strict")
        )
        if jsonl is None or store_async is None or strict is None:
            continue
        out.append(
            {
                "workload": wkey,
                "async_vs_jsonl": store_async.ratio,
                "strict_vs_async": strict.ratio,
                "tps": {r.target: r.tps_median for r in (jsonl, store_async, strict)},
                "mean_ms": {r.target: r.mean_ms for r in (jsonl, store_async, strict)},
                "p99_ms": {r.target: r.p99_ms for r in (jsonl, store_async, strict)},
                "proxy_cpu_us": {r.target: r.proxy_cpu_us for r in (jsonl, store_async, strict)},
            }
        )
    return out


def subjects_summary(rows: list[Row]) -> list[dict[str, Any]]:
    """Per workload of a ``--subjects`` run: the ratio and each proxy's CPU per transaction
    (whole, relay process alone, and the rest: its audit worker)."""
    index = {(r.workload, r.target): r for r in rows}
    out = []
    for wkey in WORKLOADS:
        plain, subj = index.get((wkey, "plain")), index.get((wkey, "subjects"))
        if plain is None or subj is None:
            continue
        cpu: dict[str, dict[str, float | None]] = {}
        for row in (plain, subj):
            worker = None
            if row.proxy_cpu_us is not None and row.relay_cpu_us is not None:
                worker = row.proxy_cpu_us - row.relay_cpu_us
            cpu[row.target] = {
                "total": row.proxy_cpu_us,
                "relay": row.relay_cpu_us,
                "worker": worker,
            }
        out.append(
            {
                "workload": wkey,
                "ratio": subj.ratio,
                "tps": {r.target: r.tps_median for r in (plain, subj)},
                "mean_ms": {r.target: r.mean_ms for r in (plain, subj)},
                "cpu_us": cpu,
            }
        )
    return out


_RAW_NUMBER = re.compile(r"(?<![\w$])[0-9]+(?!\w)")
"""A number as a word of its own: what an unmasked ``aid = 12345`` leaves in a query
(a tag's hex digits are inside the word ``sub_...``, masked constants are ``'***'``
and a ``$1`` placeholder is no constant)."""


def _record_group(record: dict[str, Any]) -> str:
    query = record.get("query") or ""
    if "BETWEEN" in query:
        return "c1_rows"
    if "pgbench_accounts" in query:
        return "extended -S" if record.get("protocol") == "extended" else "simple -S"
    return "other"


def subjects_check(env: Environment) -> dict[str, Any]:
    """Read both proxies' audit logs back: does the subjects proxy really mask and tag?

    Per group of statements (simple -S, extended -S, the 10,000-row SELECT, other):
    records, records with subjects, records whose query holds no raw number and whose
    parameters are all tags or ``***``, and for the row SELECT the records whose
    ``subjects_count`` covers its rows (values read from the result by the relay).
    One sample record per group for the subjects proxy.  Every record is decoded, so
    this takes a few seconds per million records.
    """
    from scalple.query.reader import stored_records

    out: dict[str, Any] = {}
    for key in ("plain", "subjects"):
        target = env.targets[key]
        assert target.proxy is not None
        groups: dict[str, dict[str, Any]] = {}
        started = time.monotonic()
        for directory in layout.origin_dirs(target.proxy.log_dir):
            for stored in stored_records(directory):
                record = stored.record
                if record.get("kind") != "statement":
                    continue
                name = _record_group(record)
                group = groups.setdefault(
                    name,
                    {"records": 0, "with_subjects": 0, "masked": 0, "rows_read": 0, "sample": None},
                )
                group["records"] += 1
                subjects = record.get("subjects") or []
                if subjects:
                    group["with_subjects"] += 1
                params = record.get("params") or []
                if not _RAW_NUMBER.search(record.get("query") or "") and all(
                    p is None or p == "***" or p.startswith("sub_") for p in params
                ):
                    group["masked"] += 1
                # Rows were read when every row's subject counted, or the
                # bound ([masking] subjects_limit) was reached.
                if (record.get("subjects_count") or 0) >= RANGE_ROWS or (
                    record.get("subjects_truncated") and subjects
                ):
                    group["rows_read"] += 1
                if group["sample"] is None and (subjects or key == "plain"):
                    sample: dict[str, Any] = {
                        field: record.get(field)
                        for field in (
                            "protocol",
                            "query",
                            "params",
                            "rows",
                            "subject_kinds",
                            "subjects_count",
                            "subjects_truncated",
                            "analysis_notes",
                        )
                    }
                    sample["subjects"] = subjects[:2] + (
                        [f"... {len(subjects) - 2} more"] if len(subjects) > 2 else []
                    )
                    group["sample"] = sample
        out[key] = {"groups": groups, "read_seconds": time.monotonic() - started}
    problems = []
    for name, group in out["subjects"]["groups"].items():
        if name == "other":
            continue
        if group["with_subjects"] < group["records"]:
            problems.append(
                f"{name}: {group['records'] - group['with_subjects']:,} of {group['records']:,} "
                "subjects-proxy records name no subject"
            )
        if group["masked"] < group["records"]:
            problems.append(
                f"{name}: {group['records'] - group['masked']:,} of {group['records']:,} "
                "subjects-proxy records keep a raw constant or parameter"
            )
        if name == "c1_rows" and group["rows_read"] < group["records"]:
            problems.append(
                f"{name}: {group['records'] - group['rows_read']:,} of {group['records']:,} "
                f"records count fewer than {RANGE_ROWS:,} subjects: the relay did not read "
                "the rows"
            )
    if not any(n != "other" for n in out["subjects"]["groups"]):
        problems.append("the subjects proxy wrote no pgbench statement record at all")
    for name, group in out["plain"]["groups"].items():
        if group["with_subjects"]:
            problems.append(f"{name}: the plain proxy's records name subjects")
    out["problems"] = problems
    return out


def audit_summary(env: Environment, runs: list[Run], duration: int) -> list[dict[str, Any]]:
    """Records written vs transactions pgbench completed, per proxy (events really on)."""
    out = []
    for key, counter in env.counters.items():
        proxy_runs = [r for r in runs if r.target == key and r.audit_records is not None]
        size = counter.size()
        out.append(
            {
                "target": key,
                "runs": len(proxy_runs),
                "statement_records": counter.total,
                "transactions": counter.total_transactions,
                "records_per_transaction": counter.total / counter.total_transactions
                if counter.total_transactions
                else None,
                "records_per_second": counter.total / counter.run_seconds
                if counter.run_seconds
                else None,
                "peak_records_per_second": max(
                    (r.audit_records / duration for r in proxy_runs if r.audit_records),
                    default=None,
                ),
                "max_lag_s": max((r.audit_lag_s or 0.0 for r in proxy_runs), default=None),
                "audit_log_bytes": size,
                # pgbench does not count statements in flight when -T ends or in aborted
                # clients, so records may slightly exceed transactions, never fall short.
                "complete": counter.total >= counter.total_transactions > 0,
            }
        )
    return out


# --------------------------------------------------------------------------- output


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.splitlines():
        while len(para) > width:
            cut = para.rfind(" ", 0, width)
            cut = cut if cut > width // 2 else width
            lines.append(para[:cut])
            para = para[cut:].lstrip()
        lines.append(para)
    return lines


def print_report(
    out: TextIO,
    env: Environment,
    info: dict[str, Any],
    args: argparse.Namespace,
    rows: list[Row],
    results: list[Check],
    audit: list[dict[str, Any]],
    subject_check: dict[str, Any] | None = None,
) -> None:
    """The human-readable report; every line fits in 100 columns."""
    lines: list[str] = []
    emit = lines.append
    labels = {k: t.label for k, t in env.targets.items()}
    shorts = {k: t.short for k, t in env.targets.items()}
    emit(f"pgbench comparison, {info['date']}")
    emit(f"machine: {info['nproc']} CPUs, {info['cpu']}, kernel {info['kernel']}")
    emit(
        f"load average (1 min) {info['load_start']:.2f} at start, {info['load_end']:.2f} at end "
        "(the machine is shared)"
    )
    emit(f"{info['postgresql']}, fsync=off")
    emit(f"{info['pgbouncer']}, Python {info['python']}, uvloop {info['uvloop']}")
    extra = ", ".join(
        f"{table}.{key}={json.dumps(value)}"
        for table, values in args.scalple_set.items()
        for key, value in values.items()
    )
    emit(f"scalple {info['scalple']}, audit log on" + (f", {extra}" if extra else ""))
    if env.store:
        emit(f"JSON-lines sink: scalple at {JSONL_COMMIT}, from the worktree {args.jsonl_tree}")
        emit(
            f"pgbench -n -S, scale {args.scale}, -T {args.duration} s, {args.rounds} rounds; "
            "every proxy straight to PostgreSQL"
        )
    elif env.subjects:
        emit(f'subjects proxy: [subjects] "{SUBJECT_COLUMN}" = "{SUBJECT_KIND}",')
        emit('                [log] literals = "all", [masking] key_file')
        emit(
            f"pgbench -n -S (c1 10k rows: -f, SELECT aid, bid, abalance ... BETWEEN :a AND "
            f":a + {RANGE_ROWS - 1}),"
        )
        emit(
            f"scale {args.scale}, -T {args.duration} s, {args.rounds} rounds; both proxies "
            "straight to PostgreSQL"
        )
    else:
        emit(
            f"pgbench -n -S, scale {args.scale}, -T {args.duration} s, {args.rounds} rounds; "
            f"PgBouncer pools of {POOL_SIZE}"
        )
    emit("")
    emit("TPS: median over rounds; spread: (max-min)/median; mean, p99: medians of per-run")
    emit("values from pgbench --log; us/tx: CPU (user+sys) of the proxy in front of the server")
    emit("(its process and child processes) per transaction; ratio: median of same-round TPS")
    emit("ratios vs the `vs` row.")
    if env.store:
        emit("S->PG = Scalple -> PostgreSQL; jsonl = its audit log as the JSON-lines file of")
        emit(f"{JSONL_COMMIT}; async, strict = the store with [log] durability = async, strict.")
    elif env.subjects:
        emit("S->PG = Scalple -> PostgreSQL; plain = the default configuration (catalog on);")
        emit("subjects = the same plus the subject column, every literal masked, a masking key.")
    else:
        emit("PG = PostgreSQL, PgB = PgBouncer, S = Scalple, [s] = PgBouncer session pool;")
        emit("PgBouncer->PgBouncer is a calibration: one more hop as cheap as PgBouncer itself.")
    emit("")
    emit(
        f"{'workload':<15} {'target':<27} {'TPS':>8} {'spread':>6} {'mean ms':>7} "
        f"{'p99 ms':>7} {'us/tx':>6} {'ratio':>5} vs"
    )
    emit("-" * 96)
    last = None
    for row in rows:
        if last is not None and row.workload != last:
            emit("")
        last = row.workload
        head = f"{WORKLOADS[row.workload].label:<15} {labels[row.target]:<27}"
        if row.runs_ok == 0:
            emit(f"{head} {'ERROR':>8}   (all {row.runs} run(s) failed)")
        else:
            spread = "-" if row.tps_spread_pct is None else f"{row.tps_spread_pct:.0f}%"
            runs = "" if row.runs_ok == row.runs else f" ({row.runs_ok}/{row.runs} ok)"
            vs = shorts[row.reference] if row.reference else ""
            emit(
                f"{head} {_num(row.tps_median, ',.0f'):>8} {spread:>6} "
                f"{_num(row.mean_ms, '.3f'):>7} {_num(row.p99_ms, '.3f'):>7} "
                f"{_num(row.proxy_cpu_us, '.1f'):>6} {_num(row.ratio, '.2f'):>5} {vs}{runs}"
            )
        if row.error:
            lines.extend(f"    ! {piece}" for piece in _wrap(row.error, 92)[:6])
        for warning in row.warnings[:2]:
            lines.extend(f"    ~ {piece}" for piece in _wrap("pgbench: " + warning, 92)[:2])
    emit("")
    emit("targets (from the issue); ratios as in the table:")
    for check in results:
        emit(
            f"  {check.status:<4} {check.name:<38} {WORKLOADS[check.workload].label:<15} "
            f"{shorts[check.target]:<9} {_num(check.ratio, '.2f'):>5} vs {shorts[check.reference]}"
        )
        lines.extend(f"         ({piece})" for piece in _wrap(check.note, 88) if check.note)
    if env.store:
        emit("")
        emit("store vs JSON-lines sink: medians of same-round TPS ratios (target: async/jsonl")
        emit(">= 0.95; strict has none), mean latency in ms of jsonl / async / strict:")
        for item in store_summary(rows):
            mean = item["mean_ms"]
            emit(
                f"  {WORKLOADS[item['workload']].label:<15} "
                f"async/jsonl {_num(item['async_vs_jsonl'], '.3f')}, "
                f"strict/async {_num(item['strict_vs_async'], '.3f')}; mean ms "
                f"{_num(mean['jsonl'], '.3f')} / {_num(mean['store_async'], '.3f')} / "
                f"{_num(mean['store_strict'], '.3f')}"
            )
    if env.subjects:
        emit("")
        emit(
            f"subjects vs plain: median of same-round TPS ratios (target >= {SUBJECTS_TARGET:.2f}),"
        )
        emit("CPU us per transaction as plain / subjects: total = relay + audit worker:")
        for item in subjects_summary(rows):
            cpu = item["cpu_us"]
            emit(
                f"  {WORKLOADS[item['workload']].label:<15} ratio {_num(item['ratio'], '.3f')}; "
                f"total {_num(cpu['plain']['total'], '.1f')} / "
                f"{_num(cpu['subjects']['total'], '.1f')}, relay "
                f"{_num(cpu['plain']['relay'], '.1f')} / {_num(cpu['subjects']['relay'], '.1f')}, "
                f"worker {_num(cpu['plain']['worker'], '.1f')} / "
                f"{_num(cpu['subjects']['worker'], '.1f')}"
            )
    emit("")
    emit("audit log check (Scalple must write a record for every statement; lag: the longest")
    emit("time after a run ended until its last record was in the log):")
    for item in audit:
        if not item["runs"]:
            continue
        status = "OK" if item["complete"] else "LOST"
        emit(
            f"  {status:<4} {shorts[item['target']]:<9} {item['statement_records']:>9,} rec"
            f" / {item['transactions']:>9,} tx = {_num(item['records_per_transaction'], '.4f')},"
            f" {_num(item['records_per_second'], ',.0f')}/s avg,"
            f" {_num(item['peak_records_per_second'], ',.0f')}/s max,"
            f" lag {_num(item['max_lag_s'], '.2f')} s"
        )
    if subject_check is not None:
        emit_subject_check(emit, subject_check)
    for line in lines:
        print(line.rstrip(), file=out)


def emit_subject_check(emit: Callable[[str], None], check: dict[str, Any]) -> None:
    """What the audit logs hold: the proof that the subjects proxy did its work."""
    emit("")
    emit("audit log content (read back after the runs; masked = no raw number in the query,")
    emit("every parameter a tag or ***; rows read = subjects_count >= the rows of the SELECT):")
    for key in ("plain", "subjects"):
        part = check[key]
        for name, group in sorted(part["groups"].items()):
            emit(
                f"  {key:<8} {name:<12} {group['records']:>9,} rec, with subjects "
                f"{group['with_subjects']:>9,}, masked {group['masked']:>9,}, rows read "
                f"{group['rows_read']:>6,}"
            )
        emit(f"  ({key}: read in {part['read_seconds']:.1f} s)")
    for name, group in sorted(check["subjects"]["groups"].items()):
        if group["sample"] is not None and name != "other":
            emit(f"  sample, subjects proxy, {name}:")
            for piece in _wrap(json.dumps(group["sample"]), 94):
                emit(f"    {piece}")
    if check["problems"]:
        emit("")
        emit("!" * 96)
        emit("!! THE SUBJECTS PROXY DID NOT DO WHAT IS MEASURED: the figures above do not measure")
        emit("!! subject extraction and masking as configured:")
        for problem in check["problems"]:
            emit(f"!!   {problem}")
        emit("!" * 96)
    else:
        emit("  OK: every pgbench record of the subjects proxy names its subject and is masked")


def print_profile(out: TextIO, profile: dict[str, Any]) -> None:
    print(file=out)
    if "error" in profile:
        print(f"profile: {profile['error']}", file=out)
        return
    print(
        f"py-spy --native --subprocesses, {profile['target']}, "
        f"{profile.get('workload', '-S c16 simple')} "
        f"({_num(profile['tps_under_profiler'], ',.0f')} tps under the profiler);",
        file=out,
    )
    print(f"collapsed stacks in {profile['file']}", file=out)
    for thread in profile["threads"]:
        print(
            f"  thread {thread['name']}: {thread['samples']} samples "
            f"({thread['active_pct']:.0f}% of the run's wall time); own time:",
            file=out,
        )
        for item in thread["own_time"]:
            print(f"    {item['pct']:5.1f}%  {item['function'][:88]}", file=out)


# --------------------------------------------------------------------------- profile


def profile_proxy(
    env: Environment, pgbench: Path, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Sample the Scalple->PgBouncer process (``--store``: the store-async one,
    ``--subjects``: the subjects one) with py-spy during an extra 16-client simple run
    (or, when ``--workloads`` leaves that out, a run of the first workload chosen).

    Not part of the measurement (py-spy steals CPU on a small machine); it tells where
    the relay spends its CPU.  ``--native`` so that time in uvloop/libuv and in system
    calls is not lumped into whichever Python frame called them; ``--subprocesses`` so
    that helper processes (the audit worker) are sampled too.
    """
    target = env.targets[
        "store_async" if env.store else "subjects" if env.subjects else "scalple_pgb"
    ]
    assert target.proxy is not None and target.proxy.process is not None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).is_file():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = Path(args.profile).resolve()
    rate = 200
    cmd = [
        spy, "record", "--pid", str(target.proxy.process.pid), "--duration", str(args.duration),
        "--rate", str(rate), "--format", "raw", "--threads", "--native", "--subprocesses",
        "-o", str(raw),
    ]  # fmt: skip
    workload = WORKLOADS["c16_simple" if "c16_simple" in args.workloads else args.workloads[0]]
    progress(
        f"profiling {target.label} with py-spy during a {args.duration} s {workload.label} run"
    )
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # py-spy attaches
        run = run_pgbench(
            pgbench, workload, target, duration=args.duration,
            log_dir=workdir / "profile", round_no=0, scale=args.scale,
        )  # fmt: skip
        _, spy_err = spy_proc.communicate(timeout=args.duration + 60)
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if spy_proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed (exit {spy_proc.returncode}): {spy_err.strip()[-500:]}"}
    return {
        "file": str(raw),
        "target": target.label,
        "workload": workload.label,
        "tps_under_profiler": run.tps,
        "threads": top_functions(raw, rate * args.duration, target.proxy.process.pid),
    }


_PROCESS_FRAMES = re.compile(r'(?:process \d+:"[^"]*";)+')


def _frame_name(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def top_functions(
    raw: Path, expected_samples: int, main_pid: int = 0, limit: int = 12
) -> list[dict[str, Any]]:
    """Per thread, the leaves with the most samples (own time), from py-spy's raw output.

    A native leaf (a system call, a libuv function) is shown with the innermost Python
    frame above it, e.g. ``write (libc.so.6) <- ClientLink.data_received``: that is the
    question "which relay step pays for this system call".  py-spy does not sample a
    thread while it sleeps, so samples / expected samples is roughly its CPU share.
    """
    per_thread: dict[str, dict[str, int]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        owner = ""
        if processes := _PROCESS_FRAMES.match(stack):
            # --subprocesses: 'process PID:"command line"' for the proxy and each
            # descendant down to the sampled one (command lines may contain ';')
            pid = re.findall(r'process (\d+):"', processes.group(0))[-1]
            owner = "proxy " if pid == str(main_pid) else f"child {pid} "
            stack = stack[processes.end() :]
        frames = stack.split(";")
        frames[0] = owner + frames[0]
        leaf = _frame_name(frames[-1])
        python = [f for f in frames[1:] if ".py:" in f]
        if python and ".py" not in leaf:
            leaf = f"{leaf} <- {_frame_name(python[-1]).split(' (')[0]}"
        own = per_thread.setdefault(frames[0], {})
        own[leaf] = own.get(leaf, 0) + int(count_text)
    out = []
    for name, own in per_thread.items():
        total = sum(own.values())
        ranked = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:limit]
        out.append(
            {
                "name": re.sub(r"thread \(\d+\): ", "", name),
                "samples": total,
                "active_pct": 100 * total / expected_samples if expected_samples else 0.0,
                "own_time": [
                    {"function": f, "samples": n, "pct": 100 * n / total} for f, n in ranked
                ],
            }
        )
    return sorted(out, key=lambda t: -int(t["samples"]))


# --------------------------------------------------------------------------- main


def _setting(text: str) -> tuple[str, str, object]:
    """``TABLE.KEY=VALUE`` with VALUE as TOML would read it (bool, int, float, else text)."""
    name, sep, raw = text.partition("=")
    table, dot, key = name.strip().partition(".")
    if not sep or not dot or not table or not key:
        raise argparse.ArgumentTypeError(f"expected TABLE.KEY=VALUE, got {text!r}")
    value: object = raw
    if raw in ("true", "false"):
        value = raw == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
    return table, key, value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pgbench -S against PostgreSQL, PgBouncer and Scalple, interleaved.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (-T); 10")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets; 3")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor; 10")
    parser.add_argument(
        "--workloads",
        default=None,
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: "
        f"{','.join(DEFAULT_WORKLOADS)}; with --store {','.join(STORE_WORKLOADS)}; with "
        f"--subjects {','.join(SUBJECT_WORKLOADS)})",
    )
    parser.add_argument(
        "--store",
        action="store_true",
        help="compare audit logs instead: Scalple->PostgreSQL with the JSON-lines sink of "
        f"{JSONL_COMMIT}, the store in async and in strict durability",
    )
    parser.add_argument(
        "--subjects",
        action="store_true",
        help="compare PII masking and data subjects instead: Scalple->PostgreSQL with the "
        f'default configuration and with [subjects] "{SUBJECT_COLUMN}", [log] literals = '
        '"all" and a masking key',
    )
    parser.add_argument(
        "--jsonl-tree",
        type=Path,
        default=DEFAULT_JSONL_TREE,
        help=f"git worktree of {JSONL_COMMIT} for --store (created when missing; "
        f"default {DEFAULT_JSONL_TREE})",
    )
    parser.add_argument(
        "--scalple-set",
        metavar="TABLE.KEY=VALUE",
        type=_setting,
        action="append",
        default=[],
        help="extra Scalple configuration for every proxy, e.g. analysis.enabled=false "
        "(repeatable; shown in the report)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="after measuring, py-spy the Scalple->PgBouncer process (--store: store async, "
        "--subjects: subjects) during one extra 16-client simple run (or of the first of "
        "--workloads without it) and write its collapsed stacks to FILE",
    )
    args = parser.parse_args(argv)
    settings: dict[str, dict[str, object]] = {}
    for table, key, value in args.scalple_set:
        settings.setdefault(table, {})[key] = value
    args.scalple_set = settings
    if args.store and args.subjects:
        parser.error("--store and --subjects are separate comparisons: choose one")
    if args.workloads is None:
        args.workloads = ",".join(
            STORE_WORKLOADS
            if args.store
            else SUBJECT_WORKLOADS
            if args.subjects
            else DEFAULT_WORKLOADS
        )
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.jsonl_tree = args.jsonl_tree.resolve()
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.duration < 1 or args.rounds < 1 or args.scale < 1:
        parser.error("--duration, --rounds and --scale must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:  # respect nohup's SIG_IGN
            signal.signal(signum, _raise_interrupted)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    bindir = pg_bindir()
    pgbench = bindir / "pgbench"
    info = machine_info(bindir)
    info["load_start"] = load_average()
    runs_per_round = sum(
        len(targets_for(WORKLOADS[w], args.store, args.subjects)) for w in args.workloads
    )
    progress(
        f"{runs_per_round} runs per round x {args.rounds} rounds x {args.duration} s: about "
        f"{fmt_duration(runs_per_round * args.rounds * (args.duration + 0.4) + 40)}"
    )
    try:
        with contextlib.ExitStack() as stack:
            try:
                workdir = Path(tempfile.mkdtemp(prefix="scalple-bench-"))
                stack.callback(shutil.rmtree, workdir, True)
                env = start_environment(stack, args)
                warm_up(env, pgbench, workdir / "warmup")
                runs = measure(env, pgbench, args, workdir)
                info["load_end"] = load_average()
                rows = summarize(env, runs, args)
                results = checks(rows)
                audit = audit_summary(env, runs, args.duration)
                subject_check = None
                if env.subjects:
                    progress("reading both audit logs back (subjects, masked queries)...")
                    subject_check = subjects_check(env)
                profile = profile_proxy(env, pgbench, args, workdir) if args.profile else None
            finally:
                # The ExitStack now stops every process; a second Ctrl-C (or a SIGTERM)
                # must not interrupt that and leave servers running.
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)
                progress("stopping processes and removing temporary directories...")
    except (KeyboardInterrupt, Interrupted) as exc:
        progress(f"interrupted ({str(exc) or 'SIGINT'}); everything was stopped and removed")
        return 130
    except Exception as exc:
        progress(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    if args.json:
        document = {
            "machine": info,
            "settings": {
                "duration_s": args.duration,
                "rounds": args.rounds,
                "scale": args.scale,
                "pool_size": POOL_SIZE,
                "store": args.store,
                "subjects": {SUBJECT_COLUMN: SUBJECT_KIND} if args.subjects else None,
                "jsonl_tree": str(args.jsonl_tree) if args.store else None,
                "scalple_settings": args.scalple_set,
                "fsync": False,
                "workloads": {k: asdict(WORKLOADS[k]) for k in args.workloads},
                "targets": {k: t.label for k, t in env.targets.items()},
            },
            "rows": [asdict(r) for r in rows],
            "checks": [asdict(c) for c in results],
            "store": store_summary(rows) if env.store else None,
            "subjects": subjects_summary(rows) if env.subjects else None,
            "subjects_check": subject_check,
            "audit": audit,
            "runs": [asdict(r) for r in runs],
            "profile": profile,
        }
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        print_report(sys.stdout, env, info, args, rows, results, audit, subject_check)
        if profile is not None:
            print_profile(sys.stdout, profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
