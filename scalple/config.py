"""The one configuration file: a TOML document checked against a msgspec schema.

Every key is documented in docs/configuration.md.  Unknown keys and values of
the wrong type are errors that name the key (``$.server.listen``), because a
typo in an audit proxy's configuration must never silently turn a feature off.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

__all__ = [
    "AnalysisConfig",
    "CatalogConfig",
    "Config",
    "ConfigError",
    "IdentityConfig",
    "LogConfig",
    "MaskingConfig",
    "MetricsConfig",
    "ServerConfig",
    "UpstreamConfig",
    "load_config",
    "log_origin",
    "parse_address",
    "parse_duration",
]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and key."""


Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(ge=1024)]


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[server]``: the client-facing listener."""

    listen: str = "127.0.0.1:6543"
    max_client_conn: Annotated[int, msgspec.Meta(ge=1)] = 1000
    max_message_size: Bytes = 256 * 1024 * 1024
    startup_timeout: Seconds = 10.0
    shutdown_timeout: Seconds = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    write_buffer_high: Bytes = 256 * 1024


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[upstream]``: PgBouncer or PostgreSQL behind the proxy."""

    address: str = "127.0.0.1:6432"
    connect_timeout: Seconds = 5.0
    tls: Literal["disable", "require", "verify-full"] = "disable"
    tls_ca_file: str | None = None
    tls_server_name: str | None = None


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[log]``: where and how audit records are written and kept."""

    dir: str = "scalple-log"
    capture_limit: Bytes = 1024 * 1024
    max_pending: Annotated[int, msgspec.Meta(ge=100)] = 100_000
    flush_interval: Seconds = 0.005
    origin: str = ""
    signing_key: str | None = None
    checkpoint_mirror: str | None = None
    durability: Literal["async", "strict"] = "async"
    sync_interval: Annotated[float, msgspec.Meta(gt=0, le=0.01)] = 0.01
    on_failure: Literal["block", "continue"] = "block"
    segment_size: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024
    segment_age: str = "1h"
    checkpoint_interval: Seconds = 1.0
    checkpoint_records: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    retention: str = ""
    literals: Literal["pii", "all", "none"] = "pii"


class IdentityConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[identity]``: who may run statements, and how tokens are checked."""

    require: Literal["verified", "any", "none"] = "none"
    exempt_roles: list[str] = msgspec.field(default_factory=list)
    hs256_secret_file: str | None = None
    public_key_file: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway: Annotated[float, msgspec.Meta(ge=0)] = 30.0


class CatalogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[catalog]``: where the analysis reads table and column definitions."""

    enabled: bool = True
    dsn: str = ""
    password_file: str | None = None
    refresh_interval: Seconds = 300.0


class AnalysisConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[analysis]``: the statement analysis cache."""

    enabled: bool = True
    cache_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000


class MaskingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[masking]``: the key of pseudonyms and subject tags, and bounds."""

    key_file: str | None = None
    subjects_limit: Annotated[int, msgspec.Meta(ge=0)] = 1_000


Mask = Literal["email", "partial", "redact", "pseudonym"]


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[metrics]``: the Prometheus endpoint (off when ``listen`` is empty)."""

    listen: str = ""


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole file; each table has defaults, so an empty file is valid."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    identity: IdentityConfig = msgspec.field(default_factory=IdentityConfig)
    catalog: CatalogConfig = msgspec.field(default_factory=CatalogConfig)
    analysis: AnalysisConfig = msgspec.field(default_factory=AnalysisConfig)
    pii: dict[str, Mask] = msgspec.field(default_factory=dict)
    subjects: dict[str, str] = msgspec.field(default_factory=dict)
    masking: MaskingConfig = msgspec.field(default_factory=MaskingConfig)


_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, key: str = "duration") -> float:
    """Seconds in ``90s``, ``15m``, ``12h``, ``400d``; the error names ``key``."""
    text = text.strip()
    number, unit = text[:-1], text[-1:]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ConfigError(f"{key}: expected a duration like 90s, 15m, 12h or 400d, got {text!r}")
    return value * _UNITS[unit]


def log_origin(config: LogConfig) -> str:
    """The origin line of this proxy's checkpoints: configured, else the host's."""
    return config.origin or f"{socket.gethostname()}/scalple"


def parse_address(text: str, *, key: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); the error names ``key``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _validate(config: Config, source: str) -> Config:
    parse_address(config.server.listen, key=f"{source}: $.server.listen")
    parse_address(config.upstream.address, key=f"{source}: $.upstream.address")
    parse_duration(config.log.segment_age, key=f"{source}: $.log.segment_age")
    if config.log.retention:
        parse_duration(config.log.retention, key=f"{source}: $.log.retention")
    if config.log.origin and (
        config.log.origin != config.log.origin.strip() or not config.log.origin.isprintable()
    ):
        raise ConfigError(f"{source}: $.log.origin: printable text without edge spaces, please")
    for table, columns in (("pii", config.pii), ("subjects", config.subjects)):
        for column in columns:
            if len(column.split(".")) != 3 or not all(column.split(".")):
                raise ConfigError(f"{source}: $.{table}[{column!r}]: expected schema.table.column")
    for column, kind in config.subjects.items():
        if not kind or not kind.isprintable():
            raise ConfigError(f"{source}: $.subjects[{column!r}]: a subject kind like 'customer'")
    keyed = config.subjects or "pseudonym" in config.pii.values()
    if keyed and config.masking.key_file is None:
        raise ConfigError(
            f"{source}: $.masking.key_file is needed for [subjects] and pseudonym masks "
            "(a file with at least 32 secret bytes)"
        )
    if config.metrics.listen:
        parse_address(config.metrics.listen, key=f"{source}: $.metrics.listen")
    if (config.server.tls_cert is None) != (config.server.tls_key is None):
        raise ConfigError(f"{source}: $.server.tls_cert and $.server.tls_key go together")
    for key, path in (
        ("server.tls_cert", config.server.tls_cert),
        ("server.tls_key", config.server.tls_key),
        ("upstream.tls_ca_file", config.upstream.tls_ca_file),
        ("identity.hs256_secret_file", config.identity.hs256_secret_file),
        ("identity.public_key_file", config.identity.public_key_file),
        ("catalog.password_file", config.catalog.password_file),
        ("log.signing_key", config.log.signing_key),
        ("masking.key_file", config.masking.key_file),
    ):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{source}: $.{key}: no such file {path!r}")
    if config.identity.require == "verified" and not (
        config.identity.hs256_secret_file or config.identity.public_key_file
    ):
        raise ConfigError(
            f"{source}: $.identity.require = 'verified' needs $.identity.hs256_secret_file "
            "or $.identity.public_key_file"
        )
    if config.upstream.tls == "verify-full" and config.upstream.tls_ca_file is None:
        raise ConfigError(f"{source}: $.upstream.tls = 'verify-full' needs $.upstream.tls_ca_file")
    return config


def load_config(path: str | Path | None = None, **overrides: str | None) -> Config:
    """Read ``path`` (or start from defaults) and apply command-line overrides.

    ``overrides`` use dotted keys with underscores for dots, e.g.
    ``server__listen="0.0.0.0:6543"``; None values are ignored.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, object] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such configuration file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        table, _, key = dotted.partition("__")
        section = raw.setdefault(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: $.{table} must be a table")
        section[key] = value
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return _validate(config, source)
