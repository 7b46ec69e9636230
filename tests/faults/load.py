"""Portal traffic for the fault-injection suite, and its ground truth.

A ``Plan`` is a list of visitor scripts (deterministic from a seed). The truth is computed
from the plan alone, by the counting rules of the spec, never by asking the product:

* every human visitor's first event is a page view and their events are minutes apart at
  most, so each human visitor is exactly one visit, on the day of their first page view;
* page views are the human ``pageview`` events;
* online: a human visitor whose last event is not a ``leave`` is online, a member when that
  last event says so; bots are counted apart, one per (address, User-Agent).

A ``Sender`` plays a plan against one or more ingest URLs from a pool of threads, each with
keep-alive connections. A visitor's events are sent one after another (each waits for the 202
of the previous one), visitors in parallel. A beacon that is refused (503, 429) or whose
connection fails is resent with the same ``event_id`` — what a browser's retry does — until it
is accepted, so the truth holds whichever process took it and however often.
"""

from __future__ import annotations

import http.client
import json
import queue
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from tests.support.procs import CHROME_UA

BOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
SITE = "dongha"
TZ = ZoneInfo("Asia/Ho_Chi_Minh")
BASELINE_VISITS = 23070412
BASELINE_PAGEVIEWS = 1000


@dataclass(frozen=True)
class Beacon:
    type: str
    member: bool
    event_id: str
    url: str


@dataclass
class Visitor:
    client: str  # the address, sent as X-Forwarded-For through the trusted local proxy
    bot: bool
    events: list[Beacon]
    first_sent: float | None = None  # wall-clock time of the first 202 (its day)


def client_address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


@dataclass
class Plan:
    visitors: list[Visitor]

    @classmethod
    def generate(
        cls,
        beacons: int,
        seed: int = 1,
        first_client: int = 1,
        bots: float = 0.03,
        per_visitor: tuple[int, int] = (1, 8),
        bot_events: tuple[int, int] = (1, 3),
        leaves: float = 0.2,
    ) -> Plan:
        """About ``beacons`` beacons: humans with ``per_visitor`` events (first a page view; some
        members, some who log in on the way, some who leave), and a few bots."""
        rng = random.Random(seed)
        visitors: list[Visitor] = []
        total = 0
        i = first_client
        while total < beacons:
            client = client_address(i)
            i += 1
            if rng.random() < bots:
                events = [
                    Beacon("pageview", False, str(uuid.UUID(int=rng.getrandbits(128))), _url(rng))
                    for _ in range(rng.randint(*bot_events))
                ]
                visitors.append(Visitor(client, True, events))
                total += len(events)
                continue
            member = rng.random() < 0.25
            logs_in_at = rng.randint(1, 6) if not member and rng.random() < 0.1 else None
            n = rng.randint(*per_visitor)
            events = []
            for k in range(n):
                if logs_in_at is not None and k >= logs_in_at:
                    member = True
                kind = "pageview" if k == 0 else rng.choice(["pageview", "heartbeat"])
                events.append(
                    Beacon(kind, member, str(uuid.UUID(int=rng.getrandbits(128))), _url(rng))
                )
            if rng.random() < leaves:
                events.append(
                    Beacon("leave", member, str(uuid.UUID(int=rng.getrandbits(128))), _url(rng))
                )
            visitors.append(Visitor(client, False, events))
            total += len(events)
        return cls(visitors)

    def __len__(self) -> int:
        return sum(len(v.events) for v in self.visitors)

    def expected(self, as_of: str) -> dict[str, Any]:
        """The counter's numbers (``procs.numbers`` shape) for the counter's ``as_of``."""
        today = datetime.fromisoformat(as_of).astimezone(TZ).date()
        guests = members = bots = 0
        visit_days: list[date] = []
        pageview_days: list[date] = []
        for v in self.visitors:
            assert v.first_sent is not None, "a visitor of the plan was never sent"
            if v.bot:
                bots += 1
                continue
            last = v.events[-1]
            if last.type != "leave":
                members += last.member
                guests += not last.member
            day = datetime.fromtimestamp(v.first_sent, TZ).date()
            visit_days.append(day)
            pageview_days.extend(day for e in v.events if e.type == "pageview")
        return {
            "online": {
                "guests": guests,
                "members": members,
                "total": guests + members,
                "bots": bots,
            },
            "visits": periods(visit_days, today, BASELINE_VISITS),
            "pageviews": periods(pageview_days, today, BASELINE_PAGEVIEWS),
        }


def periods(days: list[date], today: date, baseline: int) -> dict[str, int]:
    monday = today - timedelta(days=today.weekday())
    return {
        "today": sum(d == today for d in days),
        "yesterday": sum(d == today - timedelta(days=1) for d in days),
        "this_week": sum(monday <= d <= today for d in days),
        "this_month": sum(today.replace(day=1) <= d <= today for d in days),
        "total": baseline + len(days),
    }


