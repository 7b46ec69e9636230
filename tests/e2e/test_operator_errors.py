"""What an operator meets when a setting cannot work or a part is not there: one line naming
the variable or the address, and a non-zero exit, never a traceback; a ClickHouse server that
comes up after the aggregate service is waited for; credentials never cross the network in the
clear."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import clickhouse_connect
import pytest

from services.aggregate.migrate import migrations, render
from tests.support.chdb_http import ChdbHttpServer
from tests.support.procs import ROOT, Service, http, wait_counter, write_sites
from tests.support.tansu import Tansu, free_port

pytestmark = pytest.mark.e2e


def visitorstats(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``visitorstats ARGS`` to its end: (exit code, what it printed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_sites(workdir)
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=workdir,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "VISITORSTATS_SECRET": "test-secret",
            **(env or {}),
        },
        capture_output=True,
        timeout=60,
    )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def stale_gauge(url: str, site: str) -> float:
    """``visitorstats_snapshot_stale`` of a site, from the service's ``/metrics``."""
    _, _, body = http("GET", f"{url}/metrics")
    prefix = f'visitorstats_snapshot_stale{{site="{site}"}} '
    (line,) = [x for x in body.decode().splitlines() if x.startswith(prefix)]
    return float(line[len(prefix) :])


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["run", "--port", "70000"], {}, "VISITORSTATS_PORT must be from 1 to 65535, got 70000"),
        (["run"], {"VISITORSTATS_WORKERS": "0"}, "VISITORSTATS_WORKERS must be from 1 to 64"),
        (["run"], {"VISITORSTATS_CLICKHOUSE_URL": "garbage"}, "VISITORSTATS_CLICKHOUSE_URL must"),
        (["migrate", "--clickhouse-url", "http://h:port/db"], {}, "VISITORSTATS_CLICKHOUSE_URL"),
        (["run", "--host", "not.a.host.invalid"], {}, "cannot listen on http://not.a.host"),
        (
            ["ingest"],
            {"VISITORSTATS_LOG_LEVEL": "loud", "VISITORSTATS_WORKERS": "3"},
            "VISITORSTATS_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            ["ingest"],
            {"VISITORSTATS_SECRET": "REPLACE-ME-with-openssl-rand-hex-32"},
            "VISITORSTATS_SECRET is the example's placeholder",
        ),
        (
            ["migrate"],
            {"VISITORSTATS_CLICKHOUSE_URL": "http://writer:s3cr3t@127.0.0.1:9/default"},
            "visitorstats migrate: cannot apply the schema to http://writer:***@127.0.0.1:9",
        ),
    ],
)
def test_a_setting_that_cannot_work_is_one_line_and_an_exit(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    code, out = visitorstats(tmp_path, *args, env=env)
    assert code != 0, out
    assert says in out, out
    assert "Traceback" not in out and "s3cr3t" not in out, out


def test_a_hangup_is_said_and_stops_nothing(tmp_path: Path) -> None:
    """SIGHUP (``systemctl reload``) ended the process at once, saying nothing."""
    write_sites(tmp_path)
    run = Service("run", tmp_path).start()
    try:
        run.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP ignored" not in run.log():
            assert run.proc is not None and run.proc.poll() is None, run.log()
            assert time.monotonic() < deadline, run.log()
            time.sleep(0.1)
        assert http("GET", f"{run.url}/readyz")[0] == 200
    finally:
        assert run.stop() == 0


def test_the_version_is_said(tmp_path: Path) -> None:
    code, out = visitorstats(tmp_path, "--version")
    assert code == 0 and out.strip() == f"visitorstats {version('visitorstats')}", out


def test_a_taken_port_and_a_taken_data_directory_are_said_so(tmp_path: Path) -> None:
    first = Service("run", tmp_path)
    write_sites(tmp_path)
    first.start()
    try:
        # the same port: another process listens there
        code, out = visitorstats(
            tmp_path / "other", "run", env={"VISITORSTATS_PORT": str(first.port)}
        )
        assert code != 0 and f"cannot listen on http://127.0.0.1:{first.port}" in out, out
        assert "Traceback" not in out, out
        # the same data directory (embedded ClickHouse): one process only may open it
        code, out = visitorstats(tmp_path, "run", env={"VISITORSTATS_PORT": str(free_port())})
        assert code != 0, out
        assert "is in use by another process (pid" in out and "Traceback" not in out, out
        assert http("GET", f"{first.url}/readyz")[0] == 200  # the first one goes on
    finally:
        first.stop()


def test_an_https_clickhouse_url_speaks_tls(tmp_path: Path) -> None:
    """clickhouse-connect takes host, port and user from a DSN but not its scheme: an https://
    URL must still be spoken to over TLS, or the password would cross the network readable."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    first_bytes: list[bytes] = []

    def accept() -> None:
        listener.settimeout(30)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                first_bytes.append(conn.recv(4096))
            except OSError:
                first_bytes.append(b"")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        code, out = visitorstats(
            tmp_path,
            "migrate",
            env={"VISITORSTATS_CLICKHOUSE_URL": f"https://writer:s3cr3t@127.0.0.1:{port}/db"},
        )
    finally:
        thread.join(35)
        listener.close()
    assert code != 0 and "cannot apply the schema" in out, out
    assert first_bytes and first_bytes[0][:1] == b"\x16", first_bytes  # a TLS handshake
    assert b"s3cr3t" not in first_bytes[0] and b"Authorization" not in first_bytes[0]


def test_the_aggregate_waits_for_a_clickhouse_server_that_comes_up_later(
    tmp_path: Path, tansu: Tansu
) -> None:
    clickhouse_port = free_port()
    aggregate = Service(
        "aggregate",
        tmp_path,
        {
            "VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap,
            "VISITORSTATS_CLICKHOUSE_URL": f"http://default:@127.0.0.1:{clickhouse_port}/default",
        },
    )
    write_sites(tmp_path)
    aggregate.start(wait_ready=False)
    server = ChdbHttpServer(tmp_path / "clickhouse", port=clickhouse_port)
    try:
        deadline = time.monotonic() + 30
        while True:  # up, healthy, not ready, and saying why
            try:
                if http("GET", f"{aggregate.url}/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert aggregate.proc is not None and aggregate.proc.poll() is None, aggregate.log()
            assert time.monotonic() < deadline, aggregate.log()
            time.sleep(0.2)
        status, _, body = http("GET", f"{aggregate.url}/readyz")
        assert status == 503 and b"ClickHouse unreachable" in body, body
        # the broker is up: the consumer only waits for the schema, and says that
        assert b"broker unreachable" not in body and b"until ClickHouse has" in body, body
        assert http("GET", f"{aggregate.url}/v1/sites/dongha/counter")[0] == 503
        # no numbers at all yet: the stale gauge, that alerts watch, says so
        assert stale_gauge(aggregate.url, "dongha") == 1.0
        server.start()
        aggregate.wait_ready(90)
        got = wait_counter(aggregate.url, "dongha", lambda c: c["stale"] is False, timeout=30)
        assert got and got["stale"] is False and got["visits"]["total"] == 23070412, got
        assert stale_gauge(aggregate.url, "dongha") == 0.0
        log = aggregate.log()
        assert "cannot apply the schema" in log and "Traceback" not in log, log
        # said by the service, backed off; not by the clients at each retry (an outside audit
        # counted 4 lines a second of urllib3's and clickhouse-connect's own)
        assert " urllib3." not in log and " clickhouse_connect." not in log, log
    finally:
        aggregate.stop()
        server.stop()


def test_a_clickhouse_server_without_a_table_it_was_given_is_said_until_it_is_back(
    tmp_path: Path, tansu: Tansu
) -> None:
    """A table whose metadata the server lost (recorded as made in schema_migrations, so no
    migration makes it again): the aggregate is not ready and names it, and counts once it is
    back, instead of retrying every read and write for ever as "unknown table"."""
    server = ChdbHttpServer(tmp_path / "clickhouse").start()
    env = {"VISITORSTATS_CLICKHOUSE_URL": server.url}
    aggregate = Service(
        "aggregate", tmp_path, {"VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap, **env}
    )
    try:
        code, out = visitorstats(tmp_path / "migrate", "migrate", env=env)
        assert code == 0 and "0002_peaks" in out, out
        client = clickhouse_connect.get_client(dsn=server.dsn)
        client.command("DROP TABLE peaks SYNC")
        code, out = visitorstats(tmp_path / "migrate", "migrate", env=env)
        assert code != 0 and "has no table peaks, though migration 0002 made it" in out, out
        assert "Traceback" not in out, out

        write_sites(tmp_path)
        aggregate.start(wait_ready=False)
        deadline = time.monotonic() + 60
        body = b""
        while b"has no table peaks" not in body:  # up, not ready, and saying why
            assert time.monotonic() < deadline, (body, aggregate.log())
            with contextlib.suppress(OSError):
                status, _, body = http("GET", f"{aggregate.url}/readyz", timeout=2)
                assert status == 503 or b"peaks" not in body, body
            time.sleep(0.2)
        assert http("GET", f"{aggregate.url}/v1/sites/dongha/counter")[0] == 503
        # the operator restores it (here: made again as migration 0002 makes it)
        (peaks,) = [m for m in migrations() if m.name == "peaks"]
        for statement in render(peaks):
            client.command(statement)
        aggregate.wait_ready(60)
        got = wait_counter(aggregate.url, "dongha", lambda c: c["stale"] is False, timeout=30)
        assert got and got["visits"]["total"] == 23070412, got
        log = aggregate.log()
        assert "ERROR" in log and "has no table peaks" in log and "Traceback" not in log, log
        assert not (tmp_path / "data" / "secret").exists()  # only ingest hashes visitors
    finally:
        aggregate.stop()
        server.stop()


def test_an_embedded_clickhouse_with_damaged_metadata_is_said_with_its_file(
    tmp_path: Path,
) -> None:
    """A table's metadata file found empty (a crash while ClickHouse wrote it), or gone: the
    start stops with one line naming the file or the table, not a traceback and not an
    endless retry."""
    code, out = visitorstats(tmp_path, "migrate")
    assert code == 0 and "0001_events" in out, out
    # what the data directory holds is not for the machine's other users
    shared = [p for p in (tmp_path / "data").rglob("*") if p.stat().st_mode & 0o007]
    assert shared == [], shared
    (events,) = (tmp_path / "data" / "clickhouse").rglob("events.sql")
    events.write_bytes(b"")
    code, out = visitorstats(tmp_path, "run", env={"VISITORSTATS_PORT": str(free_port())})
    assert code != 0 and "cannot be opened" in out, out
    assert f"empty metadata file: {events}" in out and "Traceback" not in out, out
    events.unlink()
    code, out = visitorstats(tmp_path, "run", env={"VISITORSTATS_PORT": str(free_port())})
    assert code != 0 and "has no table events, though migration 0001 made it" in out, out
    assert "move it aside to begin again" in out and "Traceback" not in out, out


def test_migrate_prints_the_cluster_schema_of_the_urls_database(tmp_path: Path) -> None:
    url = "http://writer:s3cr3t@ch.example:8123/stats"
    code, out = visitorstats(
        tmp_path, "migrate", "--cluster", "visitorstats", "--print", "--clickhouse-url", url
    )
    assert code == 0, out
    assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/stats/events'" in out, out
    assert "/default/events" not in out
    # read only in part (`| head`): no traceback of a broken pipe
    write_sites(tmp_path)
    head = subprocess.run(
        f"{sys.executable} -m services.cli migrate --print | head -n 2",
        shell=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=60,
    )
    assert head.stdout.decode().count("\n") == 2
    assert b"Traceback" not in head.stderr and b"BrokenPipe" not in head.stderr, head.stderr


def test_a_graceful_stop_that_is_stuck_ends_the_process_saying_where(tmp_path: Path) -> None:
    """A stop that never finishes (here: a sleep where the cleanup would be) must not leave a
    process that ignores SIGTERM: past its limit it prints every thread's stack and exits."""
    code = (
        "import time, logging; logging.basicConfig()\n"
        "from services import http\n"
        "http._stop_within(0.5)\n"
        "def stuck_cleanup():\n"
        "    time.sleep(60)\n"
        "stuck_cleanup()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=50,
    )
    err = done.stderr.decode()
    assert done.returncode == 70, err
    assert "the graceful stop is stuck" in err and "stuck_cleanup" in err, err


def test_the_kept_secret_is_made_once_and_a_lost_one_is_said(tmp_path: Path) -> None:
    """Without VISITORSTATS_SECRET a secret is made once into data/secret and kept. One found
    empty (a power loss cut its write, before it was written durably) no longer stops every
    start with a traceback, and one missing while the data directory holds earlier data is
    not made anew silently: both are made anew and said, naming the file."""
    unset = {"VISITORSTATS_SECRET": ""}
    stop_after_settings = ("run", "--host", "not.a.host.invalid")  # exits once it would listen
    secret = tmp_path / "data" / "secret"

    code, out = visitorstats(tmp_path, *stop_after_settings, env=unset)
    assert code != 0 and "cannot listen" in out and "secret" not in out, out
    first = secret.read_text()
    assert len(first) == 64 and int(first, 16) >= 0
    assert secret.stat().st_mode & 0o777 == 0o600

    code, out = visitorstats(tmp_path, *stop_after_settings, env=unset)
    assert "secret" not in out and secret.read_text() == first  # kept

    secret.write_text("")
    code, out = visitorstats(tmp_path, *stop_after_settings, env=unset)
    assert "Traceback" not in out and "cannot listen" in out, out
    assert "data/secret is empty: a new visitor hashing secret is made" in out, out
    second = secret.read_text()
    assert len(second) == 64 and second != first

    (tmp_path / "data" / "journal").mkdir(exist_ok=True)
    secret.unlink()
    code, out = visitorstats(tmp_path, *stop_after_settings, env=unset)
    assert "data/secret is missing while data holds earlier data" in out, out
    assert len(secret.read_text()) == 64
