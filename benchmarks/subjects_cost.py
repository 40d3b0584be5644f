#!/usr/bin/env python3
"""What data-subject extraction and PII masking cost, on the relay and in the audit worker.

The issue's question: the cost of reading subject values out of result rows (a SELECT
returning 10,000 rows with a subject column) and of masking a pgbench statement with
``[log] literals = "all"`` and a subject column; the target is "within 10% of the same
run without subjects".  ``benchmarks/pgbench_compare.py --subjects`` answers it end to
end; this script takes the parts apart, with no proxy, no pipe and no server:

A. **Relay: the backend scanner.**  A realistic backend byte stream of one result
   (RowDescription of an ``int4`` subject column of a table plus two ``text`` columns
   of the same table, 10,000 DataRows, CommandComplete, ReadyForQuery) is fed through
   a :class:`scalple._wire.MessageScanner` configured as ``ServerLink`` configures it
   (``P.BACKEND_CAPTURE`` without ``[subjects]``, ``P.BACKEND_CAPTURE_DESCRIBED`` with
   it, ``P.BACKEND_COUNT`` counted, no type check, ``capture_limit`` 1 MiB), in the
   chunks a socket hands over (64 KiB under load, ~1500 B: one Ethernet frame).  The
   scanner settings compared, each on the same chunks:

   * ``off``: no ``[subjects]``; the reference;
   * ``described``: ``[subjects]`` configured, but no map for this database yet (the
     scanner also captures RowDescription/NoData for prepared statements);
   * ``other table``: a map, but none of its tables is in this result (rows unread);
   * ``on, limit N``: the subject column is watched, at most N values kept per
     statement (``[masking] subjects_limit``; 1,000 is the default).

   The subject column is first in the row (the scanner skips the rest of each row once
   it has it) and, as a worse case, last.  Then what the relay hands to the audit
   worker: the pickle of the StatementEvent, with and without its packed values.

B. **Audit worker.**  (1) Turning the packed values of one statement into tags:
   ``row_subject_values`` + ``Masker.subject_tag`` + ``SubjectSet.add``, as
   ``Enricher._build`` does, whole and part by part, for the values the scanner kept at
   each limit.  (2) ``StatementMasker.apply`` for pgbench's statement
   (``SELECT abalance FROM pgbench_accounts WHERE aid = 12345;``, a different aid each
   call) with ``literals = "all"`` and ``aid`` a subject column, its shape planned
   already (cache hit), against no masking (the default configuration, where the
   masker is inactive) and against ``literals = "all"`` alone; the same for
   ``-M extended`` (``aid = $1`` with a parameter).  (3) The whole record
   (``Enricher.record``: analysis cache hit, masking, tags), with a catalog as the
   proxy has one, plain configuration vs subjects.  (4) The same record for a
   10,000-row result and what the store then does with it that grows with its size
   (``encode_record``, ``leaf_hash``, ``IndexBuilder.add``).

Every configuration of a part is timed once per round, rounds interleaved, medians over
rounds; ratios are medians of same-round ratios, so they hold on a shared, noisy
machine while the absolute figures do not travel.  Nothing is asserted.

Usage::

    python benchmarks/subjects_cost.py [--rows 10000] [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import pickle
import platform
import random
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from scalple import protocol as P
from scalple._wire import SUBJECT_VALUES, MessageScanner
from scalple.analysis.cache import AnalysisCache
from scalple.analysis.catalog import Catalog, Relation
from scalple.analysis.provider import CatalogProvider
from scalple.events import SessionInfo, StatementEvent
from scalple.identity.state import Identity
from scalple.masking.masks import Masker
from scalple.masking.rows import row_subject_columns, row_subject_values, subject_kinds
from scalple.masking.statement import LiteralsRule, StatementMasker, SubjectSet
from scalple.records import encode_record
from scalple.sink.enrich import Enricher
from scalple.store.hashing import leaf_hash
from scalple.store.index import IndexBuilder

TABLE_OID = 16_397  # pg_class OID of the result's table (as RowDescription gives it)
OTHER_OID = 16_410  # a subject table that is not in the result
INT4 = 23
TEXT = 25
CAPTURE_LIMIT = 1 << 20  # [log] capture_limit default
CHUNKS = {"64 KiB": 65_536, "1500 B": 1_500}
SUBJECTS = {"public.customers.id": "customer", "public.pgbench_accounts.aid": "account"}
PGBENCH_SUBJECTS = {"public.pgbench_accounts.aid": "account"}
KEY = bytes(range(32))
PGBENCH_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
PGBENCH_EXTENDED = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
ROWS_SQL = "SELECT id, name, email FROM customers WHERE id <= 10000"

CATALOG = Catalog(
    [
        Relation(
            "public",
            "customers",
            "table",
            ("id", "name", "email"),
            oid=TABLE_OID,
            attnums=(1, 2, 3),
        ),
        Relation(
            "public",
            "pgbench_accounts",
            "table",
            ("aid", "bid", "abalance", "filler"),
            oid=OTHER_OID,
            attnums=(1, 2, 3, 4),
        ),
    ]
)


# --------------------------------------------------------------------------- timing


@dataclass
class Figure:
    """One configuration of one part: seconds per call in each round."""

    part: str
    name: str
    per: int  # rows/values per call, for the per-item figure (1: none)
    reference: str | None  # name of the configuration its ratio is against
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def us(self) -> float:
        return statistics.median(self.samples) * 1e6


def per_call(fn: Callable[[], object], min_time: float = 0.05) -> float:
    """Seconds per call of ``fn``: as many calls as fill ``min_time``, at least 3."""
    fn()  # warm (caches, allocator)
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or loops >= 1 << 22:
            if loops < 3:
                start = time.perf_counter()
                for _ in range(3):
                    fn()
                return (time.perf_counter() - start) / 3
            return elapsed / loops
        loops = max(loops * 2, int(loops * min_time / max(elapsed, 1e-9) * 1.1))


def measure(figures: Sequence[Figure], calls: dict[str, Callable[[], object]], rounds: int) -> None:
    """Every configuration once per round, the order rotating from round to round."""
    gc.collect()
    for round_no in range(rounds):
        shift = round_no % len(figures)
        for figure in [*figures[shift:], *figures[:shift]]:
            figure.samples.append(per_call(calls[figure.name]))


def ratio(figure: Figure, by_name: dict[str, Figure]) -> float | None:
    """Median over rounds of this configuration's time / its reference's, same round."""
    if figure.reference is None:
        return None
    ref = by_name[figure.reference]
    return statistics.median(a / b for a, b in zip(figure.samples, ref.samples, strict=True))


# --------------------------------------------------------------------------- part A


def msg(mtype: bytes, body: bytes) -> bytes:
    return P.build_message(mtype, body)


def rd_field(name: str, table: int, attnum: int, type_oid: int) -> bytes:
    """One RowDescription field: name, table OID, attnum, type, size, modifier, format 0."""
    size = 4 if type_oid == INT4 else -1
    return name.encode() + b"\0" + struct.pack("!IhIhih", table, attnum, type_oid, size, -1, 0)


def result_stream(rows: int, subject_last: bool) -> bytes:
    """The backend's answer to ``SELECT id, name, email FROM customers`` (simple protocol).

    ``id`` is the int4 subject column; ``name`` and ``email`` are text of 12-20 and
    22-26 characters, as a customer table holds.  With ``subject_last`` the columns
    come as ``name, email, id``.
    """
    fields = [
        rd_field("id", TABLE_OID, 1, INT4),
        rd_field("name", TABLE_OID, 2, TEXT),
        rd_field("email", TABLE_OID, 3, TEXT),
    ]
    order = [1, 2, 0] if subject_last else [0, 1, 2]
    parts = [msg(b"T", struct.pack("!h", 3) + b"".join(fields[i] for i in order))]
    rng = random.Random(7)
    first = ["Ana", "Bo", "Chiara", "Dmitri", "Eleanor", "Farid", "Grete", "Hiroshi"]
    last = ["Lind", "Okafor", "Marchetti", "Ivanova", "Whitfield", "Haddad", "Nakamura"]
    for n in range(1, rows + 1):
        name = f"{rng.choice(first)} {rng.choice(last)}"
        values = [
            str(n).encode(),
            name.encode(),
            f"{name.split()[0].lower()}.{n}@example.org".encode(),
        ]
        body = struct.pack("!h", 3) + b"".join(
            struct.pack("!i", len(values[i])) + values[i] for i in order
        )
        parts.append(msg(b"D", body))
    parts.append(msg(b"C", b"SELECT %d\0" % rows))
    parts.append(msg(b"Z", b"I"))
    return b"".join(parts)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def scanner(setting: str) -> MessageScanner:
    """A backend scanner as ServerLink makes it, with ``setting`` (see the module doc)."""
    capture = P.BACKEND_CAPTURE if setting == "off" else P.BACKEND_CAPTURE_DESCRIBED
    scan = MessageScanner(capture, P.BACKEND_COUNT, None, 0x3FFFFFFF, CAPTURE_LIMIT)
    if setting == "other table":
        scan.set_row_subjects({(OTHER_OID, 1): 1}, 10_000)
    elif setting.startswith("on"):
        limit = int(setting.rpartition(" ")[2].replace(",", ""))
        scan.set_row_subjects(row_subject_columns(CATALOG, SUBJECTS), limit)
    return scan


def feeder(scan: MessageScanner, chunks: list[bytes]) -> Callable[[], object]:
    """Feed one whole result; the entries are looked at as the tracker would (by type)."""
    feed = scan.feed

    def run() -> int:
        found = 0
        for chunk in chunks:
            out = feed(chunk)
            if out is not None:
                for entry in out:
                    if entry[0] == SUBJECT_VALUES:
                        found += 1
        return found

    return run


def values_entry(scan: MessageScanner, chunks: list[bytes]) -> tuple[bytes, bool, int] | None:
    """The SUBJECT_VALUES entry of one result, if any: (packed, truncated, seen)."""
    found = None
    counted = 0
    for chunk in chunks:
        for mtype, body, truncated, count, _end in scan.feed(chunk) or ():
            if mtype == SUBJECT_VALUES:
                found = (body, truncated, count)
            elif mtype == P.B_COMMAND_COMPLETE:
                counted = count
    if counted == 0:
        raise RuntimeError("the scanner counted no DataRow: the stream is not what it seems")
    return found


RELAY_SETTINGS = ("off", "described", "other table", "on, limit 10,000", "on, limit 1,000")


def part_a(rows: int, rounds: int) -> tuple[list[Figure], dict[str, Any]]:
    figures: list[Figure] = []
    checks: dict[str, Any] = {}
    for position in ("first", "last"):
        stream = result_stream(rows, subject_last=position == "last")
        checks[f"stream bytes (subject {position})"] = len(stream)
        for chunk_name, size in CHUNKS.items():
            chunks = chunked(stream, size)
            part = f"A. scanner, {rows:,} rows, subject {position}, {chunk_name} chunks"
            calls: dict[str, Callable[[], object]] = {}
            group = []
            for setting in RELAY_SETTINGS:
                scan = scanner(setting)
                entry = values_entry(scanner(setting), chunks)
                if setting.startswith("on"):
                    if entry is None or entry[2] != rows:
                        raise RuntimeError(f"{setting}: the scanner did not see {rows} values")
                    checks[f"{setting}: packed bytes"] = len(entry[0])
                elif entry is not None:
                    raise RuntimeError(f"{setting}: the scanner read values it should not")
                calls[setting] = feeder(scan, chunks)
                group.append(Figure(part, setting, rows, None if setting == "off" else "off"))
            measure(group, calls, rounds)
            figures.extend(group)
    return figures, checks


def relay_event(packed: bytes | None, seen: int, truncated: bool, query: bytes) -> StatementEvent:
    session = SessionInfo(
        "bench-1", "127.0.0.1:50000", "app_user", "app", "pgbench", None, None, "none", False, 0
    )
    return StatementEvent(
        session=session,
        statement_id=1,
        protocol="simple",
        query=query,
        query_truncated=False,
        query_index=0,
        params=None,
        param_types=(),
        started_ns=time.monotonic_ns(),
        ended_ns=time.monotonic_ns() + 1_000_000,
        tag=b"SELECT %d" % seen if seen else b"SELECT 1",
        rows=seen or 1,
        sqlstate=None,
        status="ok",
        in_transaction=False,
        identity=Identity(None, None, "none"),
        row_values=packed,
        row_values_seen=seen,
        row_values_truncated=truncated,
    )


def handoff(rows: int, rounds: int) -> tuple[list[Figure], dict[int, tuple[bytes, bool, int]]]:
    """Pickling the event for the worker pipe (the hand-off thread, in the proxy process)."""
    chunks = chunked(result_stream(rows, False), CHUNKS["64 KiB"])
    entries: dict[int, tuple[bytes, bool, int]] = {}
    part = f"A. hand-off: pickle of the event, {rows:,}-row result"
    group = [Figure(part, "no values", 1, None)]
    calls: dict[str, Callable[[], object]] = {}
    plain = relay_event(None, 0, False, ROWS_SQL.encode())
    calls["no values"] = lambda: pickle.dumps([plain], pickle.HIGHEST_PROTOCOL)
    for limit in (10_000, 1_000):
        entry = values_entry(scanner(f"on, limit {limit:,}"), chunks)
        assert entry is not None
        event = relay_event(entry[0], entry[2], entry[1], ROWS_SQL.encode())
        name = f"values, limit {limit:,}"
        size = len(pickle.dumps([event], pickle.HIGHEST_PROTOCOL))
        group.append(Figure(part, name, 1, "no values", note=f"{size:,} B pickled"))

        def dump(event: StatementEvent = event) -> bytes:
            return pickle.dumps([event], pickle.HIGHEST_PROTOCOL)

        calls[name] = dump
        entries[limit] = entry
    group[0].note = f"{len(pickle.dumps([plain], pickle.HIGHEST_PROTOCOL)):,} B pickled"
    measure(group, calls, rounds)
    return group, entries


# --------------------------------------------------------------------------- part B


class FixedCatalogs:
    """A CatalogProvider that always has the same snapshot (no server, no lock)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def get(self, database: str, role: str) -> tuple[Catalog | None, str | None]:
        return self.catalog, None

    def invalidate(self, database: str) -> None:
        pass


