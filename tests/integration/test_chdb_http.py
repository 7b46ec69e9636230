"""tests/support/chdb_http.py (ClickHouse HTTP over chDB) driven by clickhouse-connect."""

from __future__ import annotations

import datetime as dt
import gzip
import http.client
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import lz4.frame
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from tests.support.chdb_http import ChdbHttpServer, split_insert

pytestmark = pytest.mark.integration

EVENTS_DDL = """
CREATE TABLE {name} (
    site LowCardinality(String),
    day Date,
    ts DateTime64(3),
    event_id UUID,
    visitor String,
    member UInt8,
    port UInt16,
    hits UInt32,
    total UInt64,
    delta Int64,
    title Nullable(String)
) ENGINE = MergeTree
ORDER BY (site, ts)
SETTINGS non_replicated_deduplication_window = 1000
"""
COLUMNS = [
    "site",
    "day",
    "ts",
    "event_id",
    "visitor",
    "member",
    "port",
    "hits",
    "total",
    "delta",
    "title",
]


def row(site: str, n: int, title: str | None = None) -> list[object]:
    ts = dt.datetime(2024, 5, 17, 10, 30, 15, 123000) + dt.timedelta(seconds=n)
    return [
        site,
        ts.date(),
        ts,
        uuid.UUID(int=n + 1),
        f"v{n}",
        n % 2,
        65535 - n,
        4_000_000_000 + n,
        2**64 - 1 - n,
        -(2**62) - n,
        title,
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbHttpServer]:
    with ChdbHttpServer(tmp_path_factory.mktemp("chdb") / "data") as srv:
        yield srv


def connect(srv: ChdbHttpServer, **kwargs: object) -> Client:
    return clickhouse_connect.get_client(dsn=srv.dsn, **kwargs)


@pytest.fixture
def client(server: ChdbHttpServer) -> Iterator[Client]:
    c = connect(server)
    yield c
    c.close()


@pytest.fixture
def table(client: Client) -> str:
    name = f"events_{uuid.uuid4().hex[:8]}"
    client.command(EVENTS_DDL.format(name=name))
    return name


