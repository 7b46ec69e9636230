"""ClickHouse: the one place the aggregate service reads and writes its data.

Embedded (``chdb://PATH``) or a server/cluster (``http(s)://user:pass@host:port/db``), through
clickhouse-connect's synchronous client (the async client refuses ``chdb://``). Two clients,
each on a worker thread of its own: one writes (inserts, migrations, the consumer's reads) and
one reads the counter's snapshot, so that neither waits for the other. chDB runs queries of
different connections in parallel, and releases the GIL while it does. Every value reaches a
statement as a bound parameter; no statement is built from input.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import clickhouse_connect
import orjson

from services import metrics
from services.aggregate.counting import Row
from services.aggregate.migrate import migrations, render, schema_migrations_ddl, tables_made
from services.record import Event
from services.settings import CannotStart, database_of, reason, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

INSERT_THREADS = 3  # besides the store's thread: a flush of 4 partitions at once

EVENT_COLUMNS = (
    "site",
    "event_id",
    "type",
    "ts",
    "micros",
    "day",
    "visitor",
    "visitor_key",
    "member",
    "bot",
    "starts_visit",
    "in_visit",
    "pageview",
    "url",
    "referrer",
    "title",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "kafka_base",
)

ONLINE_COLUMNS = (
    "topic",
    "kafka_partition",
    "site",
    "guests",
    "members",
    "bots",
    "next_offset",
    "at",
    "version",
)


def online_rows(
    topic: str,
    partition: int,
    next_offset: int,
    at_ms: int,
    tallies: dict[str, tuple[int, int, int]],
) -> list[list[Any]]:
    """One partition's tallies as rows of ``online_now`` (in the order of ``ONLINE_COLUMNS``):
    what its owner counted up to ``next_offset``, as of ``at_ms``."""
    version = next_offset << 64 | at_ms
    return [
        [topic, partition, site, g, m, b, next_offset, at_ms, version]
        for site, (g, m, b) in tallies.items()
    ]


# ``ts`` (ms) goes into the JSON as seconds, ``ts / 1000``: below this bound (year 10000) the
# float has at most 15 significant digits, so orjson prints exactly the decimal ``ts / 1000``
# and ClickHouse parses that text into the DateTime64(3) exactly. Outside [0, bound) (never
# from ingest) the rows go as Native columns instead, which carry the integer as it is.
_TS_JSON_LIMIT = 253_402_300_800_000


def event_columns(rows: Sequence[Row], topic: str, base: int = 0) -> list[Sequence[Any]]:
    """The rows as columns, in the order of ``EVENT_COLUMNS`` (``ts`` in ms, as the events
    carry it), for a Native insert and for ``event_columns_json``. ``zip`` turns the rows and
    their events into columns in C. ``base``: the partition's log base (consume.py), the same
    for every row of one insert."""
    if not rows:
        return [() for _ in EVENT_COLUMNS]
    events, visitors, starts_visit, pageviews, days, partitions, offsets, in_visit = zip(
        *rows, strict=True
    )
    (
        event_ids,
        sites,
        types,
        stamps,
        visitor_keys,
        _visitor_prevs,
        members,
        bots,
        urls,
        referrers,
        titles,
        micros,
        _tzs,
    ) = zip(*events, strict=True)
    return [
        sites,
        event_ids,
        types,
        stamps,
        micros,
        days,
        visitors,
        visitor_keys,
        members,
        bots,
        starts_visit,
        in_visit,
        pageviews,
        urls,
        referrers,
        titles,
        (topic,) * len(rows),
        partitions,
        offsets,
        (base,) * len(rows),
    ]


_TS_COLUMN = EVENT_COLUMNS.index("ts")


def event_columns_json(rows: Sequence[Row], topic: str, base: int = 0) -> bytes | None:
    """The rows as ``JSONCompactColumns`` (one array per column, in the order of
    ``EVENT_COLUMNS``); None when a time stamp cannot go as text exactly (see above).

    Columns, not rows: ``event_columns``, which orjson writes as they are (a date as
    YYYY-MM-DD). 0.35 µs a row, against 0.85 µs for a tuple per row in ``JSONCompactEachRow``
    (50,000 rows, ``time.process_time``), on the consumer's thread."""
    if not rows:
        return b""
    columns = event_columns(rows, topic, base)
    stamps = columns[_TS_COLUMN]
    if min(stamps) < 0 or max(stamps) >= _TS_JSON_LIMIT:
        return None
    columns[_TS_COLUMN] = [ts / 1000 for ts in stamps]
    return orjson.dumps(columns)