def enricher(subjects: dict[str, str], literals: LiteralsRule, limit: int = 10_000) -> Enricher:
    masker = StatementMasker({}, subjects, literals, Masker(KEY) if subjects else None)
    return Enricher(
        AnalysisCache(4096),
        cast(CatalogProvider, FixedCatalogs(CATALOG)),
        masker=masker,
        subjects_limit=limit,
    )


def tags_parts(packed: bytes, kept: int, seen: int) -> tuple[list[Figure], dict[str, Any]]:
    kinds = subject_kinds(SUBJECTS)
    masker = Masker(KEY)
    part = f"B1. row values -> tags, {kept:,} kept of {seen:,}"
    unpacked = row_subject_values(packed, kinds)
    tags = [(masker.subject_tag(kind, value), kind) for kind, value in unpacked]
    if len(unpacked) != kept or len({t for t, _ in tags}) != kept:
        raise RuntimeError(f"expected {kept} distinct values, got {len(unpacked)}")

    def whole() -> SubjectSet:
        subjects = SubjectSet(10_000)
        for kind, value in row_subject_values(packed, kinds):
            subjects.add(masker.subject_tag(kind, value), kind)
        return subjects

    def unpack() -> object:
        return row_subject_values(packed, kinds)

    def tag() -> object:
        subject_tag = masker.subject_tag
        return [subject_tag(kind, value) for kind, value in unpacked]

    def add() -> object:
        subjects = SubjectSet(10_000)
        for t, kind in tags:
            subjects.add(t, kind)
        return subjects

    group = [
        Figure(part, "whole (as Enricher._build)", kept, None),
        Figure(part, "row_subject_values", kept, None),
        Figure(part, "Masker.subject_tag", kept, None),
        Figure(part, "SubjectSet.add", kept, None),
    ]
    calls: dict[str, Callable[[], object]] = {
        "whole (as Enricher._build)": whole,
        "row_subject_values": unpack,
        "Masker.subject_tag": tag,
        "SubjectSet.add": add,
    }
    return group, calls


