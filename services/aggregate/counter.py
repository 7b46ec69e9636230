"""The counter: every tick, the numbers of every site are computed once (a few small ClickHouse
queries for all sites, whose cost does not follow the size of the table: who is online is the
sum of the tallies the consumers write per partition, the days and totals come from a
projection; see store.py) and prepared as ready bytes with their ETag, then served to every
request and every stream subscriber as they are. A tick follows each flush of events
closely (``min_gap_seconds``), so that a beacon shows soon after it is written.

``stale`` turns true when a refresh fails, while the broker does not answer
(``SILENT_SECONDS``), and while the numbers do not follow the beacons: the consumer group
rebalancing, ClickHouse refusing writes, reading behind the log's end, or a partition of the
topic counted by no one (``UNATTENDED_SECONDS``). The last good numbers stay, with their
``as_of``.

Stream subscribers share one ``Fanout``: a change of a site's numbers is written to every
subscriber of that site as the very same prepared bytes; ten thousand open pages cost ten
thousand socket writes per change, and no extra query or serialisation. Subscribers on the
server's fast lane (every usual request) are written to in one synchronous loop, paced to one
event a second each by one timer per site; the others (served by aiohttp) each wake up for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from services import metrics
from services.aggregate.store import PERIODS, Online, Snapshot, Store
from services.fastlane import chunk
from services.sites import Registry, Site

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    payload: dict[str, Any]
    body: bytes
    etag: str

    @cached_property
    def event(self) -> bytes:
        """The server-sent event carrying ``body`` (made for the numbers a stream carries)."""
        return b"data: " + self.body + b"\n\n"

    @cached_property
    def chunk(self) -> bytes:
        """``event`` framed as one chunk of a chunked body (for a ``Sink``)."""
        return chunk(self.event)


def build_payload(site: Site, snap: Snapshot, now_ms: int, stale: bool) -> dict[str, Any]:
    numbers = snap.periods.get(site.id, _NO_PERIODS)
    total_visits, total_pageviews = snap.totals.get(site.id, (0, 0))
    visits = dict(zip(PERIODS, numbers[0::2], strict=True))
    pageviews = dict(zip(PERIODS, numbers[1::2], strict=True))
    visits["total"] = site.baseline_visits + total_visits
    pageviews["total"] = site.baseline_pageviews + total_pageviews
    online = snap.online.get(site.id, Online())
    peak_total, peak_at = snap.peaks.get(site.id, (0, 0))
    return {
        "site": site.id,
        "online": {
            "guests": online.guests,
            "members": online.members,
            "total": online.guests + online.members,
            "bots": online.bots,
            "peak": {
                "total": peak_total,
                "at": _iso(peak_at, site) if peak_total else None,
            },
        },
        "visits": visits,
        "pageviews": pageviews,
        "online_window_seconds": site.online_window_seconds,
        "timezone": site.timezone,
        "as_of": _iso(now_ms, site),
        "stale": stale,
    }


_NO_PERIODS = (0,) * (2 * len(PERIODS))


def _iso(ms: int, site: Site) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(site.tz).isoformat(timespec="seconds")


def prepare(payload: dict[str, Any]) -> Prepared:
    body = orjson.dumps(payload)
    # The ETag covers the numbers, not ``as_of``: an unchanged counter revalidates as 304. So
    # it is weak (RFC 9110 8.8.1): two bodies of one tag differ by their ``as_of`` alone.
    numbers = {k: v for k, v in payload.items() if k != "as_of"}
    etag = 'W/"' + hashlib.sha256(orjson.dumps(numbers)).hexdigest()[:24] + '"'
    return Prepared(payload, body, etag)


def restamp(prepared: Prepared, as_of: str) -> Prepared:
    """The same numbers (and ETag) as of a newer time."""
    payload = {**prepared.payload, "as_of": as_of}
    return Prepared(payload, orjson.dumps(payload), prepared.etag)


KEEPALIVE = b": keep-alive\n\n"  # a comment line of the stream, between events
KEEPALIVE_CHUNK = chunk(KEEPALIVE)
# A subscriber with more than this left unread (about two minutes of events) is dropped: its
# page reconnects or polls.
SINK_BACKLOG_BYTES = 64 * 1024


class Sink(Protocol):
    """A subscriber's connection, written to directly (``services.fastlane.LaneProtocol``)."""

    def send(self, chunk: bytes, limit: int) -> bool: ...
    def end(self) -> None: ...