def _next_offsets(c: Any, topic: str, partitions: list[int] | None) -> dict[int, int]:
    """``Store.next_offsets`` on the store's thread."""
    where = "topic = {topic:String}"
    parameters: dict[str, Any] = {"topic": topic}
    if partitions is not None:
        where += " AND kafka_partition IN {parts:Array(UInt32)}"
        parameters["parts"] = partitions
    result = c.query(
        f"SELECT kafka_partition, max(kafka_offset) FROM events WHERE {where} "
        "GROUP BY kafka_partition",
        parameters=parameters,
    ).result_rows
    return {int(p): int(o) + 1 for p, o in result}


def dsn_of(url: str) -> str:
    """``chdb://./data/clickhouse`` -> ``chdb:///abs/data/clickhouse``; other URLs unchanged."""
    if url.startswith("chdb://"):
        path = Path(url[len("chdb://") :] or "./data/clickhouse").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return f"chdb://{path}"
    return url


@dataclass(frozen=True)
class Online:
    guests: int = 0
    members: int = 0
    bots: int = 0


@dataclass(frozen=True)
class Snapshot:
    online: dict[str, Online]
    # site -> visits and page views of each of ``PERIODS`` in turn (v, p, v, p, ...)
    periods: dict[str, tuple[int, ...]]
    totals: dict[str, tuple[int, int]]  # site -> (visits, pageviews), all time
    peaks: dict[str, tuple[int, int]]  # site -> (online, at ms)
    # partition of the topic -> the ``at`` (ms) of its latest row in ``online_now`` (by its
    # owner's clock): while it is counted, a newer one comes at least every ``consume.ALIVE_MS``
    alive: dict[int, int] = field(default_factory=dict)


PERIODS = ("today", "yesterday", "this_week", "this_month")


def periods(today: date) -> dict[str, tuple[date, date]]:
    """The spec's periods as inclusive date ranges (ISO weeks start on Monday); what the
    ``periods`` rows of ``NUMBERS_QUERY`` sum."""
    yesterday = today - timedelta(days=1)
    return {
        "today": (today, today),
        "yesterday": (yesterday, yesterday),
        "this_week": (today - timedelta(days=today.weekday()), today),
        "this_month": (today.replace(day=1), today),
    }


def earliest_day(today: date) -> date:
    return min(start for start, _ in periods(today).values())


def _commonest(values: Mapping[str, T], default: T) -> tuple[T, dict[str, T]]:
    """The commonest of ``values`` (``default`` if none), and those that differ from it."""
    common = Counter(values.values()).most_common(1)
    usual = common[0][0] if common else default
    return usual, {key: value for key, value in values.items() if value != usual}


# What ClickHouse's disks hold reserved for parts being written: free less kept free (the
# disk's keep_free_space_bytes) less what is left unreserved.
RESERVED_QUERY = """
SELECT toInt64(sum(greatest(0,
    toInt64(free_space) - toInt64(keep_free_space) - toInt64(unreserved_space))))
FROM system.disks
"""


# Per partition of ``topic``, the latest ``at`` (ms) of its rows of ``online_now``: what a rebuild
# stamps after (``Store.online_stamps``), and what tells a counter it is still counted ("alive").
STAMPS_QUERY = """
SELECT kafka_partition AS partition, toUnixTimestamp64Milli(max(at)) AS latest
FROM online_now WHERE topic = {topic:String} GROUP BY kafka_partition
"""


