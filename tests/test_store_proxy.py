"""The store under the real proxy: crashes under load, full disks, verify.

These are the promises a DPO relies on: a statement whose answer reached the
client is in the log after any crash (strict durability); when the disk
fills, statements are refused with 53100 (block) or the loss is counted and
written down (continue); and ``scalple verify`` passes afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scalple.devcluster import PostgresCluster, free_port
from scalple.devproxy import ScalpleServer
from scalple.store.keys import VerifierKey
from scalple.store.verify import verify_log
from tests.conftest import init_pgbench


def _verify(log_dir: Path) -> None:
    key = VerifierKey.load(log_dir / "keys" / "signing.pub")
    reports = verify_log(log_dir, [key])
    assert reports and reports[0].records > 0


def _dsn(proxy: ScalpleServer, pg: PostgresCluster, user: str = "marker") -> str:
    return proxy.dsn(
        user="app_user",
        password="app_pass",
        dbname="app",
        options=f"-c scalple.user_id={user}",
        connect_timeout="5",
    )


class _Markers(threading.Thread):
    """A client that runs numbered statements and notes each one answered."""

    def __init__(self, dsn: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.prefix = prefix
        self.answered: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        number = 0
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.dsn, autocommit=True) as c:
            while not self.stop.is_set():
                number += 1
                text = f"select '{self.prefix}-{number}'"
                c.execute(text).fetchall()
                self.answered.append(text)


def _pgbench(pg: PostgresCluster, proxy: ScalpleServer, seconds: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGPASSWORD": "app_pass",
        "PGOPTIONS": "-c scalple.user_id=bench-runner",
    }
    return subprocess.Popen(
        [
            str(pg.bindir / "pgbench"),
            "-n",
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            str(seconds),
            "-h",
            proxy.host,
            "-p",
            str(proxy.port),
            "-U",
            "app_user",
            "bench_store",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def bench_db(pg: PostgresCluster) -> str:
    return init_pgbench(pg, "bench_store")


def test_strict_mode_survives_kill_9_under_pgbench(
    pg: PostgresCluster, bench_db: str, tmp_path: Path
) -> None:
    """Three rounds of: pgbench plus a marker client through a strict-mode
    proxy, SIGKILL of the proxy and its worker mid-load, restart.  Every
    marker the client saw answered is in the log, and the log verifies."""
    config = {
        "log": {"durability": "strict", "origin": "test/strict", "checkpoint_interval": 0.2},
        "analysis": {"enabled": False},
    }
    port = free_port()
    answered: set[str] = set()
    for round_number in range(3):
        proxy = ScalpleServer(f"{pg.host}:{pg.port}", tmp_path, config=config, port=port)
        proxy.start()
        load = _pgbench(pg, proxy, 30)
        markers = _Markers(_dsn(proxy, pg), f"marker-{round_number}")
        markers.start()
        time.sleep(1.5)
        proxy.kill()
        markers.stop.set()
        markers.join(10)
        load.kill()
        load.wait()
        assert markers.answered, "the marker client got no answer before the kill"
        answered.update(markers.answered)
        # A new proxy recovers the log (cuts a torn tail, signs a checkpoint).
        restarted = ScalpleServer(f"{pg.host}:{pg.port}", tmp_path, config=config, port=port)
        restarted.start()
        assert restarted.stop() == 0
        _verify(tmp_path / "log")
        logged = {r["query"] for r in restarted.records() if r.get("query")}
        missing = answered - logged
        assert not missing, f"answered but not in the log: {sorted(missing)[:5]}"
    assert len(answered) > 30


@contextlib.contextmanager
def _tiny_filesystem(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system until a write fails; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, block)
    finally:
        os.close(fd)
    return filler


def _run_until(dsn: str, want: str, timeout: float = 20.0) -> list[str]:
    """Run numbered statements on fresh transactions until one ends in
    ``want`` ('ok' or a SQLSTATE); returns the outcome of each."""
    outcomes: list[str] = []
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        number = 0
        while time.monotonic() < deadline:
            number += 1
            try:
                conn.execute(f"select 'fill-{number}'").fetchall()
                outcomes.append("ok")
            except psycopg.Error as exc:
                outcomes.append(exc.sqlstate or "?")
                if exc.sqlstate == "53100":
                    assert "audit log cannot be written" in str(exc)
            if outcomes[-1] == want:
                return outcomes
            time.sleep(0.01)
    raise AssertionError(f"never got {want}: {outcomes[-20:]}")


def test_full_disk_with_block_refuses_statements_then_resumes(
    pg: PostgresCluster, tmp_path: Path
) -> None:
    with _tiny_filesystem(tmp_path / "tiny", "2m") as tiny:
        config = {
            "log": {"dir": str(tiny / "log"), "on_failure": "block", "origin": "test/full"},
            "analysis": {"enabled": False},
        }
        with ScalpleServer(f"{pg.host}:{pg.port}", tmp_path / "proxy", config=config) as proxy:
            proxy.log_dir = tiny / "log"
            dsn = _dsn(proxy, pg, "filler")
            assert _run_until(dsn, "ok")[-1] == "ok"
            filler = _fill(tiny)
            refused = _run_until(dsn, "53100")
            # A second client is refused too, with the same clear error.
            with pytest.raises(psycopg.Error) as other, psycopg.connect(dsn) as conn:
                conn.execute("select 'other client'")
            assert other.value.sqlstate == "53100"
            filler.unlink()
            resumed = _run_until(dsn, "ok")
            assert proxy.log_contains("refusing new statements with 53100")
        records = proxy.records()
        answered_ok = refused.count("ok") + resumed.count("ok") + 1
        fills = [r for r in records if (r.get("query") or "").startswith("select 'fill-")]
        assert sum(1 for r in fills if r["status"] == "ok") >= answered_ok
        assert any(r["sqlstate"] == "53100" for r in fills), "refusals are recorded too"
        _verify(tiny / "log")


def test_full_disk_with_continue_counts_and_records_the_loss(
    pg: PostgresCluster, tmp_path: Path
) -> None:
    metrics_port = free_port()
    with _tiny_filesystem(tmp_path / "tiny", "2m") as tiny:
        config = {
            "log": {"dir": str(tiny / "log"), "on_failure": "continue", "origin": "test/lossy"},
            "analysis": {"enabled": False},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        }
        with ScalpleServer(f"{pg.host}:{pg.port}", tmp_path / "proxy", config=config) as proxy:
            proxy.log_dir = tiny / "log"
            dsn = _dsn(proxy, pg, "lossy")
            filler = _fill(tiny)
            with psycopg.connect(dsn, autocommit=True) as conn:
                for number in range(200):
                    conn.execute(f"select 'lost-{number}'").fetchall()  # never refused
            lost = 0.0
            deadline = time.monotonic() + 10
            while lost == 0 and time.monotonic() < deadline:
                lost = _metric(metrics_port, "scalple_audit_records_lost_total")
                time.sleep(0.1)
            assert lost > 0
            # (The failing gauge may already be back to 0: a failed write is
            # cut back, which frees blocks a small write can then use.)
            assert _metric(metrics_port, "scalple_audit_write_failures_total") > 0
            assert proxy.log_contains("AUDIT RECORDS LOST")
            filler.unlink()
            _run_until(dsn, "ok")
            proxy.wait_for_records(
                lambda rs: any(r["kind"] == "records_lost" for r in rs), kind=None, timeout=30
            )
        markers = [r for r in proxy.records(None) if r["kind"] == "records_lost"]
        assert markers[0]["statements"] >= 1
        assert "could not be written" in markers[0]["reason"]
        _verify(tiny / "log")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_cli_verify_passes_on_a_live_log(pg: PostgresCluster, tmp_path: Path) -> None:
    """``scalple verify`` while the proxy writes, then ``prove`` one record;
    the mirrored checkpoint is a witness the log must match."""
    mirror = tmp_path / "mirror"
    config = {
        "log": {"origin": "test/cli", "checkpoint_interval": 0.1, "checkpoint_mirror": mirror}
    }
    with ScalpleServer(f"{pg.host}:{pg.port}", tmp_path, config=config) as proxy:
        with psycopg.connect(_dsn(proxy, pg, "cli"), autocommit=True) as conn:
            for number in range(50):
                conn.execute(f"select 'cli-{number}'").fetchall()
            pub = str(proxy.log_dir / "keys" / "signing.pub")
            verify = [sys.executable, "-m", "scalple", "verify", "--log-dir", str(proxy.log_dir)]
            for _ in range(3):
                conn.execute("select 'during verify'").fetchall()
                result = subprocess.run(
                    [*verify, "--pubkey", pub], capture_output=True, text=True, timeout=60
                )
                assert result.returncode == 0, result.stdout + result.stderr
                assert result.stdout.startswith("OK test/cli")
        records = proxy.wait_for_records(lambda rs: len(rs) >= 53)
        time.sleep(0.3)  # signed within checkpoint_interval
        proof = subprocess.run(
            [
                sys.executable,
                "-m",
                "scalple",
                "prove",
                records[10]["log_id"],
                "--log-dir",
                str(proxy.log_dir),
                "--pubkey",
                pub,
            ],
            capture_output=True,
            timeout=60,
        )
        assert proof.returncode == 0, proof.stderr
        checked = subprocess.run(
            [sys.executable, "-m", "scalple", "verify-proof", "-", "--pubkey", pub],
            input=proof.stdout,
            capture_output=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert records[10]["log_id"] in checked.stdout.decode()
        _auditor_script_agrees(proof.stdout, pub, tmp_path)
    witness = mirror / "test_cli" / "checkpoint"
    assert (mirror / "test_cli" / "checkpoints").read_bytes().count(b"test/cli\n") >= 2
    result = subprocess.run(
        [*verify, "--pubkey", pub, "--checkpoint", str(witness)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "given checkpoint(s) consistent" in result.stdout


def _auditor_script_agrees(proof: bytes, pub: str, tmp_path: Path) -> None:
    """The 30-line check in docs/verifying.md accepts the proof, and refuses
    it once one byte of the record is changed."""
    text = (Path(__file__).parent.parent / "docs" / "verifying.md").read_text()
    script = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "check.py").write_text(script)
    (tmp_path / "proof.json").write_bytes(proof)
    run = [sys.executable, str(tmp_path / "check.py"), str(tmp_path / "proof.json"), pub]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("OK:"), result.stderr
    document = json.loads(proof)
    record = bytearray(base64.b64decode(document["record"]))
    record[-1] ^= 1
    document["record"] = base64.b64encode(bytes(record)).decode()
    (tmp_path / "proof.json").write_text(json.dumps(document))
    result = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "do not match the leaf hash" in result.stderr
