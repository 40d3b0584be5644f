#!/usr/bin/env python3
"""The store's writer alone: encode + hash + append throughput, no proxy, no pipe.

What the audit worker does per record once enrichment is done, measured without
anything else in the way: ``StoreWriter.append`` (number, msgpack-encode, blake3 leaf
hash, frame, one ``pwrite`` per batch, extend the Merkle tree, post to the segment
index, set ``log_id``), with fsync as each durability mode does it, and the timed
work the worker does between batches (``tick``: checkpoints, seals).

The records are built in memory first (not timed) in the shape of real pgbench
records with statement analysis on: identity fields, a 60-100 character query,
its fingerprint, affected tables, columns accessed.  They are reused from run to
run: ``append`` overwrites ``seq`` and ``log_id``.

Every figure is measured in this one invocation, in interleaved rounds (every
configuration once per round, medians over rounds), so the ratios hold even on a
shared, noisy machine; the absolute rates do not travel to another machine.

Parts measured (each on its own, over the same records):

* ``encode``: ``encode_record`` (type byte + positional msgpack);
* ``leaf hash``: ``leaf_hash`` (blake3 of 0x00 + payload);
* ``frame + join``: length prefix + payload + hash, joined per batch;
* ``tree``: ``CompactRange.append`` per leaf;
* ``index + log_id``: ``IndexBuilder.add`` and the ``log_id`` string per record;
* ``write``: one ``pwrite`` per batch of the framed bytes (disk and, when present,
  /dev/shm, which separates the kernel's page-cache copy from the disk).

For comparison, the JSON-lines sink that the store replaced (commit f736e1d,
``RecordWriter._records``): msgspec JSON encode, blake3 of 0x00 + JSON (hex), set
``log_id``, encode again, join with newlines, one ``write``; it never fsynced.

Usage::

    python benchmarks/store_write.py [--records 200000] [--batches 64,256,1024]
                                     [--rounds 3] [--dir DIR] [--json]

The exit status is 0 whether the target is met or not: this is a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgspec

from scalple.config import LogConfig
from scalple.records import SessionRecord, StatementRecord, encode_record, rfc3339
from scalple.store.hashing import leaf_hash
from scalple.store.index import IndexBuilder
from scalple.store.keys import SigningKey
from scalple.store.merkle import CompactRange
from scalple.store.segment import frame
from scalple.store.writer import StoreWriter

TARGET = 200_000  # records/s on one core, async mode (the target)
SYNC_INTERVAL = 0.010  # [log] sync_interval default: async mode fsyncs this often
SHM = Path("/dev/shm")

Record = StatementRecord | SessionRecord


# --------------------------------------------------------------------------- records


_TABLES = ("public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers")
_USERS = [(f"u{n:04d}", f"user{n:04d}@example.com") for n in range(40)]


def _statement(rng: random.Random) -> tuple[str, str, str, list[str], dict[str, list[str]], str]:
    """(query, class, command, tables, columns, tag): pgbench-like, 60-100 characters."""
    aid = rng.randint(1, 1_000_000)
    pick = rng.random()
    if pick < 0.6:
        return (
            f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid} /* app=checkout */",
            "READ",
            "SELECT",
            [_TABLES[0]],
            {_TABLES[0]: ["abalance", "aid"]},
            "SELECT 1",
        )
    if pick < 0.8:
        delta = rng.randint(-5000, 5000)
        return (
            f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
            "WRITE",
            "UPDATE",
            [_TABLES[0]],
            {_TABLES[0]: ["abalance", "aid"]},
            "UPDATE 1",
        )
    if pick < 0.9:
        return (
            f"SELECT a.abalance, b.bbalance FROM pgbench_accounts a JOIN pgbench_branches b "
            f"USING (bid) WHERE a.aid = {aid}",
            "READ",
            "SELECT",
            [_TABLES[0], _TABLES[1]],
            {_TABLES[0]: ["abalance", "aid", "bid"], _TABLES[1]: ["bbalance", "bid"]},
            "SELECT 1",
        )
    tid = rng.randint(1, 100)
    return (
        f"UPDATE pgbench_tellers SET tbalance = tbalance + {rng.randint(-5000, 5000)} "
        f"WHERE tid = {tid};",
        "WRITE",
        "UPDATE",
        [_TABLES[2]],
        {_TABLES[2]: ["tbalance", "tid"]},
        "UPDATE 1",
    )


def build_records(count: int, seed: int = 1) -> list[Record]:
    """``count`` statement records as the enricher builds them for a pgbench run."""
    rng = random.Random(seed)
    fingerprints = {kind: f"{rng.getrandbits(64):016x}" for kind in ("s", "u", "j", "t")}
    start_ns = time.time_ns()
    out: list[Record] = []
    sessions = [(f"{rng.randint(100000, 999999)}-{n}", 40000 + n) for n in range(16)]
    for i in range(count):
        session_id, port = sessions[i % len(sessions)]
        user, email = _USERS[i % len(_USERS)]
        query, klass, command, tables, columns, tag = _statement(rng)
        out.append(
            StatementRecord(
                ts=rfc3339(start_ns + i * 40_000),
                session_user_id=user,
                session_email=email,
                identity_source="startup",
                identity_verified=False,
                db_role="app_user",
                database="app",
                application_name="pgbench",
                client_addr=f"127.0.0.1:{port}",
                session_id=session_id,
                statement_id=i // len(sessions) + 1,
                protocol="simple",
                statement_class=klass,
                command=command,
                query=query,
                query_fingerprint=fingerprints[query[0].lower()],
                params=None,
                affected_tables=list(tables),
                columns_accessed={k: list(v) for k, v in columns.items()},
                rows=1,
                status="ok",
                sqlstate=None,
                duration_us=rng.randint(80, 900),
                in_transaction=command == "UPDATE",
                tag=tag,
            )
        )
    return out


def in_batches(records: list[Record], size: int) -> list[list[Record]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall and CPU time of one measured piece of work over ``records`` records."""

    records: int
    wall: float
    cpu: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.wall if self.wall else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.records / self.cpu if self.cpu else 0.0

    @property
    def us(self) -> float:
        return 1e6 * self.wall / self.records

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.records


