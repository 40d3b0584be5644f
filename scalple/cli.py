"""The ``scalple`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from scalple import __version__
from scalple.config import Config, ConfigError, load_config

__all__ = ["main"]

log = logging.getLogger("scalple")


def _serve_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        server__listen=args.listen,
        upstream__address=args.upstream,
        log__dir=args.log_dir,
    )


async def _serve(config: Config, verbose: bool) -> int:
    from scalple.proxy.listener import Proxy
    from scalple.sink.audit import AuditSink

    loop = asyncio.get_running_loop()
    sink = AuditSink(config, verbose=verbose)
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
    serve.set_defaults(func=_cmd_serve)

    log_cmd = sub.add_parser("log", help="read the audit log")
    log_sub = log_cmd.add_subparsers(dest="log_command", required=True)
    for name, func, text in (
        ("tail", _cmd_log_tail, "the latest records, human-readable"),
        ("export", _cmd_log_export, "records as JSON lines, one object per line"),
    ):
        p = log_sub.add_parser(name, help=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--log-dir", metavar="DIR", help="the audit log directory")
        where.add_argument("--config", help="TOML configuration file; its [log] dir is read")
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