# Everything a counter refresh reads, in one query (one round trip: each query costs the reading
# thread a few waits for the GIL, which the consumer's loop holds most of the time under load).
# Rows (kind, site, numbers):
# * "online": the sum over partitions of each partition's latest tallies (the row with the
#   greatest version per topic, partition and site of ``online_now``, its sorting key: what
#   ``FINAL`` keeps, and only then filtered (WHERE is not moved before FINAL; on a cluster each
#   key lives on one shard, see migrate.SHARDING_KEYS), of ``topic`` or of every topic with ''):
#   guests, members, bots; a site with no one online has no row. A latest
#   tally stamped at or before its site's cutoff (``ONLINE_GRACE_MS`` more than the site's
#   window ago: ``cutoff``, or the one beside the site in ``odd_sites``) counts no one: a live owner
#   writes its tallies again at least every ``consume.TALLY_REFRESH_MS``, so its owner is gone
#   (and no other has taken the partition over yet), and everyone in it has left the window
#   since;
# * "periods": visits and page views of each of ``PERIODS`` in turn, summed in ClickHouse from the
#   ``daily`` projection's rows per site and day (a month of days of thousands of sites is too
#   many rows to hand over at every refresh); the site's day is ``today``, or the one beside the
#   site in ``day_sites`` (another time zone's);
# * "total": visits and page views in all, from the ``daily`` projection;
# * "peak": the most online and when (ms): the first time, of a peak stored twice (two aggregate
#   processes see the same new peak in one snapshot, and store it a few ms apart).
# * "alive": per partition of ``topic`` (none with ''), the ``at`` of its latest row (the site
#   column holds the partition's number).
NUMBERS_QUERY = (
    """
SELECT 'online' AS kind, site, [toInt64(sum(guests)), toInt64(sum(members)), toInt64(sum(bots))]
FROM online_now FINAL
WHERE ({topic:String} = '' OR topic = {topic:String})
    AND toUnixTimestamp64Milli(at)
    > transform(site, {odd_sites:Array(String)}, {odd_cutoffs:Array(Int64)}, {cutoff:Int64})
GROUP BY site
HAVING sum(guests) + sum(members) + sum(bots) > 0
UNION ALL
WITH transform(site, {day_sites:Array(String)}, {day_days:Array(Date)}, {today:Date}) AS local_today
SELECT 'periods', site, [
    toInt64(sumIf(v, day = local_today)), toInt64(sumIf(p, day = local_today)),
    toInt64(sumIf(v, day = local_today - 1)), toInt64(sumIf(p, day = local_today - 1)),
    toInt64(sumIf(v, day BETWEEN toMonday(local_today) AND local_today)),
    toInt64(sumIf(p, day BETWEEN toMonday(local_today) AND local_today)),
    toInt64(sumIf(v, day BETWEEN toStartOfMonth(local_today) AND local_today)),
    toInt64(sumIf(p, day BETWEEN toStartOfMonth(local_today) AND local_today))]
FROM (
    SELECT site, day, sum(starts_visit) AS v, sum(pageview) AS p
    FROM events WHERE day >= {since:Date} GROUP BY site, day
)
GROUP BY site
UNION ALL
SELECT 'total', site, [toInt64(sum(starts_visit)), toInt64(sum(pageview))]
FROM events GROUP BY site
UNION ALL
SELECT 'peak', site, [
    toInt64(max(online)),
    toUnixTimestamp64Milli(argMax(at, (online, -toUnixTimestamp64Milli(at))))]
FROM peaks GROUP BY site
UNION ALL
SELECT 'alive', toString(partition), [toInt64(latest)]
FROM ("""
    + STAMPS_QUERY
    + """) WHERE {topic:String} != ''
"""
)