@contextlib.contextmanager
def clock(records: int) -> Iterator[Timing]:
    """Times the ``with`` body; the Timing is filled in when the body ends."""
    timing = Timing(records, 0.0, 0.0)
    wall, cpu = time.perf_counter(), time.process_time()
    yield timing
    timing.cpu = time.process_time() - cpu
    timing.wall = time.perf_counter() - wall


# --------------------------------------------------------------------------- the parts


def parts_of_append(batches: list[list[Record]], directories: dict[str, Path]) -> dict[str, Timing]:
    """Each step of ``StoreWriter.append``, timed on its own over all records."""
    records = [r for batch in batches for r in batch]
    n = len(records)
    out: dict[str, Timing] = {}
    for seq, record in enumerate(records, 1):
        record.seq = seq
    with clock(n) as out["encode"]:
        payloads = [encode_record(r) for r in records]
    with clock(n) as out["leaf hash"]:
        digests = [leaf_hash(p) for p in payloads]
    bounds = []
    start = 0
    for batch in batches:
        bounds.append((start, start + len(batch)))
        start += len(batch)
    with clock(n) as out["frame + join"]:
        blobs = [
            b"".join([frame(payloads[i], digests[i]) for i in range(lo, hi)]) for lo, hi in bounds
        ]
    tree = CompactRange()
    with clock(n) as out["tree"]:
        extend = tree.append
        for digest in digests:
            extend(digest)
    index = IndexBuilder("bench", 1, 0)
    with clock(n) as out["index + log_id"]:
        add = index.add
        for record, digest in zip(records, digests, strict=True):
            add(record)
            record.log_id = "immutable-" + digest.hex()[:16]
    for name, directory in directories.items():
        path = directory / "parts.seg"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with clock(n) as timing:
                offset = 0
                for blob in blobs:
                    offset += os.pwrite(fd, blob, offset)
            out[f"write ({name})"] = timing
        finally:
            os.close(fd)
            path.unlink()
    return out