class _Sub:
    __slots__ = ("etag", "sent_at", "sink", "wrote_at")

    def __init__(self, sink: Sink, now: float) -> None:
        self.sink = sink
        self.etag = ""  # of the numbers it has
        self.sent_at = -1e18  # when it got them
        self.wrote_at = now  # its latest write (an event or a keep-alive)


class Fanout:
    """The latest prepared counter of every site, and the subscribers waiting for a change.

    ``publish`` is synchronous and O(1) for the publisher; every waiting subscriber of the site
    wakes up once and picks up the latest ``Prepared`` (older ones it slept through are skipped,
    so a slow subscriber never falls behind by more than one snapshot).
    """

    def __init__(
        self, sites: Iterable[str], min_interval: float = 1.0, keepalive: float = 15.0
    ) -> None:
        self.min_interval = min_interval
        self.keepalive = keepalive
        self.prepared: dict[str, Prepared] = {}
        # What the stream carries: the latest *published* numbers. ``replace`` (same numbers,
        # newer ``as_of``) changes what requests get, not this, so that every subscriber of a
        # change writes the very same bytes, even one that wakes up after a replace.
        self._pushed: dict[str, Prepared] = {}
        self._changed: dict[str, asyncio.Event] = {s: asyncio.Event() for s in sites}
        self._sinks: dict[str, set[_Sub]] = {s: set() for s in self._changed}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # site -> its next paced push
        self._pushed_at: dict[str, float] = {}  # site -> its latest push (the loop's time)
        self._keepalive: asyncio.TimerHandle | None = None
        self.closed = False

    def changed(self, site: str) -> asyncio.Event:
        """An event set at the next change of ``site`` (a fresh one after each change)."""
        return self._changed[site]

    def publish(self, site: str, prepared: Prepared) -> None:
        """New numbers for ``site``: wake its subscribers."""
        self.prepared[site] = prepared
        self._pushed[site] = prepared
        self._wake(site)
        if self._sinks[site] and site not in self._timers:
            # (with a push pending, that one takes the latest)
            loop = asyncio.get_running_loop()
            due = self._pushed_at.get(site, -1e18) + self.min_interval
            if loop.time() >= due:
                self._push(site)
            else:
                self._timers[site] = loop.call_at(due, self._push, site)

    def current(self, site: str) -> Prepared | None:
        """What a new subscriber gets first: the latest numbers as of the latest refresh (the
        pushes carry the ``as_of`` of their change; an outside audit saw a first event hours
        old on a counter unchanged since)."""
        return self.prepared.get(site) or self._pushed.get(site)

    def replace(self, site: str, prepared: Prepared) -> None:
        """Same numbers (same ETag), newer ``as_of``: served to requests, not pushed."""
        self.prepared[site] = prepared

    def close(self) -> None:
        """End every subscription (the server is stopping)."""
        self.closed = True
        for site in list(self._changed):
            self._wake(site)
        for timer in [*self._timers.values(), self._keepalive]:
            if timer is not None:
                timer.cancel()
        self._timers.clear()
        for subs in self._sinks.values():
            ending = list(subs)
            subs.clear()
            for sub in ending:
                sub.sink.end()

    # -- sinks: subscribers written to directly ---------------------------------------------------
    def attach(self, site: str, sink: Sink) -> _Sub:
        """A new subscriber: the current numbers at once, then each change (at most one event
        every ``min_interval`` seconds), keep-alives in between; ``detach`` when it is gone."""
        loop = asyncio.get_running_loop()
        sub = _Sub(sink, loop.time())
        if self.closed:
            sink.end()
            return sub
        self._sinks[site].add(sub)
        if self._keepalive is None:
            self._keepalive = loop.call_later(self.keepalive / 3, self._keep_alive)
        latest = self.current(site)
        if latest is not None:
            self._send(site, sub, latest, loop.time())
        return sub

    def detach(self, site: str, sub: _Sub) -> None:
        self._sinks[site].discard(sub)

    def _send(self, site: str, sub: _Sub, latest: Prepared, now: float) -> None:
        if sub.sink.send(latest.chunk, SINK_BACKLOG_BYTES):
            sub.etag, sub.sent_at, sub.wrote_at = latest.etag, now, now
        else:
            self._sinks[site].discard(sub)

    def _push(self, site: str) -> None:
        """Write the latest numbers to every sink of ``site`` that has older ones and has had
        its quiet interval. Pushes keep to one beat per site (``min_interval`` apart), so that
        every sink is written to in the same loop: a sink that joined since the last push (its
        first event came at once) and is still in its quiet interval gets the next beat."""
        timer = self._timers.pop(site, None)
        if timer is not None:
            timer.cancel()
        latest = self._pushed.get(site)
        if latest is None or self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        interval, etag = self.min_interval, latest.etag
        waiting = False
        for sub in list(self._sinks[site]):
            if sub.etag == etag:
                continue
            if now - sub.sent_at < interval:
                waiting = True
                continue
            self._send(site, sub, latest, now)
        self._pushed_at[site] = now
        if waiting:
            self._timers[site] = loop.call_at(now + interval, self._push, site)

    def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet = now - self.keepalive
        for subs in self._sinks.values():
            for sub in [s for s in subs if s.wrote_at <= quiet]:
                if sub.sink.send(KEEPALIVE_CHUNK, SINK_BACKLOG_BYTES):
                    sub.wrote_at = now
                else:
                    subs.discard(sub)
        self._keepalive = None
        if not self.closed and any(self._sinks.values()):
            self._keepalive = loop.call_later(self.keepalive / 3, self._keep_alive)

    def _wake(self, site: str) -> None:
        event = self._changed[site]
        self._changed[site] = asyncio.Event()
        event.set()

    async def subscribe(
        self, site: str, *, min_interval: float = 1.0, keepalive: float = 15.0
    ) -> AsyncIterator[Prepared | None]:
        """The site's current ``Prepared`` at once, then the latest one after each change, at
        most once per ``min_interval`` seconds; ``None`` after ``keepalive`` seconds without a
        change (time for a keep-alive). Ends when the fan-out closes."""
        sent: str | None = None
        while not self.closed:
            # No await between taking the event and reading the latest: no change is missed.
            changed = self._changed[site]
            latest = self._pushed.get(site) if sent is not None else self.current(site)
            if latest is not None and latest.etag != sent:
                sent = latest.etag
                yield latest
                if min_interval > 0 and not self.closed:
                    await asyncio.sleep(min_interval)
                continue
            try:
                async with asyncio.timeout(keepalive):  # (not wait_for: see api.counter_stream)
                    await changed.wait()
            except TimeoutError:
                if not self.closed:
                    yield None


