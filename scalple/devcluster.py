"""Disposable PostgreSQL 15 clusters and PgBouncer instances for tests, benchmarks and demos.

Scalple sits between real clients and a real server, so the only honest way to test it
is against a real PostgreSQL (with pgaudit preloaded, TLS on, and every password auth
method in use) and a real, *default-configured* PgBouncer.  This module starts such
processes in private temporary directories on free loopback ports, so test runs never
collide with each other or with a system PostgreSQL on 5432/6432, and removes every
trace (processes and files) afterwards, including when startup fails half-way.

PostgreSQL and PgBouncer refuse to run as root, and CI containers usually run as root,
so server-side commands are executed as the ``postgres`` OS user via ``runuser`` in
that case; the temporary directories are chowned to that user for the same reason.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "DEFAULT_ROLES",
    "DevClusterError",
    "PgBouncer",
    "PostgresCluster",
    "PsqlError",
    "Role",
    "free_port",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"
SERVER_OS_USER = "postgres"
"""OS account used for server processes when we are root (initdb/postgres/pgbouncer refuse root)."""
SUPERUSER = "postgres"
"""Bootstrap superuser created by initdb; used for all administrative psql calls."""

_AUTH_METHODS = frozenset({"trust", "password", "md5", "scram-sha-256"})
_LOG_TAIL_LINES = 40
# Auto-picked ports can be stolen between free_port() and bind(); retry that many times.
_PORT_ATTEMPTS = 3


class DevClusterError(RuntimeError):
    """A dev cluster / bouncer could not be started, stopped or queried."""


class PsqlError(DevClusterError):
    """psql exited non-zero; carries the exit code and stderr for assertions in tests."""

    def __init__(self, message: str, returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class Role:
    """A login role and the pg_hba method that PostgreSQL enforces for it over TCP.

    Each role gets its own hba line so that every authentication method the proxy must
    relay (trust, cleartext, md5, SCRAM) is exercised by simply choosing a user.
    """

    name: str
    password: str | None
    auth: str  # "trust" | "password" | "md5" | "scram-sha-256"

    def __post_init__(self) -> None:
        if self.auth not in _AUTH_METHODS:
            raise ValueError(f"role {self.name!r}: unsupported auth method {self.auth!r}")
        if self.auth != "trust" and self.password is None:
            raise ValueError(f"role {self.name!r}: auth {self.auth!r} needs a password")


DEFAULT_ROLES: tuple[Role, ...] = (
    Role("postgres", None, "trust"),
    Role("app_user", "app_pass", "scram-sha-256"),
    Role("md5_user", "md5_pass", "md5"),
    Role("pw_user", "pw_pass", "password"),
    Role("trust_user", None, "trust"),
)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The kernel picks it (bind to port 0), so parallel test sessions do not collide.
    There is an unavoidable race until the real server binds it; callers that picked
    the port automatically retry on "address in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP connections, else raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{host}:{port} did not accept TCP connections within {timeout:.1f}s "
                f"(last error: {last_error})"
            )
        time.sleep(0.02)


def _find_bindir() -> Path:
    """Locate the PostgreSQL 15 server binaries (they are not on PATH on Debian)."""
    override = os.environ.get("SCALPLE_PG_BINDIR")
    candidates: list[Path] = [Path(override)] if override else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    raise DevClusterError(
        "PostgreSQL server binaries not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install postgresql-15 or set SCALPLE_PG_BINDIR"
    )


def _find_pgbouncer() -> str:
    exe = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
    )
    if exe is None:
        raise DevClusterError("pgbouncer executable not found; install the pgbouncer package")
    return exe


def _is_root() -> bool:
    return os.geteuid() == 0


def _server_ids() -> tuple[int, int] | None:
    """uid/gid to chown server files to, or None when we are not root (run as ourselves)."""
    if not _is_root():
        return None
    try:
        pw = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise DevClusterError(
            f"running as root but OS user {SERVER_OS_USER!r} does not exist; "
            "PostgreSQL and PgBouncer refuse to run as root"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _as_server_user(cmd: Sequence[str]) -> list[str]:
    """Prefix ``cmd`` with runuser when root, because the servers refuse to run as root."""
    if _is_root():
        return ["runuser", "-u", SERVER_OS_USER, "--", *cmd]
    return list(cmd)


def _chown_tree(root: Path) -> None:
    """Give the server OS user ownership of everything we wrote (no-op when not root)."""
    ids = _server_ids()
    if ids is None:
        return
    uid, gid = ids
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment without the caller's PG* variables, which would silently redirect libpq."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # English messages: we grep logs for "Address already in use"
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(data[-lines:]) if data else f"<{path} is empty>"


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie.

    The postmaster is daemonised by pg_ctl, so it is reparented to PID 1, which in
    containers often never reaps; a zombie must count as stopped.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # state is the first field after the parenthesised command name
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _conninfo(params: Mapping[str, str | int | None]) -> str:
    """Serialise libpq key=value conninfo, quoting values as libpq requires."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        sval = str(value)
        if sval == "" or any(c in sval for c in " '\\\t\n"):
            sval = "'" + sval.replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key}={sval}")
    return " ".join(parts)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _hba_token(name: str) -> str:
    """pg_hba.conf token; always quoted so role names like 'all' keep their literal meaning."""
    return '"' + name.replace('"', '""') + '"'


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file created with mode 0600 (PostgreSQL rejects group/world-readable keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    cwd: Path,
    log: Path | None = None,
    timeout: float = 60.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a helper command, raising DevClusterError with its output and the log tail."""
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,  # runuser keeps cwd; root's cwd may be unreadable for postgres
            env=_clean_env(),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        msg = f"{what}: timed out after {timeout}s: {' '.join(cmd)}"
        if log is not None:
            msg += f"\n--- tail of {log} ---\n{_tail(log)}"
        raise DevClusterError(msg) from exc
    if proc.returncode != 0:
        msg = (
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout.strip()}\n--- stderr ---\n{proc.stderr.strip()}"
        )
        if log is not None:
            msg += f"\n--- tail of {log} ---\n{_tail(log)}"
        raise DevClusterError(msg)
    return proc


# --------------------------------------------------------------------------- TLS


class _CertificateAuthority:
    """A throw-away CA so clients can use sslmode=verify-full against the dev servers.

    ECDSA P-256 keys are used because they generate in microseconds (RSA takes ~100 ms
    per key) and every libpq/OpenSSL/Python ssl build supports them.
    """

    def __init__(self, cert_path: Path, key_path: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.cert_path = cert_path
        self.key_path = key_path
        if cert_path.exists() and key_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise DevClusterError(f"{key_path}: expected an EC private key")
            self._key = loaded
            self._cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Scalple dev CA")])
        now = _dt.datetime.now(_dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            key_path,
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    def issue(
        self, cert_path: Path, key_path: Path, common_name: str, hosts: Iterable[str]
    ) -> None:
        """Write a server certificate for ``hosts`` (DNS names or IP addresses)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        now = _dt.datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


# --------------------------------------------------------------------------- base class


class _ManagedDir:
    """Owns the temporary directory and the "clean up even if the caller forgets" hook."""

    _prefix = "scalple-"

    def __init__(self, base_dir: Path | None) -> None:
        if base_dir is None:
            # /tmp keeps unix-socket paths well below the 107-byte sun_path limit.
            self.base_dir = Path(tempfile.mkdtemp(prefix=self._prefix))
            self._owns_dir = True
        else:
            self.base_dir = Path(base_dir).resolve()
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        self._cleaned = False
        # Safety net for callers that crash before cleanup(); unregistered in cleanup().
        atexit.register(self.cleanup)

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_server_user_access(self) -> None:
        """Fail early and clearly if the postgres OS user cannot reach our directory.

        pytest's tmp_path lives under a root-only 0700 directory, for example, which makes
        initdb fail with a confusing "could not change directory" message.
        """
        ids = _server_ids()
        if ids is None:
            return
        os.chown(self.base_dir, *ids)  # e.g. mkdtemp creates it 0700 and root-owned
        probe = subprocess.run(
            _as_server_user(["test", "-w", str(self.base_dir), "-a", "-x", str(self.base_dir)]),
            cwd="/",
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            raise DevClusterError(
                f"OS user {SERVER_OS_USER!r} cannot access {self.base_dir}; "
                "every parent directory must be traversable by it (use base_dir=None "
                "for a directory under /tmp)"
            )

    def cleanup(self) -> None:
        """Stop the process and delete the directory if we created it. Idempotent."""
        if self._cleaned:
            return
        try:
            self.stop()
        finally:
            self._cleaned = True
            atexit.unregister(self.cleanup)
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            # __exit__ is not called when __enter__ raises: clean up here.
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# --------------------------------------------------------------------------- PostgreSQL


class PostgresCluster(_ManagedDir):
    """A private PostgreSQL 15 cluster listening on 127.0.0.1 only.

    Layout of ``base_dir``: ``data/`` (PGDATA), ``sock/`` (unix socket), ``tls/`` (CA and
    server certificate), ``postgres.log``.  When ``base_dir`` is given it is kept (and an
    existing ``data/`` reused) so ``scalple demo`` can run against a persistent cluster.
    """

    _prefix = "scalple-pg-"

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        roles: Sequence[Role] = DEFAULT_ROLES,
        tls: bool = True,
        pgaudit: bool = True,
        max_connections: int = 700,
        fsync: bool = False,
        extra_conf: dict[str, str] | None = None,
        database: str = "app",
    ) -> None:
        self.host = LOOPBACK
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.roles: tuple[Role, ...] = tuple(roles)
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate role names: {names}")
        self.tls = tls
        self.pgaudit = pgaudit
        self.max_connections = max_connections
        self.fsync = fsync
        self.extra_conf = dict(extra_conf or {})
        self.database = database
        self.bindir = _find_bindir()
        super().__init__(base_dir)
        self.datadir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        tls_dir = self.base_dir / "tls"
        self.ca_cert: Path | None = tls_dir / "ca.crt" if tls else None
        self.ca_key: Path | None = tls_dir / "ca.key" if tls else None
        self.server_cert: Path | None = tls_dir / "server.crt" if tls else None
        self.server_key: Path | None = tls_dir / "server.key" if tls else None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """initdb (first time only), configure, start, and provision roles and database.

        Idempotent: calling it on a running cluster only re-applies role provisioning.
        """
        if self._cleaned:
            raise DevClusterError("cluster was cleaned up; create a new PostgresCluster")
        self._check_server_user_access()
        if not self.running:
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            self._write_tls()
            for attempt in range(_PORT_ATTEMPTS):
                self._write_config()
                _chown_tree(self.base_dir)
                try:
                    self._pg_ctl_start()
                    break
                except DevClusterError:
                    in_use = "Address already in use" in _tail(self.log_file, 20)
                    if self._auto_port and in_use and attempt + 1 < _PORT_ATTEMPTS:
                        self.port = free_port()
                        continue
                    raise
        self._provision()

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions, disconnects clients). Idempotent."""
        pid = self._read_pid()
        if pid is None:
            return
        if _pid_alive(pid):
            for mode in ("fast", "immediate"):
                with contextlib.suppress(DevClusterError):
                    _run(
                        _as_server_user(
                            [
                                str(self.bindir / "pg_ctl"),
                                "-D",
                                str(self.datadir),
                                "-m",
                                mode,
                                "-w",
                                "-t",
                                "30",
                                "stop",
                            ]
                        ),
                        what=f"pg_ctl stop -m {mode}",
                        cwd=self.base_dir,
                        timeout=40,
                    )
                if _wait_pid_gone(pid, 5):
                    break
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_pid_gone(pid, 5)
        # A stale pid file (e.g. after SIGKILL) would make `running` lie.
        if not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                (self.datadir / "postmaster.pid").unlink()

    @property
    def running(self) -> bool:
        """Whether the postmaster recorded in postmaster.pid is alive."""
        pid = self._read_pid()
        return pid is not None and _pid_alive(pid)

    def pid(self) -> int:
        """PID of the postmaster (for tests that check no process is left behind)."""
        pid = self._read_pid()
        if pid is None:
            raise DevClusterError(f"cluster in {self.datadir} is not running")
        return pid

    # -- client helpers ------------------------------------------------------------

    def role(self, name: str) -> Role:
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(f"unknown role {name!r}; known: {[r.name for r in self.roles]}")

    def dsn(self, user: str = "app_user", database: str = "app", **extra: str) -> str:
        """libpq key=value conninfo including the role's password; ``extra`` overrides.

        Pass e.g. ``sslmode="verify-full", sslrootcert=str(cluster.ca_cert),
        host="localhost"`` for certificate-verified TLS.
        """
        password = self.role(user).password if any(r.name == user for r in self.roles) else None
        params: dict[str, str | int | None] = {
            "host": self.host,
            "port": self.port,
            "dbname": database,
            "user": user,
            "password": password,
        }
        params.update(extra)
        return _conninfo(params)

    def psql(
        self, sql: str, *, user: str = "postgres", database: str = "app", check: bool = True
    ) -> str:
        """Run ``sql`` through psql over TCP (unaligned, tuples only); return stripped stdout.

        SQL is fed on stdin so multi-statement scripts and psql meta-commands work and
        each statement runs in its own transaction (CREATE DATABASE needs that).
        """
        return self._psql(sql, user=user, database=database, check=check)

    def issue_cert(
        self, name: str, hosts: Iterable[str] = ("localhost", LOOPBACK, "::1")
    ) -> tuple[Path, Path]:
        """Issue a certificate signed by this cluster's CA (e.g. for Scalple's listener).

        Returns (cert, key) paths; clients can then verify both the proxy and the server
        with the single ``ca_cert``.
        """
        if self.ca_cert is None or self.ca_key is None:
            raise DevClusterError("cluster was created with tls=False")
        self._write_tls()
        out_dir = self.base_dir / "tls"
        cert, key = out_dir / f"{name}.crt", out_dir / f"{name}.key"
        _CertificateAuthority(self.ca_cert, self.ca_key).issue(cert, key, name, hosts)
        return cert, key

    # -- internals -----------------------------------------------------------------

    def _read_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _initdb(self) -> None:
        _chown_tree(self.base_dir)
        _run(
            _as_server_user(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",  # throw-away cluster: skip fsync of ~1000 files
                    "--no-instructions",
                ]
            ),
            what="initdb",
            cwd=self.base_dir,
            timeout=120,
        )
        # Our settings live in an included file so they can be rewritten on every start
        # (the port may change) without touching initdb's generated defaults.
        with (self.datadir / "postgresql.conf").open("a") as fh:
            fh.write("\n# added by scalple.devcluster\ninclude 'scalple.conf'\n")

    def _write_tls(self) -> None:
        if not self.tls:
            return
        assert self.ca_cert and self.ca_key and self.server_cert and self.server_key
        self.ca_cert.parent.mkdir(exist_ok=True)
        if self.server_cert.exists() and self.server_key.exists() and self.ca_cert.exists():
            return
        ca = _CertificateAuthority(self.ca_cert, self.ca_key)
        ca.issue(self.server_cert, self.server_key, "localhost", ("localhost", LOOPBACK, "::1"))

    def _write_config(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        conf: dict[str, str] = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": str(self.max_connections),
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "timezone": "UTC",
        }
        if self.pgaudit:
            conf["shared_preload_libraries"] = "pgaudit"
            # Loaded but silent by default; tests opt in with ALTER SYSTEM / SET.
            conf["pgaudit.log"] = "none"
        if self.tls:
            assert self.server_cert and self.server_key
            conf["ssl"] = "on"
            conf["ssl_cert_file"] = str(self.server_cert)
            conf["ssl_key_file"] = str(self.server_key)
        else:
            conf["ssl"] = "off"
        if not self.fsync:
            conf.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        conf.update(self.extra_conf)
        lines = ["# generated by scalple.devcluster on every start; edits are lost"]
        lines += [f"{k} = {_conf_value(v)}" for k, v in conf.items()]
        (self.datadir / "scalple.conf").write_text("\n".join(lines) + "\n")

        hba = [
            "# generated by scalple.devcluster",
            f"local all {_hba_token(SUPERUSER)} trust",
        ]
        for role in self.roles:
            for net in ("127.0.0.1/32", "::1/128"):
                hba.append(f"host all {_hba_token(role.name)} {net} {role.auth}")
        if not any(r.name == SUPERUSER for r in self.roles):
            # Administrative psql calls connect as the superuser over TCP.
            for net in ("127.0.0.1/32", "::1/128"):
                hba.append(f"host all {_hba_token(SUPERUSER)} {net} trust")
        hba += [
            "host all all 127.0.0.1/32 scram-sha-256",
            "host all all ::1/128 scram-sha-256",
        ]
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _pg_ctl_start(self) -> None:
        _run(
            _as_server_user(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            what=f"pg_ctl start (port {self.port})",
            cwd=self.base_dir,
            log=self.log_file,
            timeout=90,
        )

    def _psql(
        self,
        sql: str,
        *,
        user: str,
        database: str,
        check: bool,
        password: str | None = None,
    ) -> str:
        if password is None and any(r.name == user for r in self.roles):
            password = self.role(user).password
        env_extra = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "scalple-devcluster"}
        if password is not None:
            env_extra["PGPASSWORD"] = password
        cmd = [
            str(self.bindir / "psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            database,
            "-f",
            "-",
        ]
        proc = subprocess.run(
            cmd,
            input=sql,
            capture_output=True,
            text=True,
            env=_clean_env(env_extra),
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise PsqlError(
                f"psql as {user}@{database} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()}\n--- sql ---\n{sql}",
                proc.returncode,
                proc.stdout,
                proc.stderr,
            )
        return proc.stdout.strip()

    def _provision(self) -> None:
        """Create roles, passwords and the database in one psql round trip (idempotent).

        md5_user's password must be *stored* as an md5 hash, otherwise PostgreSQL silently
        upgrades the md5 hba method to SCRAM and the md5 code path is never exercised.
        """
        sql: list[str] = []
        for role in self.roles:
            if role.name == SUPERUSER:
                continue
            sql.append(
                f"SELECT format('CREATE ROLE %I LOGIN', {_quote_literal(role.name)}) "
                f"WHERE NOT EXISTS (SELECT 1 FROM pg_roles "
                f"WHERE rolname = {_quote_literal(role.name)})\n\\gexec"
            )
        for role in self.roles:
            ident = _quote_ident(role.name)
            if role.password is None:
                sql.append(f"ALTER ROLE {ident} LOGIN PASSWORD NULL;")
                continue
            method = "md5" if role.auth == "md5" else "scram-sha-256"
            sql.append(f"SET password_encryption = '{method}';")
            sql.append(f"ALTER ROLE {ident} LOGIN PASSWORD {_quote_literal(role.password)};")
        sql.append("RESET password_encryption;")
        owner = "app_user" if any(r.name == "app_user" for r in self.roles) else SUPERUSER
        db_lit = _quote_literal(self.database)
        sql.append(
            f"SELECT format('CREATE DATABASE %I OWNER %I', {db_lit}, {_quote_literal(owner)}) "
            f"WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = {db_lit})\n\\gexec"
        )
        grantees = ", ".join(_quote_ident(r.name) for r in self.roles if r.name != SUPERUSER)
        if grantees:
            sql.append(
                f"GRANT CONNECT, TEMPORARY ON DATABASE {_quote_ident(self.database)} TO {grantees};"
            )
            sql.append(f"\\connect {_quote_ident(self.database)}")
            sql.append(f"GRANT USAGE, CREATE ON SCHEMA public TO {grantees};")
        try:
            self._psql(
                "\n".join(sql) + "\n",
                user=SUPERUSER,
                database="postgres",
                check=True,
                password=self._superuser_password(),
            )
        except PsqlError as exc:
            raise DevClusterError(
                f"provisioning roles failed: {exc}\n--- tail of {self.log_file} ---\n"
                f"{_tail(self.log_file)}"
            ) from exc

    def _superuser_password(self) -> str | None:
        for role in self.roles:
            if role.name == SUPERUSER:
                return role.password
        return None


# --------------------------------------------------------------------------- PgBouncer


class PgBouncer(_ManagedDir):
    """A PgBouncer in front of a PostgresCluster, configured as close to defaults as possible.

    ``ignore_startup_parameters`` is deliberately left at its default: Scalple must
    forward a startup packet that a stock PgBouncer accepts.
    """

    _prefix = "scalple-pgb-"

    def __init__(
        self,
        upstream: PostgresCluster,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        max_client_conn: int = 1000,
        auth_type: str = "scram-sha-256",
        extra_ini: dict[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.host = LOOPBACK
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.auth_type = auth_type
        self.extra_ini = dict(extra_ini or {})
        self.executable = _find_pgbouncer()
        super().__init__(base_dir)
        self.ini_path = self.base_dir / "pgbouncer.ini"
        self.userlist_path = self.base_dir / "userlist.txt"
        self.pid_file = self.base_dir / "pgbouncer.pid"
        self.log_file = self.base_dir / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # libpq never sends an empty password, so with a password-based auth_type a
        # trust role ("" in userlist.txt) cannot log in to PgBouncer.  The admin console
        # user therefore gets a random password when its upstream role has none; the
        # server still trusts it, so this only affects the client side of PgBouncer.
        self.admin_password = secrets.token_urlsafe(16)

    def start(self) -> None:
        """Write config, launch pgbouncer in the foreground and wait until it accepts TCP."""
        if self._cleaned:
            raise DevClusterError("bouncer was cleaned up; create a new PgBouncer")
        if self.running:
            return
        self._check_server_user_access()
        for attempt in range(_PORT_ATTEMPTS):
            self._write_config()
            _chown_tree(self.base_dir)
            try:
                self._launch()
                return
            except DevClusterError:
                in_use = "Address already in use" in _tail(self.log_file, 20)
                if self._auto_port and in_use and attempt + 1 < _PORT_ATTEMPTS:
                    self.port = free_port()
                    continue
                raise

    def stop(self) -> None:
        """SIGTERM, escalating to SIGKILL after 5 s (newer PgBouncers wait for clients)."""
        proc, self._proc = self._proc, None
        pid = self._read_pid()
        target = pid if pid is not None and _pid_alive(pid) else None
        if target is None and proc is not None and proc.poll() is None:
            target = proc.pid  # runuser forwards SIGTERM to its child
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)
            if not _wait_pid_gone(target, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
                _wait_pid_gone(target, 5)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pid(self) -> int:
        """PID of the pgbouncer process itself (not of the runuser wrapper)."""
        pid = self._read_pid()
        if pid is None or not self.running:
            raise DevClusterError("pgbouncer is not running")
        return pid

    def dsn(self, user: str = "app_user", database: str = "app", **extra: str) -> str:
        """Conninfo for connecting through the bouncer with the upstream role's password."""
        password = self._password(user)
        params: dict[str, str | int | None] = {
            "host": self.host,
            "port": self.port,
            "dbname": database,
            "user": user,
            "password": password,
        }
        params.update(extra)
        return _conninfo(params)

    # -- internals -----------------------------------------------------------------

    def _password(self, user: str) -> str | None:
        """Password clients use for ``user``; the admin user always gets one (see __init__)."""
        password = next((r.password for r in self.upstream.roles if r.name == user), None)
        if password is None and user == SUPERUSER:
            return self.admin_password
        return password

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _write_config(self) -> None:
        def q(value: str) -> str:
            return '"' + value.replace('"', '""') + '"'

        # Plain-text passwords let PgBouncer do SCRAM with clients *and* any method
        # (scram/md5/password) with the server; trust roles get "".
        users = [f"{q(r.name)} {q(self._password(r.name) or '')}" for r in self.upstream.roles]
        if not any(r.name == SUPERUSER for r in self.upstream.roles):
            users.append(f"{q(SUPERUSER)} {q(self.admin_password)}")
        self.userlist_path.write_text("\n".join(users) + "\n")
        os.chmod(self.userlist_path, 0o600)

        settings: dict[str, str] = {
            "listen_addr": LOOPBACK,
            "listen_port": str(self.port),
            "unix_socket_dir": str(self.base_dir),
            "auth_type": self.auth_type,
            "auth_file": str(self.userlist_path),
            "admin_users": SUPERUSER,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": str(self.max_client_conn),
            "pidfile": str(self.pid_file),
            "server_tls_sslmode": "disable",
        }
        settings.update(self.extra_ini)
        lines = [
            "; generated by scalple.devcluster",
            "[databases]",
            f"* = host={self.upstream.host} port={self.upstream.port}",
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]
        self.ini_path.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()  # a stale pid file makes pgbouncer refuse to start
        log: IO[bytes]
        with self.log_file.open("ab") as log:
            # Foreground + stderr to our log: no logfile setting, so startup errors
            # (bad ini, port in use) end up in the same place as runtime logs.
            self._proc = subprocess.Popen(
                _as_server_user([self.executable, str(self.ini_path)]),
                cwd=self.base_dir,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in pytest must not kill it mid-teardown
            )
        deadline = time.monotonic() + 15
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise DevClusterError(
                    f"pgbouncer exited during startup (exit {rc}) on port {self.port}\n"
                    f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
                )
            if self._read_pid() is not None:
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        pass
                except OSError:
                    pass
                else:
                    if self._proc.poll() is None:
                        return
                    continue  # someone else owns the port and we died: report above
            if time.monotonic() >= deadline:
                self.stop()
                raise DevClusterError(
                    f"pgbouncer did not accept connections on {self.host}:{self.port} "
                    f"within 15s\n--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
                )
            time.sleep(0.02)