def parts_of_jsonl(batches: list[list[Record]]) -> dict[str, Timing]:
    """Each step of f736e1d's ``RecordWriter._records``, timed on its own."""
    records = [r for batch in batches for r in batch]
    n = len(records)
    encode = msgspec.json.Encoder().encode
    out: dict[str, Timing] = {}
    for record in records:
        record.log_id = None
    with clock(n) as out["json encode (1st)"]:
        first = [encode(r) for r in records]
    with clock(n) as out["blake3 hex of 0x00+json"]:
        hexes = [blake3.blake3(b"\x00" + line).hexdigest() for line in first]
    with clock(n) as out["set log_id"]:
        for record, digest in zip(records, hexes, strict=True):
            record.log_id = "immutable-" + digest[:16]
    with clock(n) as out["json encode (2nd)"]:
        second = [encode(r) for r in records]
    with clock(n) as out["join lines"]:
        start = 0
        for batch in batches:
            lines = second[start : start + len(batch)]
            lines.append(b"")
            b"\n".join(lines)
            start += len(batch)
    return out


# --------------------------------------------------------------------------- whole writers


def _log_config(directory: Path) -> LogConfig:
    return LogConfig(dir=str(directory), origin="bench/scalple")


def store_run(batches: list[list[Record]], directory: Path, mode: str, key: SigningKey) -> Timing:
    """``StoreWriter.append`` over every batch, with fsync and tick as ``mode`` does.

    ``none``: no fsync at all (CPU + page cache only); ``async``: fsync once at least
    ``sync_interval`` (10 ms) passed since the last one, as the worker does under a
    steady stream, then a last one; ``strict``: fsync after every batch.  ``tick``
    (checkpoints every second, seals at 64 MB) runs after every batch in all modes,
    as in the worker.  Opening and closing the writer are not timed.
    """
    log_dir = Path(tempfile.mkdtemp(prefix=f"store-{mode}-", dir=directory))
    writer = StoreWriter(_log_config(log_dir), key)
    n = sum(len(b) for b in batches)
    sync_wall = tick_wall = 0.0
    syncs = 0
    try:
        append, sync, tick = writer.append, writer.sync, writer.tick
        perf = time.perf_counter
        with clock(n) as timing:
            synced_at = perf()
            for batch in batches:
                append(batch)
                now = perf()
                if mode == "strict" or (mode == "async" and now - synced_at >= SYNC_INTERVAL):
                    sync()
                    synced_at = perf()
                    sync_wall += synced_at - now
                    syncs += 1
                    now = synced_at
                tick(time.time_ns())
                tick_wall += perf() - now
            if mode != "none":
                now = perf()
                sync()
                sync_wall += perf() - now
                syncs += 1
        segments = writer._segment.number  # the benchmark reports seals
        timing.extra = {
            "syncs": syncs,
            "sync_s": sync_wall,
            "tick_s": tick_wall,
            "seals": segments - 1,
        }
    finally:
        writer.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    return timing


def jsonl_run(batches: list[list[Record]], directory: Path) -> Timing:
    """What f736e1d's writer did per batch (minus enrichment): the same records."""
    path = directory / "audit.jsonl"
    encode = msgspec.json.Encoder().encode
    n = sum(len(b) for b in batches)
    handle = open(path, "ab", buffering=0)  # noqa: SIM115 - closed below, as f736e1d did
    try:
        write = handle.write
        with clock(n) as timing:
            for batch in batches:
                lines: list[bytes] = []
                for record in batch:
                    record.log_id = None  # a fresh record: f736e1d hashed it without log_id
                    digest = blake3.blake3(b"\x00" + encode(record)).hexdigest()
                    record.log_id = "immutable-" + digest[:16]
                    lines.append(encode(record))
                lines.append(b"")
                data = memoryview(b"\n".join(lines))
                while data:
                    data = data[write(data) or 0 :]
    finally:
        handle.close()
        path.unlink()
    return timing


