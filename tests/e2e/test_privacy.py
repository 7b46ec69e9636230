"""Privacy, inspected after a run of the Kafka path (Tansu broker, ``visitorstats ingest`` and
``visitorstats aggregate`` as processes): no raw client address, User-Agent or portal visitor
id is in any Kafka record (every topic), any ClickHouse table, any log line (access log and
DEBUG on) or any metric of either service."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import uuid
from http.client import HTTPConnection
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support.procs import Service, http, numbers, wait_counter, write_sites
from tests.support.tansu import Tansu

pytestmark = pytest.mark.e2e

MARK = "Zq7xVw"  # in every User-Agent and portal visitor id sent, and nowhere else
USER_AGENT = f"Mozilla/5.0 (X11; Linux x86_64; PrivacyProbe-{MARK}) Chrome/126.0 Safari/537.36"
BOT_AGENT = f"ProbeBot/9.9 (+https://probe.example/bot-{MARK})"
PEER = "127.0.0.9"  # the raw peer address of our connections (a trusted proxy, by default)
CLIENTS = ["203.0.113.173", "2001:db8:abcd:12::7", "198.51.100.231"]
NEEDLES = [MARK, "PrivacyProbe", "ProbeBot", PEER, *CLIENTS, "2001:db8:abcd:12:0:0:0:7"]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """One request from the peer address ``PEER``."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10, source_address=(PEER, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def raw(port: int, data: bytes) -> None:
    with socket.socket() as s:
        s.bind((PEER, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        while s.recv(65536):
            pass


def traffic(ingest: Service, aggregate: Service) -> int:
    """Page views through the proxy (X-Forwarded-For) and without it, a bot, a portal visitor
    id, refused and malformed requests; returns the number of human page views accepted."""
    pageviews = 0
    for i, client in enumerate([*CLIENTS, None]):
        for kind in ("pageview", "heartbeat", "pageview", "leave"):
            beacon = {
                "site": "dongha",
                "type": kind,
                "url": f"https://portal.example.vn/tin/{i}",
                "title": "Tin tức",
                "event_id": str(uuid.uuid4()),
            }
            if i == 1:
                beacon["visitor"] = f"portal-user-{MARK}"
            headers = {"Content-Type": "text/plain", "User-Agent": USER_AGENT}
            if client:
                headers["X-Forwarded-For"] = client
            body = json.dumps(beacon).encode()
            assert request(ingest.port, "POST", "/collect", body, headers) == 202
            pageviews += kind == "pageview"
    pixel = "/collect.gif?site=dongha&url=https%3A%2F%2Fportal.example.vn%2F"
    assert request(ingest.port, "GET", pixel, headers={"User-Agent": BOT_AGENT}) == 202
    # refusals and malformed requests, which get logged (at DEBUG) if anything does
    beat = pixel + "&type=heartbeat"
    assert request(ingest.port, "GET", beat, headers={"User-Agent": USER_AGENT, "DNT": "1"}) == 202
    bad = {"User-Agent": USER_AGENT, "X-Forwarded-For": CLIENTS[0]}
    assert (
        request(ingest.port, "GET", "/collect.gif?site=nope&url=https%3A%2F%2Fa.vn%2F", headers=bad)
        == 403
    )
    assert (
        request(ingest.port, "POST", "/collect", b"{bad", {**bad, "Content-Type": "text/plain"})
        == 400
    )
    assert request(ingest.port, "GET", "/nowhere", headers=bad) == 404
    for port in (ingest.port, aggregate.port):
        raw(
            port,
            b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: "
            + USER_AGENT.encode()
            + b"\r\nBad Header: 1\r\n\r\n",
        )
        raw(
            port,
            b"GET /"
            + b"a" * 10_000
            + b" HTTP/1.1\r\nUser-Agent: "
            + USER_AGENT.encode()
            + b"\r\n\r\n",
        )
        raw(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + MARK.encode() * 2000 + b"\r\n\r\n",
        )
    assert request(aggregate.port, "GET", "/v1/sites/dongha/counter", headers=bad) == 200
    assert request(aggregate.port, "GET", "/v1/sites/nope/counter", headers=bad) == 404
    return pageviews


async def all_records(bootstrap: str) -> list[bytes]:
    """Every record (key, value, headers) of every topic, from the beginning."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        topics = await consumer.topics()
        tps = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or set()
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[bytes] = []
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for r in records:
                    out.append(
                        (r.key or b"")
                        + b"|"
                        + (r.value or b"")
                        + b"|"
                        + b"|".join(k.encode() + b"=" + v for k, v in r.headers)
                    )
        return out
    finally:
        await consumer.stop()


DUMP = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
tables = client.query(
    "SELECT name FROM system.tables WHERE database = currentDatabase()"
).result_rows
for (table,) in tables:
    result = client.query(f"SELECT * FROM `{table}`")
    for row in result.result_rows:
        print(json.dumps([table, *map(str, row)], ensure_ascii=False))
print(json.dumps(["tables", *[t for (t,) in tables]]))
"""


def clickhouse_rows(path: Path) -> list[str]:
    """Every row of every table, read by a separate process (chDB: one path per process)."""
    done = subprocess.run(
        [sys.executable, "-c", DUMP, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_no_address_or_user_agent_in_kafka_clickhouse_logs_or_metrics(
    tmp_path: Path, tansu: Tansu
) -> None:
    tansu.create_topic("pageviews", 4)
    write_sites(tmp_path)
    env = {
        "VISITORSTATS_KAFKA_BOOTSTRAP": tansu.bootstrap,
        "VISITORSTATS_ACCESS_LOG": "1",
        "VISITORSTATS_LOG_LEVEL": "DEBUG",
    }
    ingest = Service("ingest", tmp_path, env).start()
    aggregate = Service("aggregate", tmp_path, env).start()
    try:
        pageviews = traffic(ingest, aggregate)
        got = wait_counter(
            aggregate.url, "dongha", lambda c: c["pageviews"]["today"] >= pageviews, timeout=30
        )
        assert got["pageviews"]["today"] == pageviews and got["online"]["bots"] == 1
        metrics = [http("GET", f"{s.url}/metrics")[2].decode() for s in (ingest, aggregate)]
        assert "visitorstats_beacons_accepted_total" in metrics[0]
        assert "visitorstats_events_consumed_total" in metrics[1]
    finally:
        ingest.stop()
        aggregate.stop()
    assert numbers(got)["visits"]["today"] == len(CLIENTS) + 1

    records = asyncio.run(all_records(tansu.bootstrap))
    assert len(records) >= pageviews * 2
    rows = clickhouse_rows(tmp_path / "data" / "clickhouse")
    assert any(r.startswith('["events"') for r in rows) and rows[-1].startswith('["tables"')
    logs = {s.name: s.log_path.read_text(errors="replace") for s in (ingest, aggregate)}
    assert "GET /v1/sites/dongha/counter 200" in logs["aggregate"]  # the access log was on
    assert "malformed request refused" in logs["ingest"]  # DEBUG was on

    stored = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.stat().st_size < 2**24]
    places = {
        "kafka": b"\n".join(records).decode(errors="replace"),
        "clickhouse": "\n".join(rows),
        "metrics": "\n".join(metrics),
        **{f"log {name}": text for name, text in logs.items()},
        "files": "\n".join(p.read_bytes().decode(errors="replace") for p in stored),
    }
    for where, text in places.items():
        for needle in NEEDLES:
            assert needle not in text, f"{needle!r} found in {where}"
