"""The counter: every tick, the numbers of every site are computed once (four ClickHouse
queries for all sites) and prepared as ready bytes with their ETag, then served to every
request and every stream subscriber as they are.

``stale`` turns true when a refresh fails: the last good numbers stay, with their ``as_of``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from services import metrics
from services.aggregate.store import Online, Snapshot, Store
from services.sites import Registry, Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    payload: dict[str, Any]
    body: bytes
    etag: str
    event: bytes  # the server-sent event carrying ``body``


def periods(today: date) -> dict[str, tuple[date, date]]:
    """The spec's periods as inclusive date ranges (ISO weeks start on Monday)."""
    yesterday = today - timedelta(days=1)
    return {
        "today": (today, today),
        "yesterday": (yesterday, yesterday),
        "this_week": (today - timedelta(days=today.weekday()), today),
        "this_month": (today.replace(day=1), today),
    }


def earliest_day(today: date) -> date:
    return min(start for start, _ in periods(today).values())


def build_payload(site: Site, snap: Snapshot, now_ms: int, stale: bool) -> dict[str, Any]:
    tz = site.tz
    now = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(tz)
    days = snap.days.get(site.id, {})
    total_visits, total_pageviews = snap.totals.get(site.id, (0, 0))
    visits: dict[str, int] = {}
    pageviews: dict[str, int] = {}
    for name, (start, end) in periods(now.date()).items():
        v = p = 0
        for day, (dv, dp) in days.items():
            if start <= day <= end:
                v += dv
                p += dp
        visits[name] = v
        pageviews[name] = p
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


def _iso(ms: int, site: Site) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(site.tz).isoformat(timespec="seconds")


def prepare(payload: dict[str, Any]) -> Prepared:
    body = orjson.dumps(payload)
    # The ETag covers the numbers, not ``as_of``: an unchanged counter revalidates as 304.
    numbers = {k: v for k, v in payload.items() if k != "as_of"}
    etag = '"' + hashlib.sha256(orjson.dumps(numbers)).hexdigest()[:24] + '"'
    return Prepared(payload, body, etag, b"data: " + body + b"\n\n")


class CounterService:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        interval_seconds: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry
        self.interval = interval_seconds
        self.clock = clock
        self.prepared: dict[str, Prepared] = {}
        self.healthy = False
        self._changed: dict[str, asyncio.Event] = {s.id: asyncio.Event() for s in registry}
        self._peaks: dict[str, tuple[int, int]] = {}
        self._flushed: list[int] = []  # ts (ms) of events written since the last refresh

    def note_flushed(self, ts_ms: list[int]) -> None:
        self._flushed.extend(ts_ms)

    def changed(self, site: str) -> asyncio.Event:
        return self._changed[site]

    async def refresh(self) -> None:
        now_ms = int(self.clock() * 1000)
        flushed, self._flushed = self._flushed, []
        windows = {s.id: s.online_window_seconds for s in self.registry}
        since = min(
            (
                earliest_day(datetime.fromtimestamp(now_ms / 1000, s.tz).date())
                for s in self.registry
            ),
            default=date.today(),
        )
        try:
            snap = await asyncio.wait_for(self.store.snapshot(windows, since, now_ms), 10)
        except Exception as e:
            self._flushed = flushed + self._flushed
            if self.healthy:
                log.warning("counter refresh failed (%s): serving the last numbers as stale", e)
            self.healthy = False
            for site_id, prep in list(self.prepared.items()):
                if not prep.payload["stale"]:
                    self._publish(site_id, prepare({**prep.payload, "stale": True}))
                metrics.COUNTER_STALE.labels(site_id).set(1)
            return
        self.healthy = True
        metrics.COUNTER_AGE.set(now_ms / 1000)
        for site in self.registry:
            await self._record_peak(site, snap, now_ms)
            payload = build_payload(site, snap, now_ms, stale=False)
            online = payload["online"]
            for kind in ("guests", "members", "total", "bots"):
                metrics.ONLINE.labels(site.id, kind).set(online[kind])
            metrics.COUNTER_STALE.labels(site.id).set(0)
            old = self.prepared.get(site.id)
            new = prepare(payload)
            if old is None or old.etag != new.etag:
                self._publish(site.id, new)
            else:
                self.prepared[site.id] = new  # same numbers, newer as_of; no stream event
        done = self.clock()
        for ts in flushed:
            metrics.FRESHNESS.observe(max(0.0, done - ts / 1000))

    async def _record_peak(self, site: Site, snap: Snapshot, now_ms: int) -> None:
        known = max(self._peaks.get(site.id, (0, 0)), snap.peaks.get(site.id, (0, 0)))
        online = snap.online.get(site.id, Online())
        total = online.guests + online.members
        if total > known[0]:
            known = (total, now_ms)
            try:
                await self.store.record_peak(site.id, total, now_ms)
            except Exception as e:
                log.warning("could not record the peak of %s: %s", site.id, e)
        self._peaks[site.id] = known
        if known[0] > snap.peaks.get(site.id, (0, 0))[0]:
            snap.peaks[site.id] = known

    def _publish(self, site_id: str, prepared: Prepared) -> None:
        self.prepared[site_id] = prepared
        event = self._changed[site_id]
        self._changed[site_id] = asyncio.Event()
        event.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            await self.refresh()
            elapsed = time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.05, self.interval - elapsed))