# The rows a rebuild replays (``replay_recent``), a page from offset ``start`` on.
REPLAY_QUERY = """
SELECT event_id, site, type, toUnixTimestamp64Milli(ts), micros, visitor_key,
       member, bot, visitor, starts_visit, in_visit, kafka_offset
FROM events
WHERE topic = {topic:String} AND kafka_partition = {p:UInt32}
  AND kafka_offset >= {start:UInt64}
  AND ts >= fromUnixTimestamp64Milli({bound:Int64}, 'UTC')
ORDER BY kafka_offset
LIMIT {page:UInt32}
"""
# Where the rows a rebuild replays begin (ms), found once for all its pages: the partition's
# latest row minus the horizon, or ``since`` when earlier.
REPLAY_BOUND_QUERY = """
SELECT toUnixTimestamp64Milli(least(
    (
        SELECT max(ts) FROM events
        WHERE topic = {topic:String} AND kafka_partition = {p:UInt32}
    ) - toIntervalMillisecond({h:UInt64}),
    fromUnixTimestamp64Milli({since:Int64}, 'UTC')
))
"""
REPLAY_PAGE = 100_000

# Clocks of different machines may differ by this much (ms) before a live owner's latest tally
# could be taken for a gone owner's.
ONLINE_GRACE_MS = 5_000

# The longest a counter refresh waits for a write of events to land its online tallies too.
LANDING_WAIT_SECONDS = 1.0


def _embedded_path(url: str) -> Path:
    return Path(dsn_of(url)[len("chdb://") :])


def _restore(url: str) -> str:
    """What an operator can do about a store whose own files are damaged."""
    if url.startswith("chdb://"):
        return (
            f"restore {_embedded_path(url)} from a backup, or move it aside to begin again "
            "from the sites' baselines"
        )
    return "restore it from a backup (visitorstats migrate makes only what was never made)"