DISTINCT = 8192
"""Distinct statements cycled through in B2 and B3: pgbench's aid takes a million values,
so the enricher's exact-text cache (4096) must miss, as it does under pgbench."""


def statement_parts(rounds: int) -> list[Figure]:
    rng = random.Random(11)
    aids = rng.sample(range(1, 1_000_001), DISTINCT)
    texts = [PGBENCH_SQL.format(aid=aid) for aid in aids]
    params: list[list[str | None]] = [[str(aid)] for aid in aids]
    configs = {
        "no masking (default config)": StatementMasker({}, {}, "pii", None),
        'literals "all"': StatementMasker({}, {}, "all", None),
        'literals "all" + aid subject': StatementMasker({}, PGBENCH_SUBJECTS, "all", Masker(KEY)),
    }
    figures: list[Figure] = []
    for protocol in ("simple", "extended"):
        part = f"B2. StatementMasker.apply, pgbench -S statement, {protocol} (cache hit)"
        calls: dict[str, Callable[[], object]] = {}
        group = []
        for name, masker in configs.items():

            def run(masker: StatementMasker = masker, protocol: str = protocol) -> object:
                out = None
                for i in range(len(texts)):
                    subjects = SubjectSet(10_000)  # one per statement, as Enricher._build
                    if protocol == "simple":
                        out = masker.apply(
                            texts[i], None, catalog=CATALOG, planned=True, subjects=subjects
                        )
                    else:
                        out = masker.apply(
                            PGBENCH_EXTENDED,
                            params[i],
                            catalog=CATALOG,
                            planned=True,
                            subjects=subjects,
                        )
                return out

            sample = configs[name]
            check = SubjectSet(10)
            if protocol == "simple":
                shown = sample.apply(
                    texts[0], None, catalog=CATALOG, planned=True, subjects=check
                ).query
            else:
                shown = str(
                    sample.apply(
                        PGBENCH_EXTENDED, params[0], catalog=CATALOG, planned=True, subjects=check
                    ).params
                )
            if "subject" in name and not check.tags:
                raise RuntimeError(f"{name}: no subject tag for {texts[0]!r}")
            calls[name] = run
            reference = None if name.startswith("no masking") else "no masking (default config)"
            group.append(Figure(part, name, len(texts), reference, note=f"-> {shown}"))
        measure(group, calls, rounds)
        # per-statement figures: the batch of DISTINCT statements is one call
        for figure in group:
            figure.samples = [s / len(texts) for s in figure.samples]
            figure.per = 1
        figures.extend(group)
    return figures