def fetch(
    srv: ChdbHttpServer,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(srv.url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def test_ping_and_handshake(server: ChdbHttpServer, client: Client) -> None:
    assert fetch(server, "/ping")[2] == b"Ok.\n"
    assert fetch(server, "/")[2] == b"Ok.\n"
    assert client.ping()
    assert client.server_version and client.server_version[0].isdigit()
    assert client.database == "default"
    assert client.command("SELECT currentDatabase()") == "default"
    assert client.command("SELECT 1, 'a'") == ["1", "a"]


def test_insert_select_roundtrip_types(client: Client, table: str) -> None:
    rows = [row("dongha", 1, "Trang chủ"), row("dongha", 2), row("quangtri", 3, "")]
    summary = client.insert(table, rows, column_names=COLUMNS)
    assert summary.written_rows == 3
    result = client.query(f"SELECT * FROM {table} ORDER BY ts")
    assert list(result.column_names) == COLUMNS
    assert [t.name for t in result.column_types] == [
        "LowCardinality(String)",
        "Date",
        "DateTime64(3)",
        "UUID",
        "String",
        "UInt8",
        "UInt16",
        "UInt32",
        "UInt64",
        "Int64",
        "Nullable(String)",
    ]
    assert [list(r) for r in result.result_rows] == rows
    counts = client.query(f"SELECT site, count() AS n FROM {table} GROUP BY site ORDER BY site")
    assert counts.result_rows == [("dongha", 2), ("quangtri", 1)]
    empty = client.query(f"SELECT * FROM {table} WHERE site = 'nowhere'")
    assert empty.result_rows == []
    assert client.query(f"SELECT * FROM {table} LIMIT 0").column_names == tuple(COLUMNS)


@pytest.mark.parametrize("compress", [True, "lz4", "zstd", "gzip", False])
def test_insert_compression(server: ChdbHttpServer, compress: bool | str) -> None:
    c = connect(server, compress=compress)
    try:
        name = f"events_{uuid.uuid4().hex[:8]}"
        c.command(EVENTS_DDL.format(name=name))
        # several blocks, so lz4/zstd bodies are concatenated frames
        rows = [row("s", n) for n in range(5000)]
        c.insert(name, rows, column_names=COLUMNS, settings={"max_insert_block_size": 1000})
        assert c.command(f"SELECT count(), sum(hits) FROM {name}") == [
            "5000",
            str(sum(4_000_000_000 + n for n in range(5000))),
        ]
        assert len(c.query(f"SELECT * FROM {name}").result_rows) == 5000
    finally:
        c.close()


def test_parameters(server: ChdbHttpServer, client: Client, table: str) -> None:
    tricky = "it's a \\ tab\tnew\nline — Đông Hà"
    client.insert(table, [row("x", 1, tricky), row("y", 2)], column_names=COLUMNS)
    query = f"SELECT title FROM {table} WHERE site = {{site:String}} AND hits >= {{min:UInt32}}"
    result = client.query(query, parameters={"site": "x", "min": 4_000_000_000})
    assert result.result_rows == [(tricky,)]
    echo = client.query(
        "SELECT {s:String}, {a:Array(String)}, {d:DateTime64(3)}",
        parameters={"s": tricky, "a": ["p", "q'"], "d": dt.datetime(2024, 1, 2, 3, 4, 5, 6000)},
    )
    assert echo.result_rows == [(tricky, ["p", "q'"], dt.datetime(2024, 1, 2, 3, 4, 5, 6000))]
    # client-side binding (%(name)s) and multipart/form-data (long parameters)
    assert client.query("SELECT %(v)s", parameters={"v": tricky}).result_rows == [(tricky,)]
    form = connect(server, form_encode_query_params=True)
    try:
        long = "z" * 20000
        res = form.query("SELECT length({s:String}), {t:String}", parameters={"s": long, "t": "x"})
        assert res.result_rows == [(20000, "x")]
    finally:
        form.close()


def test_deduplication_token(client: Client, table: str) -> None:
    rows = [row("dongha", n) for n in range(10)]
    client.insert(table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "abc"})
    client.insert(table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "abc"})
    assert client.command(f"SELECT count() FROM {table}") == 10
    client.insert(table, rows, column_names=COLUMNS, settings={"insert_deduplication_token": "def"})
    assert client.command(f"SELECT count() FROM {table}") == 20
    # the same token with other data is still dropped: the token, not the data, decides
    other = [row("other", 99)]
    client.insert(
        table, other, column_names=COLUMNS, settings={"insert_deduplication_token": "def"}
    )
    assert client.command(f"SELECT count() FROM {table}") == 20


def test_settings_are_applied(client: Client) -> None:
    assert client.command("SELECT getSetting('max_threads')", settings={"max_threads": 3}) == 3
    assert client.command("SELECT getSetting('max_threads')") != 3  # per request, not sticky
    out = client.raw_query(
        "SELECT 1.50::Decimal(9, 2) AS d FORMAT JSONEachRow",
        settings={
            "output_format_decimal_trailing_zeros": 1,
            "output_format_json_quote_decimals": 1,
        },
    )
    assert out == b'{"d":"1.50"}\n'
    tz = client.query("SELECT now()", settings={"session_timezone": "Asia/Ho_Chi_Minh"})
    assert tz.result_rows[0][0].tzinfo is not None
    with pytest.raises(DatabaseError) as err:
        client.command("SELECT 1", settings={"no_such_setting_anywhere": 1})
    assert err.value.code == 115