def _cannot_open(url: str, e: Exception) -> str:
    """Why the embedded ClickHouse of ``url`` did not open, with what can be seen of its
    files: chDB says only that its server did not start when a table's metadata is empty (a
    crash while ClickHouse wrote it)."""
    path = _embedded_path(url)
    said = f"the embedded ClickHouse in {path} cannot be opened: {reason(e)}"
    try:
        empty = sorted(str(f) for f in path.rglob("*.sql") if f.is_file() and not f.stat().st_size)
    except OSError:
        empty = []
    if not empty:
        return said
    return (
        f"{said}; empty metadata file{'s' if len(empty) > 1 else ''}: {', '.join(empty[:3])}"
        f"{' …' if len(empty) > 3 else ''}; {_restore(url)}"
    )


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-read")
        self._client: Any = None
        self._read_client: Any = None
        # A flush's inserts (one per partition) run side by side, each on a client of its own
        # (chDB runs queries of different connections in parallel; so does a server): a write
        # costs its slowest insert, not their sum.
        self._inserters = ThreadPoolExecutor(
            max_workers=INSERT_THREADS, thread_name_prefix="clickhouse-insert"
        )
        self._idle_insert_clients: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._insert_clients: list[Any] = []
        self._insert_clients_lock = threading.Lock()
        # Held by a write of events from its first insert to its online tallies, and by the
        # counter's read: a refresh sees a batch's page views and who they made online together
        # (an instant between the two inserts would show the page views without the visitors).
        # Across processes (several consumers of one topic) the tallies of another's batch may
        # follow its page views by a refresh.
        self._landing = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------------
    def _new_client(self) -> Any:
        options: dict[str, Any] = {}
        if not self.url.startswith("chdb://"):
            # no sessions: replicas behind a load balancer do not share them
            options = {
                "connect_timeout": 5,
                "send_receive_timeout": 30,
                "autogenerate_session_id": False,
                "compress": False,
                # clickhouse-connect reads host, port, user and database from the DSN but not
                # its scheme: without this, https:// would send the password in the clear
                "interface": urlsplit(self.url).scheme.lower(),
            }
            return clickhouse_connect.get_client(dsn=dsn_of(self.url), **options)
        try:
            return clickhouse_connect.get_client(dsn=dsn_of(self.url))
        except Exception as e:
            raise CannotStart(_cannot_open(self.url, e)) from e

    def _connect(self) -> Any:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _call(self, fn: Callable[[Any], T]) -> T:
        try:
            return fn(self._connect())
        except Exception:
            # A failed HTTP client may hold a broken connection: start afresh next time.
            if not self.url.startswith("chdb://"):
                self._client = None
            raise

    def _call_read(self, fn: Callable[[Any], T]) -> T:
        if self._read_client is None:
            self._read_client = self._new_client()
        try:
            return fn(self._read_client)
        except Exception:
            if not self.url.startswith("chdb://"):
                self._read_client = None
            raise

    async def run(self, fn: Callable[[Any], T]) -> T:
        # A call whose caller stopped waiting before its turn (a timeout while ClickHouse
        # hangs) is cancelled in the executor's queue, so abandoned calls do not pile up.
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def run_read(self, fn: Callable[[Any], T]) -> T:
        """Like ``run``, on the reading client and thread (the counter's snapshot)."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._call_read, fn)

    def close(self) -> None:
        def _close_reader() -> None:
            if self._read_client is not None:
                self._read_client.close()
                self._read_client = None

        def _close() -> None:
            # chDB too: an embedded engine holds its path until closed (until its last
            # connection is), and a process may open another path only after that.
            if self._client is not None:
                self._client.close()
                self._client = None

        self._reader.submit(_close_reader).result()
        self._reader.shutdown(wait=True)
        self._inserters.shutdown(wait=True)
        with self._insert_clients_lock:
            for client in self._insert_clients:
                client.close()
            self._insert_clients.clear()
        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)

    # -- schema ---------------------------------------------------------------------------------
    def migrate_sync(self, cluster: str | None = None) -> list[str]:
        """Apply the migrations not yet applied; return the names applied now."""

        def apply(client: Any) -> list[str]:
            client.command(schema_migrations_ddl(cluster))
            done = {r[0] for r in client.query("SELECT version FROM schema_migrations").result_rows}
            applied = []
            for mig in migrations():
                if mig.version in done:
                    continue
                # said before, as one may take a while (a table's rows rewritten)
                log.info("applying migration %04d_%s to ClickHouse", mig.version, mig.name)
                for statement in render(mig, cluster, database_of(self.url)):
                    client.command(statement)
                client.insert(
                    "schema_migrations", [[mig.version, mig.name]], column_names=["version", "name"]
                )
                applied.append(f"{mig.version:04d}_{mig.name}")
            self._check_tables(client)
            return applied

        return self._executor.submit(self._call, apply).result()

    def _check_tables(self, client: Any) -> None:
        """Every table the migrations made is there: one whose metadata was lost (a file of
        ClickHouse's deleted) would otherwise fail every write and every read, retried for ever."""
        present = {
            r[0]
            for r in client.query(
                "SELECT name FROM system.tables WHERE database = currentDatabase()"
            ).result_rows
        }
        for name, version in tables_made().items():
            if name not in present:
                what = f"ClickHouse ({redact(self.url)})"
                if self.url.startswith("chdb://"):
                    what = f"the embedded ClickHouse in {_embedded_path(self.url)}"
                raise CannotStart(
                    f"{what} has no table {name}, though migration {version:04d} made it "
                    f"(schema_migrations): its metadata was lost; {_restore(self.url)}"
                )

    async def migrate(self, cluster: str | None = None) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(None, self.migrate_sync, cluster)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.run(lambda c: c.command("SELECT 1")), 5))
        except Exception:
            return False

    # -- writes ---------------------------------------------------------------------------------
    async def insert_events(
        self, rows: Sequence[Row], topic: str, token: str, base: int = 0
    ) -> None:
        """One INSERT: one part, atomic. ``token`` makes another insert with the same token a
        no-op (ClickHouse insert deduplication); see consume.py for how tokens are chosen.
        ``base``: the log base of the rows' partition (consume.py).

        The rows go as ``JSONCompactColumns`` bytes built by orjson (``event_columns_json``):
        ClickHouse parses them in C++ (chDB without holding the GIL), where clickhouse-connect's
        own Native serialisation is Python, value by value."""
        block = event_columns_json(rows, topic, base)
        await self.run(lambda c: self._insert(c, rows, topic, token, block, base))

    def write_events(
        self,
        inserts: Sequence[tuple[Sequence[Row], str, int]],
        topic: str,
        check: list[int],
        done: list[int],
        online: Sequence[tuple[int, int, list[list[Any]]]] = (),
    ) -> asyncio.Future[dict[int, int]]:
        """``insert_events`` of each ``(rows, token, base)`` in turn, then ``next_offsets`` of the
        partitions ``check``, then the ``online_now`` rows of each ``(partition, last offset,
        rows)`` of ``online`` whose partition's stored rows end at that offset (its own insert
        is the one stored): one job, handed to the store's thread at once (not when the
        caller first awaits), whose steps follow each other there without waiting for the
        event loop (busy counting the next batch meanwhile). ``done`` receives the index of
        each insert as it succeeds (for a retry after a failure)."""
        blocks = [event_columns_json(rows, topic, base) for rows, _, base in inserts]

        def job(c: Any) -> dict[int, int]:
            with self._landing:
                return land(c)

        def land(c: Any) -> dict[int, int]:
            # one insert per partition: independent of each other, so side by side (the first
            # on this thread's client); the check reads them all once every one is done
            others = [
                (
                    i,
                    self._inserters.submit(
                        self._insert_on_own_client, rows, topic, token, block, base
                    ),
                )
                for i, ((rows, token, base), block) in enumerate(zip(inserts, blocks, strict=True))
                if i > 0
            ]
            failed: Exception | None = None
            if inserts:
                rows, token, base = inserts[0]
                try:
                    self._insert(c, rows, topic, token, blocks[0], base)
                    done.append(0)
                except Exception as e:
                    failed = e
            for i, future in others:
                try:
                    future.result()
                    done.append(i)
                except Exception as e:
                    failed = failed or e
            if failed is not None:
                raise failed
            stored = _next_offsets(c, topic, check) if check else {}
            tallies = [
                row for p, last, rows in online if stored.get(p, 0) - 1 == last for row in rows
            ]
            if tallies:
                self._insert_online(c, tallies)
            return stored

        return asyncio.get_running_loop().run_in_executor(self._executor, self._call, job)

    def _insert_on_own_client(
        self, rows: Sequence[Row], topic: str, token: str, block: bytes | None, base: int
    ) -> None:
        """``_insert`` on an inserting thread, with a client no other thread is using."""
        try:
            client = self._idle_insert_clients.get_nowait()
        except queue.Empty:
            client = self._new_client()
            with self._insert_clients_lock:
                self._insert_clients.append(client)
        broken = False
        try:
            self._insert(client, rows, topic, token, block, base)
        except Exception:
            # a failed HTTP client may hold a broken connection: not used again
            broken = not self.url.startswith("chdb://")
            raise
        finally:
            if broken:
                with self._insert_clients_lock:
                    self._insert_clients.remove(client)
                client.close()
            else:
                self._idle_insert_clients.put(client)

    @staticmethod
    def _insert(
        c: Any, rows: Sequence[Row], topic: str, token: str, block: bytes | None, base: int = 0
    ) -> None:
        """On the store's thread: the INSERT of ``insert_events`` (``block``:
        ``event_columns_json``)."""
        started = time.monotonic()
        # through a cluster's Distributed table: written to the shard before the answer, so
        # that the check that follows (consume.py) reads it
        settings = {"insert_deduplication_token": token, "insert_distributed_sync": 1}
        # (a failure is counted once per write, by the consumer: consume.py)
        if block is not None:
            c.raw_insert(
                "events",
                EVENT_COLUMNS,
                insert_block=block,
                settings=settings,
                fmt="JSONCompactColumns",
            )
        else:
            c.insert(
                "events",
                event_columns(rows, topic, base),
                column_names=EVENT_COLUMNS,
                column_oriented=True,
                settings=settings,
            )
        metrics.CLICKHOUSE_WRITE_LATENCY.observe(time.monotonic() - started)
        metrics.BATCH_SIZE.observe(len(rows))

    @staticmethod
    def _insert_online(c: Any, rows: list[list[Any]]) -> None:
        c.insert(
            "online_now",
            rows,
            column_names=ONLINE_COLUMNS,
            settings={"insert_distributed_sync": 1},
        )

    async def write_online(self, rows: list[list[Any]]) -> None:
        """Rows of ``online_now`` (``online_rows``), on the writing thread (after any write of
        events handed to it before)."""
        await self.run(lambda c: self._insert_online(c, rows))

    async def record_peaks(self, peaks: dict[str, tuple[int, int]]) -> None:
        """Store new peaks (site -> (online, at ms)) in one insert. On the reading thread: the
        counter's own small write, never queued behind a batch of events, and seen by the next
        snapshot (the same thread, after it)."""
        rows = [[site, online, at_ms] for site, (online, at_ms) in peaks.items()]
        await self.run_read(
            lambda c: c.insert("peaks", rows, column_names=["site", "online", "at"])
        )

    async def reserved_bytes(self) -> int:
        """Bytes ClickHouse has reserved on its disks for the parts it is writing (a merge
        reserves its new part's size before it writes it): room that looks free and is not."""
        rows = await self.run_read(lambda c: c.query(RESERVED_QUERY).result_rows)
        return int(rows[0][0]) if rows else 0

    # -- reads ----------------------------------------------------------------------------------
    async def next_offsets(self, topic: str, partitions: list[int] | None = None) -> dict[int, int]:
        """Per partition (all, or those given), the offset after the last record stored: where
        consuming resumes. Partitions with no row are absent."""
        return await self.run(lambda c: _next_offsets(c, topic, partitions))

    async def last_stored(
        self, topic: str, next_offsets: dict[int, int]
    ) -> dict[int, tuple[int, str]]:
        """Per partition of ``next_offsets`` (``next_offsets()``), its last stored row's log base
        and event id: where its record was in Kafka, and which record it was (consume.py checks
        that the log still holds it there). Looked for among the rows of the last day of the
        partition first (the table is ordered by time, not by offset), then among all."""

        def query(c: Any) -> dict[int, tuple[int, str]]:
            found: dict[int, tuple[int, str]] = {}
            for recent in (True, False):
                wanted = [(p, n - 1) for p, n in next_offsets.items() if p not in found]
                if not wanted:
                    break
                bound = (
                    "AND ts >= (SELECT max(ts) FROM events WHERE topic = {topic:String}) "
                    "- INTERVAL 1 DAY"
                    if recent
                    else ""
                )
                rows = c.query(
                    "SELECT kafka_partition, kafka_base, event_id FROM events "
                    "WHERE topic = {topic:String} "
                    "AND (kafka_partition, kafka_offset) IN {wanted:Array(Tuple(UInt32, UInt64))} "
                    + bound,
                    parameters={"topic": topic, "wanted": wanted},
                ).result_rows
                for p, base, event_id in rows:
                    found[int(p)] = (int(base), str(event_id))
            return found

        if not next_offsets:
            return {}
        return await self.run(query)

    async def online_stamps(self, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, the latest ``at`` (ms) of its ``online_now`` rows."""
        rows = await self.run(
            lambda c: c.query(STAMPS_QUERY, parameters={"topic": topic}).result_rows
        )
        return {int(p): int(at) for p, at in rows}

    async def replay_recent(
        self,
        topic: str,
        partition: int,
        horizon_ms: int,
        since_ms: int | None,
        apply: Callable[[Event, str, bool, bool], None],
    ) -> int:
        """Hand ``apply`` the rows of one partition within ``horizon_ms`` of its latest, and
        those from ``since_ms`` on, in log order: (event, canonical visitor, whether it began a
        visit, whether its run had one). On the store's thread, a page of ``REPLAY_PAGE`` rows
        at a time: a busy hour is millions of rows, which read at once took gigabytes (an
        outside audit: 3 million rows, 2.3 GB at start), and the event loop stays free to
        answer meanwhile. Returns how many rows were replayed."""

        # without ``since_ms``: the latest minus the horizon (a far future bound)
        since = max(0, since_ms) if since_ms is not None else 9_000_000_000_000

        def replay(c: Any) -> int:
            bound = c.query(
                REPLAY_BOUND_QUERY,
                parameters={"topic": topic, "p": partition, "h": horizon_ms, "since": since},
            ).result_rows[0][0]
            replayed, start = 0, 0
            while True:
                rows = c.query(
                    REPLAY_QUERY,
                    parameters={
                        "topic": topic,
                        "p": partition,
                        "bound": int(bound),
                        "start": start,
                        "page": REPLAY_PAGE,
                    },
                ).result_rows
                for eid, site, typ, ts, micros, vkey, m, b, visitor, starts, in_visit, _ in rows:
                    event = Event(
                        str(eid), site, typ, int(ts), vkey, None, bool(m), bool(b), "", "", "",
                        int(micros),
                    )  # fmt: skip
                    apply(event, visitor, bool(starts), bool(in_visit))
                replayed += len(rows)
                if len(rows) < REPLAY_PAGE:
                    return replayed
                start = int(rows[-1][-1]) + 1

        return await self.run(replay)

    async def snapshot(
        self,
        windows: dict[str, int],
        today: date | Mapping[str, date],
        now_ms: int,
        topic: str = "",
    ) -> Snapshot:
        """Everything the counters of all sites need, in one query (``NUMBERS_QUERY``). Online:
        the sum of the tallies the consumers published per partition (``online_now``, of
        ``topic``, or of every topic with ``''``), but not a partition's whose latest tally is
        older than the site's window (``windows``, seconds): its owner is gone; days and totals
        from the ``daily`` projection (rows per part, site and day, not per event); peaks from
        their own small table. ``now_ms`` is the counter's clock: who is online is as of the
        consumers' latest tick. A site with no one online has no ``online`` entry; one not in
        ``windows`` has the commonest window. ``today``: the day it is in every site's time zone
        (one for all, or per site: one not in it has the commonest), which the periods are of.
        ``alive``: when each partition of ``topic`` was last heard of (none with ``''``)."""
        # One cutoff for the sites of the commonest window, and the others' beside their names:
        # the query's text stays short with thousands of sites (each in it cost the query a
        # lookup in every row, and its parsing: 130 ms a refresh at 5,000 sites, 10 ms now).
        usual, odd = _commonest(windows, 0)
        # and in the same way the day of the commonest time zone, the others' beside them
        odd_days: dict[str, date] = {}
        if isinstance(today, date):
            usual_day = today
        else:
            usual_day, odd_days = _commonest(today, date.today())
        since = min(earliest_day(day) for day in {usual_day, *odd_days.values()})

        def query(c: Any) -> Snapshot:
            online: dict[str, Online] = {}
            periods: dict[str, tuple[int, ...]] = {}
            totals: dict[str, tuple[int, int]] = {}
            peaks: dict[str, tuple[int, int]] = {}
            alive: dict[int, int] = {}
            parameters = {
                "since": since,
                "today": usual_day,
                "day_sites": list(odd_days),
                "day_days": list(odd_days.values()),
                "topic": topic,
                "cutoff": now_ms - usual * 1000 - ONLINE_GRACE_MS,
                "odd_sites": list(odd),
                "odd_cutoffs": [now_ms - w * 1000 - ONLINE_GRACE_MS for w in odd.values()],
            }
            # not between a write's page views and its tallies; a write that takes longer
            # (ClickHouse slow to answer) does not hold the counter back
            landed = self._landing.acquire(timeout=LANDING_WAIT_SECONDS)
            try:
                result = c.query(NUMBERS_QUERY, parameters=parameters).result_rows
            finally:
                if landed:
                    self._landing.release()
            for kind, site, n in result:
                if kind == "online":
                    online[site] = Online(*n)
                elif kind == "periods":
                    periods[site] = tuple(n)
                elif kind == "total":
                    totals[site] = (n[0], n[1])
                elif kind == "peak":
                    peaks[site] = (n[0], n[1])
                else:
                    alive[int(site)] = n[0]
            return Snapshot(online=online, periods=periods, totals=totals, peaks=peaks, alive=alive)

        try:
            return await self.run_read(query)
        except Exception:
            metrics.CLICKHOUSE_ERRORS.labels("query").inc()
            raise