def record_parts(
    rows: int, packed: dict[int, tuple[bytes, bool, int]], rounds: int
) -> list[Figure]:
    rng = random.Random(13)
    queries = [
        PGBENCH_SQL.format(aid=aid).encode() for aid in rng.sample(range(1, 1_000_001), DISTINCT)
    ]
    events = [relay_event(None, 0, False, q) for q in queries]
    plain = enricher({}, "pii")
    subjects = enricher(PGBENCH_SUBJECTS, "all")
    part = (
        f"B3. Enricher.record, pgbench -S statement ({DISTINCT:,} distinct texts: fingerprint "
        "cache hit, masking plan hit)"
    )
    part3 = "B3b. store work per pgbench record: encode_record + leaf_hash + IndexBuilder.add"
    configs = {"plain config": plain, "subjects + literals all": subjects}
    calls: dict[str, Callable[[], object]] = {}
    group = []
    group3 = []
    for name, enr in configs.items():

        def run(enr: Enricher = enr) -> object:
            out = None
            for event in events:
                out = enr.record(event)
            return out

        records = [enr.record(event) for event in events]
        for seq, record in enumerate(records, 1):
            record.seq = seq
        if name != "plain config" and not all(r.subjects for r in records):
            raise RuntimeError("the subjects enricher gave no subject for a pgbench statement")

        def store_all(records: list[Any] = records) -> object:
            index = IndexBuilder("bench", 1, 0)  # one segment's index: every tag posted
            for record in records:
                leaf_hash(encode_record(record))
                index.add(record)
            return index

        calls[name] = run
        calls[f"{name}: store"] = store_all
        note = f"subjects {len(records[0].subjects)}, query {records[0].query!r}"
        size = statistics.mean(len(encode_record(r)) for r in records)
        ref = None if name == "plain config" else "plain config"
        group.append(Figure(part, name, 1, ref, note=note))
        group3.append(
            Figure(
                part3,
                f"{name}: store",
                1,
                ref and f"{ref}: store",
                note=f"{size:.0f} B encoded per record",
            )
        )
    measure([*group, *group3], calls, rounds)
    for figure in [*group, *group3]:
        figure.samples = [s / len(events) for s in figure.samples]
    group += group3

    # A 10,000-row result: the record, then the store's size-dependent work.
    part4 = f"B4. Enricher.record + store work, {rows:,}-row result"
    plain_rows = enricher({}, "pii")
    no_values = relay_event(None, 0, False, ROWS_SQL.encode())
    calls4: dict[str, Callable[[], object]] = {}
    group4 = []
    variants: list[tuple[str, Enricher, StatementEvent]] = [("plain config", plain_rows, no_values)]
    for limit, (body, truncated, seen) in sorted(packed.items(), reverse=True):
        event = relay_event(body, seen, truncated, ROWS_SQL.encode())
        variants.append((f"subjects, limit {limit:,}", enricher(SUBJECTS, "all", limit), event))
    for name, enr, event in variants:
        record = enr.record(event)
        payload = encode_record(record)

        def build(enr: Enricher = enr, event: StatementEvent = event) -> object:
            return enr.record(event)

        def store(record: Any = record) -> object:
            data = encode_record(record)
            digest = leaf_hash(data)
            IndexBuilder("bench", 1, 0).add(record)
            return digest

        calls4[f"{name}: record"] = build
        calls4[f"{name}: encode+hash+index"] = store
        note = (
            f"subjects {len(record.subjects):,} (count {record.subjects_count:,}, "
            f"truncated {record.subjects_truncated}), {len(payload):,} B encoded"
        )
        ref = None if name == "plain config" else "plain config"
        group4.append(Figure(part4, f"{name}: record", rows, ref and f"{ref}: record", note=note))
        group4.append(
            Figure(
                part4,
                f"{name}: encode+hash+index",
                rows,
                ref and f"{ref}: encode+hash+index",
            )
        )
    measure(group4, calls4, rounds)
    return group + group4


