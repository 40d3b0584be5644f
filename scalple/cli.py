"""The ``scalple`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scalple import __version__
from scalple.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from scalple.store.keys import VerifierKey

__all__ = ["main"]

log = logging.getLogger("scalple")


def _serve_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        server__listen=args.listen,
        upstream__address=args.upstream,
        log__dir=args.log_dir,
        log__signing_key=args.signing_key,
    )


async def _serve(config: Config, verbose: bool) -> int:
    from scalple.proxy.listener import Proxy
    from scalple.sink.audit import AuditLogUnavailable, AuditSink

    loop = asyncio.get_running_loop()
    try:
        sink = AuditSink(config, verbose=verbose)
    except AuditLogUnavailable as exc:
        log.error("cannot open the audit log: %s", exc)
        return 1
    proxy = Proxy(config, sink, loop)
    try:
        await proxy.start()
    except OSError as exc:
        sink.close()
        log.error("cannot listen on %s: %s", config.server.listen, exc.strerror or exc)
        return 2
    if config.metrics.listen:
        from scalple.config import parse_address
        from scalple.metrics import serve_metrics

        address = parse_address(config.metrics.listen, key="metrics.listen")
        try:
            serve_metrics(address, proxy, sink)
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s", config.metrics.listen, exc.strerror or exc)
            await proxy.shutdown(0.1)
            sink.close()
            return 2
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"scalple: listening on {proxy.address[0]}:{proxy.address[1]}", flush=True)
    await stop.wait()
    log.info(
        "shutting down: waiting up to %.0fs for open transactions", config.server.shutdown_timeout
    )
    await proxy.shutdown()
    sink.close()
    log.info("stopped; %d events written to %s", sink.written, sink.log_dir)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    config = _serve_config(args)
    code: int = uvloop.run(_serve(config, args.verbose))
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from scalple.demo import run_demo

    return run_demo(json_output=args.json)


def _log_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--log-dir", metavar="DIR", help="the audit log directory")
    where.add_argument("--config", help="TOML configuration file; its [log] dir is read")


def _log_dir(args: argparse.Namespace) -> str:
    if args.log_dir:
        return str(args.log_dir)
    return load_config(args.config).log.dir


def _cmd_log_tail(args: argparse.Namespace) -> int:
    from scalple.query.reader import LogReader
    from scalple.query.render import format_record, header

    reader = LogReader(_log_dir(args))
    if args.json:
        import msgspec

        def show(record: dict[str, object]) -> None:
            sys.stdout.buffer.write(msgspec.json.encode(record) + b"\n")
            sys.stdout.flush()
    else:
        print(header())

        def show(record: dict[str, object]) -> None:
            print(format_record(record), flush=True)

    last = list(reader.records())[-args.lines :] if args.lines > 0 else []
    for record in last:
        show(record)
    if args.follow:
        try:
            for record in reader.follow():
                show(record)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_log_export(args: argparse.Namespace) -> int:
    import msgspec

    from scalple.query.reader import LogReader, parse_time

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        print(f"scalple: {exc}", file=sys.stderr)
        return 2
    reader = LogReader(_log_dir(args))
    out = sys.stdout.buffer
    count = 0
    progress = sys.stderr.isatty()
    for record in reader.records(since=since, until=until):
        out.write(msgspec.json.encode(record) + b"\n")
        count += 1
        if progress and count % 10_000 == 0:
            print(f"\r{count:,} records", end="", file=sys.stderr, flush=True)
    out.flush()
    print(f"{chr(13) if progress else ''}{count:,} records exported", file=sys.stderr)
    return 0


def _verifiers(args: argparse.Namespace, log_dir: Path | None) -> list[VerifierKey]:
    """The public key to check signatures with: given, else found, said so."""
    from scalple.store.keys import VerifierKey

    if args.pubkey:
        return [VerifierKey.load(Path(args.pubkey))]
    candidates: list[Path] = []
    config_path = getattr(args, "config", None)
    if config_path:
        signing_key = load_config(config_path).log.signing_key
        if signing_key:
            candidates.append(Path(signing_key).with_suffix(".pub"))
    if log_dir is not None:
        candidates.append(log_dir / "keys" / "signing.pub")
    for path in candidates:
        if path.exists():
            print(
                f"scalple: checking signatures with {path}; pass --pubkey with a copy kept "
                "elsewhere for evidence that survives a rewrite of this machine",
                file=sys.stderr,
            )
            return [VerifierKey.load(path)]
    raise FileNotFoundError("no public key: pass --pubkey FILE (the signing.pub of scalple keygen)")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from scalple.store.keys import write_keypair

    key, pub = write_keypair(Path(args.out), args.name, overwrite=args.force)
    print(f"private key: {key} (mode 0600; give it to scalple serve --signing-key)")
    print(f"public key:  {pub} (give it to verifiers: scalple verify --pubkey)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import msgspec

    from scalple.store.verify import Violation, verify_log

    log_dir = Path(_log_dir(args))
    verifiers = _verifiers(args, log_dir)
    witnesses = [Path(p).read_bytes() for p in args.checkpoint or ()]
    tty = sys.stderr.isatty() and not args.json

    def progress(done: int) -> None:
        print(f"\r  {done:,} records verified", end="", file=sys.stderr, flush=True)

    try:
        reports = verify_log(
            log_dir, verifiers, witnesses=witnesses, progress=progress if tty else None
        )
    except Violation as exc:
        if tty:
            print(file=sys.stderr)
        if args.json:
            failure = {"ok": False, "origin": exc.origin, "where": exc.where, "what": exc.what}
            sys.stdout.buffer.write(msgspec.json.encode(failure) + b"\n")
        else:
            print(f"VIOLATION {exc}", file=sys.stdout)
        return 1
    if tty:
        print(file=sys.stderr)
    if args.json:
        result = {"ok": True, "origins": reports}
        sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
        return 0
    for r in reports:
        kept = f", from record {r.first_index} (retention)" if r.first_index else ""
        print(
            f"OK {r.origin}: {r.records:,} records in {r.segments} segments{kept}; "
            f"{r.checkpoints:,} checkpoints match; signed size {r.signed_size:,}, "
            f"{r.unsigned:,} newer records not signed yet; root {r.root[:16]}"
        )
    if witnesses:
        print(f"OK {len(witnesses)} given checkpoint(s) consistent with the log")
    return 0


def _cmd_prove(args: argparse.Namespace) -> int:
    import msgspec

    from scalple.store.proof import ProofError, prove

    log_dir = Path(_log_dir(args))
    try:
        proof = prove(log_dir, args.log_id, _verifiers(args, log_dir))
    except ProofError as exc:
        print(f"scalple: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(proof)) + b"\n")
    return 0


def _cmd_verify_proof(args: argparse.Namespace) -> int:
    import msgspec

    from scalple.store.proof import InclusionProof, ProofError, check_proof

    source = sys.stdin.buffer.read() if args.proof == "-" else Path(args.proof).read_bytes()
    try:
        proof = msgspec.json.decode(source, type=InclusionProof)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"scalple: not a proof: {exc}", file=sys.stderr)
        return 1
    try:
        record = check_proof(proof, _verifiers(args, None))
    except ProofError as exc:
        print(f"INVALID {exc}")
        return 1
    print(
        f"OK {proof.log_id} (seq {record.get('seq')}, {record.get('ts')}) is record "
        f"{proof.leaf_index} of the {proof.tree_size}-record tree signed for {proof.origin}"
    )
    return 0


def _cmd_subject_tag(args: argparse.Namespace) -> int:
    from scalple.masking.masks import Masker, key_from_file

    config = load_config(args.config)
    kinds = sorted(set(config.subjects.values()))
    if args.kind not in kinds:
        known = ", ".join(kinds) or "none configured"
        print(f"scalple: no subject kind {args.kind!r} in [subjects] ({known})", file=sys.stderr)
        return 2
    assert config.masking.key_file is not None  # required by [subjects]; checked at load
    masker = Masker(key_from_file(config.masking.key_file))
    print(masker.subject_tag(args.kind, args.id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalple", description="PostgreSQL audit proxy: who accessed which data."
    )
    parser.add_argument("--version", action="version", version=f"scalple {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML configuration file (docs/configuration.md)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="overrides [server] listen")
    serve.add_argument("--upstream", metavar="HOST:PORT", help="overrides [upstream] address")
    serve.add_argument("--log-dir", metavar="DIR", help="overrides [log] dir")
    serve.add_argument("--signing-key", metavar="FILE", help="overrides [log] signing_key")
    serve.set_defaults(func=_cmd_serve)

    keygen = sub.add_parser("keygen", help="create the Ed25519 key that signs checkpoints")
    keygen.add_argument("--out", metavar="DIR", required=True, help="writes signing.key, .pub")
    keygen.add_argument("--name", default="scalple", help="key name in signatures")
    keygen.add_argument("--force", action="store_true", help="replace existing key files")
    keygen.set_defaults(func=_cmd_keygen)

    verify = sub.add_parser("verify", help="check the whole log: hashes, roots, signatures")
    _log_location(verify)
    verify.add_argument("--pubkey", metavar="FILE", help="signing.pub to check signatures with")
    verify.add_argument(
        "--checkpoint",
        metavar="FILE",
        action="append",
        help="a signed checkpoint kept elsewhere (mirror, witness) the log must match; repeatable",
    )
    verify.add_argument("--json", action="store_true", help="one JSON object")
    verify.set_defaults(func=_cmd_verify)

    prove_cmd = sub.add_parser("prove", help="inclusion proof of one record (JSON)")
    prove_cmd.add_argument("log_id", metavar="LOG_ID", help="immutable-... of the record")
    _log_location(prove_cmd)
    prove_cmd.add_argument("--pubkey", metavar="FILE", help="signing.pub (checks the checkpoint)")
    prove_cmd.set_defaults(func=_cmd_prove)

    tag = sub.add_parser(
        "subject-tag", help="the tag a data subject's id is logged under (to search by it)"
    )
    tag.add_argument("--config", required=True, help="the proxy's TOML file ([masking] key)")
    tag.add_argument("kind", metavar="KIND", help="a subject kind of [subjects], e.g. customer")
    tag.add_argument("id", metavar="ID", help="the id as PostgreSQL prints it, e.g. 42")
    tag.set_defaults(func=_cmd_subject_tag)

    check = sub.add_parser("verify-proof", help="check a proof printed by scalple prove")
    check.add_argument("proof", metavar="FILE", help="the proof JSON, or - for stdin")
    check.add_argument("--pubkey", metavar="FILE", required=True, help="the log's signing.pub")
    check.set_defaults(func=_cmd_verify_proof)

    log_cmd = sub.add_parser("log", help="read the audit log")
    log_sub = log_cmd.add_subparsers(dest="log_command", required=True)
    for name, func, text in (
        ("tail", _cmd_log_tail, "the latest records, human-readable"),
        ("export", _cmd_log_export, "records as JSON lines, one object per line"),
    ):
        p = log_sub.add_parser(name, help=text)
        _log_location(p)
        p.set_defaults(func=func)
        if name == "tail":
            p.add_argument("-n", "--lines", type=int, default=20, help="how many (default 20)")
            p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
            p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
        else:
            p.add_argument(
                "--json", action="store_true", required=True, help="JSON lines (the only format)"
            )
            p.add_argument(
                "--since", metavar="TIME", help="from (inclusive): 2026-05-01, RFC 3339 or 7d"
            )
            p.add_argument("--until", metavar="TIME", help="to (exclusive), same forms")

    demo = sub.add_parser(
        "demo", help="private PostgreSQL + PgBouncer + Scalple, a workload, the audit log"
    )
    demo.add_argument("--json", action="store_true", help="print the records as JSON lines")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"scalple: configuration error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"scalple: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0  # the reader (head, less) went away


if __name__ == "__main__":
    sys.exit(main())