# --------------------------------------------------------------------------- driver


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarise(timings: list[Timing]) -> dict[str, float]:
    """Medians over rounds of the figures a row shows."""
    out = {
        "records": float(timings[0].records),
        "rate": _median([t.rate for t in timings]),
        "cpu_rate": _median([t.cpu_rate for t in timings]),
        "us": _median([t.us for t in timings]),
        "cpu_us": _median([t.cpu_us for t in timings]),
        "cpu_share": _median([t.cpu / t.wall for t in timings if t.wall]),
    }
    for key in timings[0].extra:
        out[key] = _median([t.extra[key] for t in timings])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    directories: dict[str, Path] = {}
    base = Path(tempfile.mkdtemp(prefix="scalple-store-bench-", dir=args.dir))
    directories["disk"] = base
    shm_base: Path | None = None
    if SHM.is_dir() and os.access(SHM, os.W_OK) and not args.no_shm:
        shm_base = Path(tempfile.mkdtemp(prefix="scalple-store-bench-", dir=SHM))
        directories["shm"] = shm_base
    try:
        return _run(args, directories)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if shm_base is not None:
            shutil.rmtree(shm_base, ignore_errors=True)


def _run(args: argparse.Namespace, directories: dict[str, Path]) -> dict[str, Any]:
    progress(f"building {args.records:,} records (not timed)...")
    records = build_records(args.records)
    payload_bytes = statistics.mean(len(encode_record(r)) for r in records[:2000])
    json_bytes = statistics.mean(len(msgspec.json.encode(r)) for r in records[:2000])
    # The records live for the whole run (a worker holds one batch at a time): keep
    # the collector from walking them over and over, which production never does.
    gc.collect()
    gc.freeze()
    key = SigningKey.generate("bench")
    plans: list[tuple[str, int, Callable[[list[list[Record]]], Timing]]] = []
    for size in args.batches:
        for mode in ("none", "async", "strict"):
            for where, directory in directories.items():
                if mode == "none" and where == "disk":
                    continue  # without fsync the disk adds nothing the page cache does not
                plans.append(
                    (
                        f"store {mode:<6} {where}",
                        size,
                        functools.partial(store_run, directory=directory, mode=mode, key=key),
                    )
                )
        for where, directory in directories.items():
            plans.append(
                (
                    f"jsonl (f736e1d) {where}",
                    size,
                    functools.partial(jsonl_run, directory=directory),
                )
            )
    batched = {size: in_batches(records, size) for size in args.batches}
    results: dict[tuple[str, int], list[Timing]] = {}
    parts: dict[tuple[str, int], list[Timing]] = {}
    for round_no in range(1, args.rounds + 1):
        for name, size, fn in plans:
            progress(f"round {round_no}/{args.rounds}: {name}, batches of {size}")
            timing = fn(batched[size])
            results.setdefault((name, size), []).append(timing)
            progress(f"    {timing.rate:,.0f} records/s, {timing.cpu_rate:,.0f}/s of CPU")
        for size in args.batches:
            progress(f"round {round_no}/{args.rounds}: parts, batches of {size}")
            for part, timing in parts_of_append(batched[size], directories).items():
                parts.setdefault((part, size), []).append(timing)
            for part, timing in parts_of_jsonl(batched[size]).items():
                parts.setdefault(("jsonl: " + part, size), []).append(timing)
    gc.unfreeze()
    return {
        "machine": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "load_end": os.getloadavg()[0],
            "directories": {k: str(v) for k, v in directories.items()},
        },
        "settings": {
            "records": args.records,
            "batches": args.batches,
            "rounds": args.rounds,
            "sync_interval_s": SYNC_INTERVAL,
            "target_records_per_s": TARGET,
        },
        "payload_bytes": payload_bytes,
        "json_bytes": json_bytes,
        "rows": [
            {"name": name, "batch": size, **summarise(timings)}
            for (name, size), timings in results.items()
        ],
        "parts": [
            {"name": name, "batch": size, **summarise(timings)}
            for (name, size), timings in parts.items()
        ],
    }


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_report(doc: dict[str, Any]) -> None:
    info, settings = doc["machine"], doc["settings"]
    print(f"store write benchmark, {info['date']}; {info['nproc']} CPUs, Python {info['python']}")
    print(
        f"{settings['records']:,} records per run, {settings['rounds']} rounds (medians), "
        f"mean record {doc['payload_bytes']:.0f} B msgpack / {doc['json_bytes']:.0f} B JSON; "
        f"load {info['load_end']:.2f} at end"
    )
    print(
        f"disk = {info['directories']['disk']}"
        + (", shm = /dev/shm" if "shm" in info["directories"] else "")
    )
    print()
    print("whole writer (records/s: wall; CPU/s: records per CPU second; cpu%: CPU / wall)")
    print(
        f"{'configuration':<24} {'batch':>5} {'records/s':>10} {'us/rec':>7} {'CPU/s':>10} "
        f"{'cpu us':>7} {'cpu%':>5} {'syncs':>6} {'sync ms':>8} {'tick ms':>8} {'seals':>5}"
    )
    rows = doc["rows"]
    for size in settings["batches"]:
        for row in (r for r in rows if r["batch"] == size):
            extra = ""
            if "syncs" in row:
                extra = (
                    f" {row['syncs']:>6.0f} {1e3 * row['sync_s']:>8.1f}"
                    f" {1e3 * row['tick_s']:>8.1f} {row['seals']:>5.0f}"
                )
            print(
                f"{row['name']:<24} {size:>5} {row['rate']:>10,.0f} {row['us']:>7.2f} "
                f"{row['cpu_rate']:>10,.0f} {row['cpu_us']:>7.2f} {100 * row['cpu_share']:>4.0f}%"
                + extra
            )
        print()
    print("parts, each timed alone over the same records (us per record, wall / CPU)")
    parts = doc["parts"]
    names = list(dict.fromkeys(p["name"] for p in parts))
    header = "".join(f" {f'batch {s}':>15}" for s in settings["batches"])
    print(f"{'part':<34}{header}")
    by_key = {(p["name"], p["batch"]): p for p in parts}
    for name in names:
        cells = ""
        for size in settings["batches"]:
            p = by_key.get((name, size))
            cells += f" {p['us']:>7.3f}/{p['cpu_us']:<7.3f}" if p else f" {'-':>15}"
        print(f"{name:<34}{cells}".rstrip())
    store_parts = [n for n in names if not n.startswith("jsonl") and "shm" not in n]
    json_parts = [n for n in names if n.startswith("jsonl")]
    for label, group in (
        ("store, sum of parts (disk)", store_parts),
        ("jsonl, sum of parts", json_parts),
    ):
        cells = ""
        for size in settings["batches"]:
            total = sum(by_key[(n, size)]["cpu_us"] for n in group if (n, size) in by_key)
            cells += f" {'':>7} {total:<7.3f}"
        print(f"{label:<34}{cells}".rstrip())
    print()
    print(f"target: >= {TARGET:,} records/s on one core, async mode")
    for size in settings["batches"]:
        for where in info["directories"]:
            a = _find(rows, "async", where, size)
            j = _find(rows, "jsonl", where, size)
            s = _find(rows, "strict", where, size)
            if a is None:
                continue
            verdict = "PASS" if a["cpu_rate"] >= TARGET else "MISS"
            line = (
                f"  batch {size:>4} {where:<4}: async {a['rate']:>9,.0f}/s wall, "
                f"{a['cpu_rate']:>9,.0f}/s per CPU second -> {verdict}"
            )
            if j is not None:
                line += f"; async/jsonl {a['rate'] / j['rate']:.2f} wall, "
                line += f"{a['cpu_rate'] / j['cpu_rate']:.2f} CPU"
            if s is not None:
                line += f"; strict/async {s['rate'] / a['rate']:.2f}"
            print(line)
    print("(PASS/MISS judged on records per CPU second, which a busy shared machine disturbs")
    print(" least; wall-clock rates are shown beside it.)")


def _find(rows: list[dict[str, Any]], kind: str, where: str, size: int) -> dict[str, Any] | None:
    for row in rows:
        words = row["name"].split()
        if row["batch"] == size and kind in row["name"] and words[-1] == where:
            return row
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=200_000, help="records per run; 200000")
    parser.add_argument("--batches", default="64,256,1024", help="batch sizes; 64,256,1024")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians); 3")
    parser.add_argument("--dir", default=None, help="directory on disk (default: $TMPDIR)")
    parser.add_argument("--no-shm", action="store_true", help="skip the /dev/shm runs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.records < 1 or args.rounds < 1 or not args.batches or min(args.batches) < 1:
        parser.error("--records, --rounds and --batches must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    if args.json:
        json.dump(doc, sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