# --------------------------------------------------------------------------- report


def git_state() -> str:
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "scalple"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return head + (f" + uncommitted changes in {len(dirty.splitlines())} files" if dirty else "")


def print_report(figures: list[Figure], info: dict[str, Any]) -> None:
    print(f"subject extraction and masking cost, {info['date']}")
    print(
        f"{info['nproc']} CPUs, Python {info['python']}, scalple git {info['git']}; "
        f"load {info['load_start']:.2f} at start, {info['load_end']:.2f} at end"
    )
    print(
        f"{info['rounds']} interleaved rounds; medians; ratio = median of same-round "
        "time ratios vs the reference (ref)"
    )
    by_part: dict[str, list[Figure]] = {}
    for figure in figures:
        by_part.setdefault(figure.part, []).append(figure)
    for part, group in by_part.items():
        by_name = {f.name: f for f in group}
        print()
        print(part)
        for figure in group:
            r = ratio(figure, by_name)
            extra = figure.us - by_name[figure.reference].us if figure.reference else None
            per_item = f"{figure.us * 1000 / figure.per:8.1f} ns/item" if figure.per > 1 else ""
            line = f"  {figure.name:<38} {figure.us:10.2f} us {per_item:>16}" + (
                f"  x{r:.3f} ({extra:+.2f} us)" if r is not None and extra is not None else ""
            )
            print(line.rstrip())
            if figure.note:
                print(f"      {figure.note[:150]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the result; 10000")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; 7")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.rows < 1_000 or args.rounds < 1:
        parser.error("--rows must be >= 1000 and --rounds >= 1")
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "git": git_state(),
        "rows": args.rows,
        "rounds": args.rounds,
        "load_start": os.getloadavg()[0],
    }
    print("A: the backend scanner...", file=sys.stderr, flush=True)
    figures, checks = part_a(args.rows, args.rounds)
    print("A: the hand-off pickle...", file=sys.stderr, flush=True)
    pickled, entries = handoff(args.rows, args.rounds)
    figures += pickled
    print("B: row values -> tags...", file=sys.stderr, flush=True)
    packed: dict[int, tuple[bytes, bool, int]] = {}
    for limit in (10_000, 1_000):
        body, truncated, seen = entries[limit]
        packed[limit] = (body, truncated, seen)
        group, calls = tags_parts(body, min(limit, args.rows), seen)
        measure(group, calls, args.rounds)
        figures += group
    print("B: statement masking and records...", file=sys.stderr, flush=True)
    figures += statement_parts(args.rounds)
    figures += record_parts(args.rows, packed, args.rounds)
    info["load_end"] = os.getloadavg()[0]
    info["checks"] = checks
    if args.json:
        by_part: dict[str, dict[str, Figure]] = {}
        for f in figures:
            by_part.setdefault(f.part, {})[f.name] = f
        out = [
            {
                "part": f.part,
                "name": f.name,
                "us": f.us,
                "ns_per_item": f.us * 1000 / f.per if f.per > 1 else None,
                "reference": f.reference,
                "ratio": ratio(f, by_part[f.part]),
                "samples_us": [s * 1e6 for s in f.samples],
                "note": f.note,
            }
            for f in figures
        ]
        json.dump({"machine": info, "figures": out}, sys.stdout, indent=2)
        print()
    else:
        print_report(figures, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