def test_projection(client: Client) -> None:
    name = f"pv_{uuid.uuid4().hex[:8]}"
    client.command(
        f"""
        CREATE TABLE {name} (
            site LowCardinality(String),
            ts DateTime64(3),
            visitor String,
            PROJECTION per_day (
                SELECT site, toDate(ts), count(), uniq(visitor) GROUP BY site, toDate(ts)
            )
        ) ENGINE = MergeTree ORDER BY (site, ts)
        SETTINGS non_replicated_deduplication_window = 1000
        """
    )
    base = dt.datetime(2024, 5, 17, 23, 59, 59)
    rows = [[("a", "b")[n % 2], base + dt.timedelta(seconds=n), f"v{n % 7}"] for n in range(1000)]
    client.insert(name, rows, column_names=["site", "ts", "visitor"])
    query = (
        f"SELECT site, toDate(ts) AS day, count(), uniq(visitor) FROM {name} "
        "GROUP BY site, day ORDER BY site, day"
    )
    result = client.query(query, settings={"force_optimize_projection": 1})
    assert result.result_rows == [
        ("a", dt.date(2024, 5, 17), 1, 1),
        ("a", dt.date(2024, 5, 18), 499, 7),
        ("b", dt.date(2024, 5, 18), 500, 7),
    ]
    # proves the setting reaches the engine: this one cannot use the projection
    with pytest.raises(DatabaseError) as err:
        client.query(
            f"SELECT count() FROM {name} WHERE visitor = 'v1'",
            settings={"force_optimize_projection": 1},
        )
    assert err.value.code == 584


def test_errors_raise_database_error(server: ChdbHttpServer, client: Client) -> None:
    with pytest.raises(DatabaseError) as err:
        client.query("SELECT * FROM no_such_table")
    assert err.value.code == 60
    assert "UNKNOWN_TABLE" in str(err.value)
    with pytest.raises(DatabaseError) as err:
        client.command("SELEC 1")
    assert err.value.code == 62
    with pytest.raises(DatabaseError) as err:
        client.insert("no_such_table", [[1]], column_names=["a"], column_type_names=["UInt8"])
    assert err.value.code == 60
    status, headers, body = fetch(server, "/?query=SELECT+throwIf(1)")
    assert status == 500
    assert headers["X-ClickHouse-Exception-Code"] == "395"
    assert body.startswith(b"Code: 395. DB::Exception:")
    assert client.command("SELECT 2") == 2  # the connection is still fine


def test_command_results_and_formats(server: ChdbHttpServer, client: Client) -> None:
    assert client.command("SELECT 1 WHERE 0") == ""
    name = f"m_{uuid.uuid4().hex[:8]}"
    assert client.command(f"CREATE TABLE {name} (a UInt8) ENGINE = Memory").written_rows == 0
    client.command(f"INSERT INTO {name} VALUES (1), (2)")
    client.command(f"INSERT INTO {name} FORMAT CSV", data="3\n4\n")
    assert client.command(f"SELECT groupArray(a) FROM (SELECT a FROM {name} ORDER BY a)") == (
        "[1,2,3,4]"
    )
    assert client.command("SELECT format FROM (SELECT 7 AS format)") == 7
    status, headers, body = fetch(server, "/?query=SELECT+1+AS+x+FORMAT+JSONEachRow")
    assert (status, body, headers["X-ClickHouse-Format"]) == (200, b'{"x":1}\n', "JSONEachRow")
    assert headers["Content-Type"].startswith("application/json")
    status, headers, body = fetch(server, "/?default_format=JSONEachRow&query=SELECT+1+AS+x")
    assert (status, body, headers["X-ClickHouse-Format"]) == (200, b'{"x":1}\n', "JSONEachRow")
    # GET is read-only, as in ClickHouse
    status, headers, _ = fetch(server, "/?query=" + urllib.parse.quote(f"DROP TABLE {name}"))
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "164"
    assert fetch(server, "/nowhere")[0] == 404