# A refresh lets the loop serve requests after every this many sites (a registry of thousands).
SITES_PER_SLICE = 500
# New peaks are stored at most this often (the counter shows them from memory at once).
PEAK_WRITE_SECONDS = 1.0
# Seconds without an answer from the broker after which the numbers are marked ``stale``: the
# consumer's fetches come back every fetch_max_wait_ms (50 ms) even with nothing new.
SILENT_SECONDS = 10.0
# Seconds of a consumer group's rebalance after which the numbers are marked ``stale``: no
# member reads during a rebalance, so beacons accepted since do not show (the spec: within 2 s).
REBALANCE_STALE_SECONDS = 2.0
# Seconds of ClickHouse refusing the events' writes after which the numbers are marked
# ``stale``: what it holds, and so the counter, stops following the beacons.
WRITES_FAILING_STALE_SECONDS = 2.0
# Seconds the consumer may read behind the log's end, counting nothing newer than that, before
# the numbers are marked ``stale``: the broker answers, but the numbers fall behind the beacons
# (a soak on the test broker saw them minutes old, online fallen to 0, and "stale": false).
BEHIND_STALE_SECONDS = 10.0
# Seconds a partition's latest row of online tallies may stay as it was before the numbers are
# marked ``stale``: its owner writes one at least every ``consume.ALIVE_MS`` (or every tick, if
# ticks are further apart: the limit is at least four ticks), so it is gone (killed, frozen, or
# its writes stuck) and the beacons of the partition no longer show. The consumer group notices
# a member's death only after its session timeout (10 s), and hands its partitions on only
# then. Over 5 s, because an owner of an earlier version writes unchanged tallies only every
# ``consume.TALLY_REFRESH_MS`` (5 s) and no row between: during a rolling upgrade its quiet
# partitions are not taken for unattended.
UNATTENDED_SECONDS = 7.0
# Seconds a counter refresh may take before the numbers are marked ``stale`` while it goes on
# (a hung ClickHouse: the refresh itself gives up after 10 s). A refresh takes tens of ms (about
# 200 ms for 10,000 sites and a month of data).
SLOW_REFRESH_STALE_SECONDS = 2.0
# Seconds the counter's reads may fail in a row (every refresh) before readiness says so: the
# numbers are stale from the first failure; a replica whose reads keep failing (a part damaged
# on its disk, a ClickHouse replica behind a load balancer that is not well) is then taken out
# of service, while others may read.
READS_FAILING_SECONDS = 10.0


