"""The configuration file and the command line: errors name the bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from scalple.config import ConfigError, load_config
from scalple.devcluster import PostgresCluster, free_port
from scalple.query.reader import LogReader
from scalple.store.keys import VerifierKey
from scalple.store.verify import verify_log


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scalple.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.server.listen == "127.0.0.1:6543"
    assert config.upstream.tls == "disable"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown field `listne`.*\$\.server"):
        load_config(write(tmp_path, '[server]\nlistne = "127.0.0.1:1"\n'))


def test_unknown_table_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown field `upstrem`"):
        load_config(write(tmp_path, "[upstrem]\naddress = 'x:1'\n"))


def test_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Expected `int`.*\$\.server\.max_client_conn"):
        load_config(write(tmp_path, "[server]\nmax_client_conn = 'many'\n"))


def test_bad_enum_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.upstream\.tls"):
        load_config(write(tmp_path, "[upstream]\ntls = 'maybe'\n"))


def test_bad_address_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.upstream\.address: expected HOST:PORT"):
        load_config(write(tmp_path, "[upstream]\naddress = 'nowhere'\n"))


def test_missing_cert_file_is_named(tmp_path: Path) -> None:
    text = f"[server]\ntls_cert = '{tmp_path}/no.crt'\ntls_key = '{tmp_path}/no.key'\n"
    with pytest.raises(ConfigError, match=r"\$\.server\.tls_cert: no such file"):
        load_config(write(tmp_path, text))


def test_verify_full_needs_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_ca_file"):
        load_config(write(tmp_path, "[upstream]\ntls = 'verify-full'\n"))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"))


def test_overrides_win(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "[server]\nlisten = '127.0.0.1:1'\n"),
        server__listen="127.0.0.1:2",
        upstream__address="10.0.0.1:5",
        log__dir=None,
    )
    assert config.server.listen == "127.0.0.1:2" and config.upstream.address == "10.0.0.1:5"


def test_cli_reports_config_error_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "scalple", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "bogus" in result.stderr


def test_serve_with_flags_and_no_config(tmp_path: Path, pg: PostgresCluster) -> None:
    """listen, upstream, log dir and a signing key from ``scalple keygen``:
    the log verifies with that key's public half and no key lands beside it."""
    port = free_port()
    log_dir = tmp_path / "log"
    keys = tmp_path / "keys"
    made = subprocess.run(
        [sys.executable, "-m", "scalple", "keygen", "--out", str(keys), "--name", "ops"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    assert (keys / "signing.key").stat().st_mode & 0o777 == 0o600
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scalple",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{pg.host}:{pg.port}",
            "--log-dir",
            str(log_dir),
            "--signing-key",
            str(keys / "signing.key"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert b"listening on" in proc.stdout.readline()
        with psycopg.connect(
            host="127.0.0.1", port=port, user="app_user", password="app_pass", dbname="app"
        ) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert not (log_dir / "keys").exists()
    reports = verify_log(log_dir, [VerifierKey.load(keys / "signing.pub")])
    assert reports[0].signed_size == reports[0].records
    statements = list(LogReader(log_dir).records())
    # psycopg wraps the query in BEGIN ... COMMIT
    assert [s["tag"] for s in statements] == [
        "BEGIN",
        "SELECT 1",
        "COMMIT",
    ]


def test_listen_port_in_use_is_a_clear_error(tmp_path: Path, pg: PostgresCluster) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalple",
            "serve",
            "--listen",
            f"127.0.0.1:{pg.port}",
            "--upstream",
            "127.0.0.1:1",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "cannot listen on" in result.stderr