def test_raw_http_bodies(server: ChdbHttpServer, client: Client) -> None:
    name = f"raw_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE TABLE {name} (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
    query = urllib.parse.quote(f"INSERT INTO {name} FORMAT TSV")
    bodies = {
        "gzip": gzip.compress(b"1\tg\n"),
        "deflate": zlib.compress(b"2\td\n"),
        "lz4": lz4.frame.compress(b"3\tl1\n") + lz4.frame.compress(b"4\tl2\n"),
    }
    for encoding, body in bodies.items():
        status, _, out = fetch(server, f"/?query={query}", body, {"Content-Encoding": encoding})
        assert status == 200, out
    status, headers, out = fetch(server, f"/?query={query}", b"7\tok\nnot-a-number\tx\n")
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] != "0", out
    # the statement in the body, data after it, chunked transfer encoding
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        parts = [f"INSERT INTO {name} (a, s) FORMAT CSV\n".encode(), b"5,c1\n", b"6,c2\n"]
        conn.request("POST", "/?database=default", body=iter(parts), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()
    assert client.command(f"SELECT groupArray(s) FROM (SELECT s FROM {name} ORDER BY a)") == (
        "['g','d','l1','l2','c1','c2']"
    )


def test_concurrent_clients(server: ChdbHttpServer, client: Client, table: str) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        c = connect(server)
        try:
            for batch in range(5):
                rows = [row(f"w{worker}", batch * 100 + n) for n in range(100)]
                c.insert(table, rows, column_names=COLUMNS)
                c.query(f"SELECT site, count() FROM {table} GROUP BY site")
        except BaseException as ex:
            errors.append(ex)
        finally:
            c.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert client.command(f"SELECT count() FROM {table}") == 6 * 5 * 100


def test_restart_keeps_data(tmp_path: Path) -> None:
    srv = ChdbHttpServer(tmp_path / "data")
    srv.start()
    try:
        c = connect(srv)
        try:
            c.command(EVENTS_DDL.format(name="events"))
            c.insert("events", [row("a", 1), row("b", 2)], column_names=COLUMNS)
            port = srv.port
            srv.kill()
            with pytest.raises(OperationalError):
                c.query("SELECT count() FROM events")
            srv.start()
            assert srv.port == port
            # the same client carries on, as a service would after a ClickHouse restart
            assert c.command("SELECT count() FROM events") == 2
            c.insert("events", [row("c", 3)], column_names=COLUMNS)
            assert srv.stop() == 0  # SIGTERM is a clean exit
            srv.start()
            assert c.command("SELECT arraySort(groupArray(site)) FROM events") == "['a','b','c']"
        finally:
            c.close()
    finally:
        srv.stop()


def test_pause_resume(tmp_path: Path) -> None:
    with ChdbHttpServer(tmp_path / "data") as srv:
        c = connect(srv, send_receive_timeout=1, query_retries=0)
        try:
            assert c.command("SELECT 1") == 1
            srv.pause()
            try:
                with pytest.raises(OperationalError):
                    c.command("SELECT 2")
                assert not c.ping(timeout=0.5)
            finally:
                srv.resume()
            assert c.command("SELECT 3") == 3
        finally:
            c.close()


def test_split_insert() -> None:
    assert split_insert(b"INSERT INTO t (a, `format`) FORMAT Native\n\x00\x01") == (
        "INSERT INTO t (a, `format`) ",
        "Native",
        42,
    )
    sql = b"insert into t settings x='FORMAT CSV' format CSV  1,2"
    statement, fmt, offset = split_insert(sql) or ("", "", 0)
    assert (statement, fmt, sql[offset:]) == (
        "insert into t settings x='FORMAT CSV' ",
        "CSV",
        b"1,2",
    )
    assert split_insert(b"INSERT INTO t VALUES (1)") is None
    assert split_insert(b"INSERT INTO t SELECT * FROM s FORMAT Native") is None
    assert split_insert(b"SELECT 1 FORMAT Native") is None