def _url(rng: random.Random) -> str:
    return f"https://portal.example.vn/tin-tuc/{rng.randint(1, 500)}"


@dataclass
class Accepted:
    event_id: str
    at: float  # time.monotonic() when the 202 arrived


@dataclass
class Sender:
    """Plays a plan from ``threads`` threads. ``bases`` may be changed while it runs (a list
    is read on every request). ``twice``: every beacon is sent a second time with the same
    ``event_id`` once the first was accepted. ``retry=False``: a beacon that is not accepted
    is given up (and its visitor stops) instead of resent."""

    bases: list[str]
    plan: Plan
    threads: int = 24
    twice: bool = False
    retry: bool = True
    spacing: float = 0.0  # seconds between two events of one visitor
    rate: float = 0.0  # beacons per second, all threads together (0: as fast as possible)
    give_up_after: float = 600.0
    statuses: Counter[int | str] = field(default_factory=Counter)
    accepted: list[Accepted] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: int = 0  # beacons accepted (202) so far, duplicates included
    _queue: queue.Queue[Visitor | None] = field(default_factory=queue.Queue)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _next_at: float = 0.0

    def start(self) -> Sender:
        for v in self.plan.visitors:
            self._queue.put(v)
        for _ in range(self.threads):
            self._queue.put(None)
        for n in range(self.threads):
            t = threading.Thread(target=self._work, name=f"sender-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def progress(self) -> float:
        return self.sent / max(1, len(self.plan) * (2 if self.twice else 1))

    def wait_progress(self, fraction: float, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.progress() < fraction and not self.done():
            assert time.monotonic() < deadline, f"traffic stuck at {self.progress():.0%}"
            time.sleep(0.05)

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def join(self, timeout: float = 600) -> Sender:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert self.done(), f"traffic not finished in {timeout}s ({self.progress():.0%})"
        assert not self.errors, self.errors[:5]
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    # -- the workers ----------------------------------------------------------------------------
    def _work(self) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        rr = random.Random(threading.get_ident())
        try:
            while not self._stop.is_set():
                visitor = self._queue.get()
                if visitor is None:
                    return
                for k, beacon in enumerate(visitor.events):
                    if k and self.spacing:
                        time.sleep(self.spacing)
                    for _ in range(2 if self.twice else 1):
                        if not self._deliver(conns, rr, visitor, beacon):
                            break
                    else:
                        continue
                    break
        except Exception as e:  # a bug in the test itself: make it visible
            self.errors.append(repr(e))
        finally:
            for c in conns.values():
                c.close()

    def _deliver(
        self,
        conns: dict[str, http.client.HTTPConnection],
        rr: random.Random,
        visitor: Visitor,
        beacon: Beacon,
    ) -> bool:
        body = json.dumps(
            {
                "site": SITE,
                "type": beacon.type,
                "url": beacon.url,
                "member": beacon.member,
                "event_id": beacon.event_id,
            }
        ).encode()
        headers = {
            "Content-Type": "text/plain",
            "User-Agent": BOT_UA if visitor.bot else CHROME_UA,
            "X-Forwarded-For": visitor.client,
        }
        deadline = time.monotonic() + self.give_up_after
        backoff = 0.1
        if self.rate:
            with self._lock:
                now = time.monotonic()
                self._next_at = max(self._next_at + 1 / self.rate, now)
                wait = self._next_at - now
            time.sleep(wait)
        while not self._stop.is_set():
            bases = self.bases
            base = bases[rr.randrange(len(bases))]
            status: int | str
            retry_after = None
            try:
                conn = conns.get(base)
                if conn is None:
                    u = urlsplit(base)
                    conn = conns[base] = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                conn.request("POST", "/collect", body, headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                retry_after = resp.getheader("Retry-After")
                if resp.getheader("Connection", "").lower() == "close":
                    conns.pop(base).close()
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                stale = conns.pop(base, None)
                if stale is not None:
                    stale.close()
            with self._lock:
                self.statuses[status] += 1
                if status == 202:
                    self.sent += 1
                    now = time.monotonic()
                    self.accepted.append(Accepted(beacon.event_id, now))
                    if visitor.first_sent is None:
                        visitor.first_sent = time.time()
                    return True
            if status in (400, 403, 413, 415):
                self.errors.append(f"{status} for {beacon}")
                return False
            if not self.retry or time.monotonic() > deadline:
                return False
            if status == 503 and retry_after is not None:
                assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
            time.sleep(backoff * (0.5 + rr.random()))
            backoff = min(backoff * 2, 1.0)
        return False