class CounterService:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        interval_seconds: float = 0.5,
        clock: Callable[[], float] = time.time,
        topic: str = "",
        peak_write_seconds: float = PEAK_WRITE_SECONDS,
        silent: Callable[[], float] = lambda: 0.0,
        rebalancing: Callable[[], float] = lambda: 0.0,
        writes_failing: Callable[[], float] = lambda: 0.0,
        behind: Callable[[], int] = lambda: 0,
        others: Callable[[], Collection[int] | None] = lambda: None,
        unattended_seconds: float = UNATTENDED_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        # the partitions of ``topic`` other processes count (Source.others; None: not known,
        # none is judged). This one's own are judged by its own reading and writing (above).
        self.others = others
        self.unattended_seconds = max(unattended_seconds, 4 * interval_seconds)
        self.monotonic = monotonic  # how long a partition's row stays as it was
        # partition -> its latest row's ``at`` as last read, and since when (monotonic) it is
        self._heard: dict[int, tuple[int, float]] = {}
        self.silent = silent  # seconds since the broker last answered (Source.silent_seconds)
        # seconds no partition has been read for (a rebalance, a rebuild), 0 when reading
        self.rebalancing = rebalancing
        # seconds ClickHouse has refused the events' writes (Consumer.writes_failing_seconds)
        self.writes_failing = writes_failing
        self.behind = behind  # records waiting past what was read (Source.behind)
        self.behind_seconds = 0.0  # how far the numbers fall behind, as of the last refresh
        self._behind_since: float | None = None
        self._newest_ms = 0  # the newest accepted event written
        self.registry = registry
        self.topic = topic  # whose consumers' online tallies count ("": every topic's)
        self.interval = interval_seconds
        self.clock = clock
        self.fanout = Fanout(s.id for s in registry)
        self.prepared = self.fanout.prepared  # site -> the latest numbers, ready to serve
        self.healthy = False
        # since when (monotonic) every refresh has failed, and the last one's error
        self._reads_failing_since: float | None = None
        self.read_error = ""
        self._windows = {s.id: s.online_window_seconds for s in registry}
        self._zones = {s.tz for s in registry}
        # site -> what its last prepared numbers were made of, and their ETag (``refresh``)
        self._made: dict[str, tuple[tuple[Any, ...], str]] = {}
        # site -> a peak this process saw that what it last read does not hold yet
        self._peaks: dict[str, tuple[int, int]] = {}
        self._unwritten: dict[str, tuple[int, int]] = {}  # new peaks not yet stored
        self._peak_writer: asyncio.Future[None] | None = None
        self._peaks_written_at = float("-inf")
        self._peak_write_seconds = peak_write_seconds
        self._flushed: list[int] = []  # ts (ms) of events written since the last refresh
        self._landed = asyncio.Event()  # set when a flush lands: refresh now, not at the tick
        self._silent_logged = False

    def _serve_stale(self) -> None:
        """Serve the last numbers marked stale, every site's (those with no numbers yet too:
        their counter is 503)."""
        for site_id, prep in list(self.prepared.items()):
            if not prep.payload["stale"]:
                self.fanout.publish(site_id, prepare({**prep.payload, "stale": True}))
        for site in self.registry:
            metrics.COUNTER_STALE.labels(site.id).set(1)

    def reads_failing(self) -> float:
        """Seconds every refresh has failed for (0 while they succeed)."""
        since = self._reads_failing_since
        return 0.0 if since is None else time.monotonic() - since

    def note_flushed(self, ts_ms: list[int]) -> None:
        """Events were written: ``run`` refreshes as soon as it may (``min_gap_seconds``)."""
        self._flushed.extend(ts_ms)
        if ts_ms:
            self._newest_ms = max(self._newest_ms, max(ts_ms))
        self._landed.set()

    async def refresh(self) -> None:
        now_ms = int(self.clock() * 1000)
        flushed, self._flushed = self._flushed, []
        days = {tz: datetime.fromtimestamp(now_ms / 1000, tz).date() for tz in self._zones}
        today = {s.id: days[s.tz] for s in self.registry}
        started = time.monotonic()
        try:
            snap = await asyncio.wait_for(
                self.store.snapshot(self._windows, today, now_ms, self.topic), 10
            )
            metrics.SNAPSHOT_REFRESH.observe(time.monotonic() - started)
        except Exception as e:
            if isinstance(e, TimeoutError):  # cancelled, so not counted by the store
                metrics.CLICKHOUSE_ERRORS.labels("query").inc()
            self._flushed = flushed + self._flushed
            if self.healthy:
                log.warning("counter refresh failed (%s): serving the last numbers as stale", e)
            if self._reads_failing_since is None:
                self._reads_failing_since = time.monotonic()
            self.read_error = str(e) or type(e).__name__
            self.healthy = False
            self._serve_stale()
            return
        self.healthy = True
        self._reads_failing_since = None
        metrics.COUNTER_AGE.set(now_ms / 1000)
        # The broker has not answered for a while: what ClickHouse holds no longer follows the
        # beacons (they wait in ingest's spool), and who is online would only wear away. The
        # last good numbers stay, with their as_of, marked stale (fresh ones, marked, for a
        # site that has none yet).
        silence, rebalancing, failing = self.silent(), self.rebalancing(), self.writes_failing()
        lagging = self._lagging(now_ms)
        unattended = self._unattended(snap.alive)
        metrics.PARTITIONS_UNATTENDED.set(len(unattended))
        silent = (
            silence > SILENT_SECONDS
            or rebalancing > REBALANCE_STALE_SECONDS
            or failing > WRITES_FAILING_STALE_SECONDS
            or lagging > BEHIND_STALE_SECONDS
            or bool(unattended)
        )
        if silent and not self._silent_logged:
            if lagging > BEHIND_STALE_SECONDS:
                log.warning(
                    "reading behind the log's end for %.0f s (%d records wait): numbers are stale",
                    lagging,
                    self.behind(),
                )
            elif failing > WRITES_FAILING_STALE_SECONDS:
                log.warning(
                    "ClickHouse has refused the events' writes for %.0f s: numbers are stale",
                    failing,
                )
            elif rebalancing:
                log.warning(
                    "no partition read for %.0f s (a rebalance of the consumer group, or the "
                    "counting state rebuilt): numbers are stale",
                    rebalancing,
                )
            elif unattended:
                log.warning(
                    "partitions %s of %s not counted for %.0f s (their consumer killed, frozen "
                    "or stuck; the group has not handed them on yet): numbers are stale",
                    ", ".join(map(str, unattended)),
                    self.topic,
                    self.unattended_seconds,
                )
            else:
                log.warning("the broker has not answered for %.0f s: numbers are stale", silence)
        self._silent_logged = silent
        new_peaks = {} if silent else self._note_peaks(snap, now_ms)
        stamps: dict[ZoneInfo, tuple[str, date]] = {}  # as_of and the day, per time zone
        for i, site in enumerate(self.registry, 1):
            if i % SITES_PER_SLICE == 0:
                await asyncio.sleep(0)  # the loop serves beacons between slices of many sites
            old = self.prepared.get(site.id)
            if silent and old is not None:
                if not old.payload["stale"]:
                    self.fanout.publish(site.id, prepare({**old.payload, "stale": True}))
                metrics.COUNTER_STALE.labels(site.id).set(1)
                continue
            stamp = stamps.get(site.tz)
            if stamp is None:
                local = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(site.tz)
                stamp = stamps[site.tz] = (local.isoformat(timespec="seconds"), local.date())
            made_of = (
                snap.online.get(site.id),
                snap.periods.get(site.id),
                snap.totals.get(site.id),
                snap.peaks.get(site.id),
                stamp[1],
                silent,
            )
            made = self._made.get(site.id)
            if old is not None and made is not None and made == (made_of, old.etag):
                # nothing its numbers are made of changed (and they are still what is served):
                # the same numbers, newer as_of; no stream event, the gauges as they were set
                self.fanout.replace(site.id, restamp(old, stamp[0]))
                continue
            payload = build_payload(site, snap, now_ms, stale=silent)
            online = payload["online"]
            for kind in ("guests", "members", "total", "bots"):
                metrics.ONLINE.labels(site.id, kind).set(online[kind])
            metrics.COUNTER_STALE.labels(site.id).set(int(silent))
            new = prepare(payload)
            self._made[site.id] = (made_of, new.etag)
            if old is None or old.etag != new.etag:
                self.fanout.publish(site.id, new)
            else:
                self.fanout.replace(site.id, new)  # same numbers, newer as_of; no stream event
        done = self.clock()
        for ts in flushed:
            metrics.FRESHNESS.observe(max(0.0, done - ts / 1000))
        self._unwritten.update(new_peaks)

    def _unattended(self, alive: Mapping[int, int]) -> list[int]:
        """The partitions of the topic that other processes count whose latest row of tallies
        (``alive``, as read) has stayed as it was for ``unattended_seconds``. Its owner's
        clock made it, so it is compared with the one read before, never with this process's
        clock. A partition never tallied is not judged: its first owner has not written yet,
        and the group's rebalance says so."""
        parts = self.others()
        if parts is None:
            return []
        now = self.monotonic()
        out = []
        for p in list(self._heard):
            if p not in parts:  # this process's now, or gone: heard anew when it comes back
                del self._heard[p]
        for p in sorted(parts):
            at = alive.get(p)
            if at is None:
                continue
            heard = self._heard.get(p)
            if heard is None or at > heard[0]:  # (an older one: a replica behind the others)
                self._heard[p] = (at, now)
            elif now - heard[1] > self.unattended_seconds:
                out.append(p)
        return out

    def _lagging(self, now_ms: int) -> float:
        """Seconds the numbers fall behind the beacons while records wait past what was read:
        as long as records have waited, and as old as the newest event written (under a
        steady load records always wait, but the newest written is a moment old)."""
        if self.behind() <= 0:
            self._behind_since = None
            self.behind_seconds = 0.0
            return 0.0
        now = now_ms / 1000
        if self._behind_since is None:
            self._behind_since = now
        self.behind_seconds = min(now - self._behind_since, now - self._newest_ms / 1000)
        return self.behind_seconds

    async def write_peaks(self) -> None:
        """Store the new peaks seen since the last write, every site's in one insert. Until
        then the counter shows them from memory (``_peak``); a failed write is tried again with
        the next one."""
        if not self._unwritten:
            return
        peaks, self._unwritten = self._unwritten, {}
        try:
            await self.store.record_peaks(peaks)
        except Exception as e:
            log.warning("could not record the peaks of %s: %s", ", ".join(sorted(peaks)), e)
            for site, peak in peaks.items():  # unless a newer one came meanwhile
                self._unwritten.setdefault(site, peak)

    def _write_peaks_soon(self) -> None:
        """Write the new peaks in the background, one write at a time, at most one every
        ``peak_write_seconds``: while the online numbers climb, every refresh has a new peak, and a
        write of its own after each would keep the reading thread from the next refresh (an
        insert is a new part: ~25 ms under load)."""
        writer = self._peak_writer
        if not self._unwritten or (writer is not None and not writer.done()):
            return
        now = time.monotonic()
        if now - self._peaks_written_at < self._peak_write_seconds:
            return
        self._peaks_written_at = now
        self._peak_writer = asyncio.ensure_future(self.write_peaks())

    async def last_look(self, timeout: float = 10.0) -> None:
        """Once the consumer has written its last batch (a graceful stop): one more refresh, so
        that a peak its events made is stored before the process goes (the next process would
        not see those visitors together again)."""
        try:
            await asyncio.wait_for(self._refresh_and_store_peaks(), timeout)
        except Exception as e:  # the stop goes on; what was counted is stored all the same
            log.warning("no last look at the numbers before stopping (%s)", e or type(e).__name__)

    async def _refresh_and_store_peaks(self) -> None:
        await self.refresh()
        await self.write_peaks()

    def _note_peaks(self, snap: Snapshot, now_ms: int) -> dict[str, tuple[int, int]]:
        """The new peaks: the sites whose online total now beats their peak (stored, or seen by
        this process), with the peak to record. Puts every peak seen by this process that
        ClickHouse does not hold yet in ``snap``. Only the sites with someone online are looked
        at, and those with such a peak: not every site of a large registry at every refresh."""
        beaten: dict[str, tuple[int, int]] = {}
        for site_id, online in snap.online.items():
            total = online.guests + online.members
            if total <= 0 or self.registry.get(site_id) is None:
                continue
            known = max(self._peaks.get(site_id, (0, 0)), snap.peaks.get(site_id, (0, 0)))
            if total > known[0]:
                beaten[site_id] = self._peaks[site_id] = (total, now_ms)
        for site_id, peak in list(self._peaks.items()):
            if peak[0] > snap.peaks.get(site_id, (0, 0))[0]:
                snap.peaks[site_id] = peak
            else:
                del self._peaks[site_id]  # what was read holds it (or a greater one)
        return beaten

    async def run(self, stopping: asyncio.Event, min_gap_seconds: float = 0.1) -> None:
        """Refresh every ``interval`` seconds, and right after a flush lands (``note_flushed``),
        but never more often than every ``min_gap_seconds``. Flushes come every
        ``flush_interval_seconds`` or so, so in practice a refresh follows each flush."""
        try:
            await self._run(stopping, min_gap_seconds)
        finally:
            # the peaks seen last are stored before the process goes
            if self._peak_writer is not None:
                await asyncio.gather(self._peak_writer, return_exceptions=True)
            await self.write_peaks()

    async def _run(self, stopping: asyncio.Event, min_gap_seconds: float) -> None:
        landed = self._landed
        while not stopping.is_set():
            started = time.monotonic()
            landed.clear()  # a flush landing during the refresh wakes the next one
            refreshing = asyncio.ensure_future(self.refresh())
            done, _ = await asyncio.wait({refreshing}, timeout=SLOW_REFRESH_STALE_SECONDS)
            if not done:
                # ClickHouse hung: the refresh fails only after its 10 s; the numbers are
                # stale from now (an outside audit saw them served as fresh for 10.5 s)
                if self.healthy:
                    log.warning(
                        "counter refresh has not answered for %.0f s: serving the last numbers "
                        "as stale",
                        SLOW_REFRESH_STALE_SECONDS,
                    )
                self.healthy = False
                self._serve_stale()
                await refreshing
            self._write_peaks_soon()
            # the earliest next refresh, and the latest
            soon = started + min(min_gap_seconds, self.interval)
            tick = started + max(0.05, self.interval)
            while not stopping.is_set() and not landed.is_set():
                left = tick - time.monotonic()
                if left <= 0:
                    break
                await first_set(stopping, landed, left)
            left = soon - time.monotonic()
            if left > 0 and not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), left)


async def first_set(a: asyncio.Event, b: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until ``a`` or ``b`` is set, at most ``timeout`` seconds (None: no limit)."""
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
