"""The counting rules of visitorstats, in one place. Pure: no I/O, no clock of its own.

Both paths run this code: ``visitorstats run`` (in-process hand-off) and the Kafka consumer.
It decides, for each event of one partition taken in log order, what the event counts for:

* a **duplicate** ``event_id`` (within ``dedup_horizon``) counts for nothing and is not stored;
* a **bot** is stored for the ``online.bots`` tally and is never a visit or a page view;
* a **visit** starts with a ``pageview`` after ``visit_timeout`` without any event from that
  visitor (or their first ever); heartbeats and leaves keep a visit alive, never start one;
* a **page view** is every accepted ``pageview``;
* the **day** of a visit or page view is the date of its ``ts`` in the site's time zone.

Who is *online* is answered from the stored rows (see ``store.py``), so that every aggregate
process serves the same number; the state kept here is only what the decisions above need:
per visitor the time of their latest event, the keys linked across a salt rotation, and the
recent event ids. That state is a function of the partition's recent rows, so it is rebuilt
from ClickHouse on start and on rebalance by ``replay`` (exactly the decisions made before).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from services.record import Event


@dataclass(slots=True)
class Row:
    """One stored event: the event as consumed, plus what the rules made of it."""

    event: Event
    visitor: str  # the canonical visitor key (linked across salt rotations)
    starts_visit: bool
    pageview: bool
    day: date
    partition: int
    offset: int


def local_day(ts_ms: int, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(tz).date()


class PartitionState:
    """Counting state of one partition. Bounded: visitors idle longer than the visit timeout
    and event ids older than the dedup horizon are forgotten by ``expire``; on top of that at
    most ``max_visitors`` are kept (the longest idle is forgotten first, which at worst starts
    a new visit for them — a stated bound under a flood of fake visitors)."""

    __slots__ = (
        "_aliases",
        "_dedup_ms",
        "_max_visitors",
        "_seen",
        "_timeout_ms",
        "_visitors",
        "high_ts",
        "partition",
    )

    def __init__(
        self,
        partition: int,
        visit_timeout_s: int = 1800,
        dedup_horizon_s: int = 3600,
        max_visitors: int = 2_000_000,
    ) -> None:
        self.partition = partition
        self._timeout_ms = visit_timeout_s * 1000
        self._dedup_ms = dedup_horizon_s * 1000
        self._max_visitors = max_visitors
        # "site:canonical visitor" -> ts of their latest event (humans only), oldest first
        self._visitors: OrderedDict[str, int] = OrderedDict()
        self._aliases: dict[str, str] = {}  # "site:key under a later salt" -> canonical key
        self._seen: OrderedDict[str, int] = OrderedDict()  # (site, event_id) -> ts
        self.high_ts = 0  # the latest ts seen in this partition: "now" for expiry

    def __len__(self) -> int:
        return len(self._visitors)

    def canonical(self, event: Event) -> str:
        """The visitor's key as first seen: a key under a new salt that carries a known key of
        the previous salt (``visitor_prev``) is linked to it. Keys are per site."""
        site = event.site + ":"
        visitor = event.visitor
        known = self._aliases.get(site + visitor)
        if known is not None:
            return known
        if site + visitor in self._visitors:
            return visitor
        prev = event.visitor_prev
        if prev is not None:
            linked = self._aliases.get(site + prev, prev)
            if site + linked in self._visitors:
                self._aliases[site + visitor] = linked
                return linked
        return visitor

    def apply(self, event: Event, tz: ZoneInfo, partition: int, offset: int) -> Row | None:
        """Decide what ``event`` counts for; ``None`` for a duplicate."""
        seen_key = event.site + event.event_id
        if seen_key in self._seen:
            return None
        self._seen[seen_key] = event.ts
        if event.ts > self.high_ts:
            self.high_ts = event.ts
        if event.bot:
            return Row(
                event, event.visitor, False, False, local_day(event.ts, tz), partition, offset
            )
        visitor = self.canonical(event)
        key = event.site + ":" + visitor
        last = self._visitors.pop(key, None)
        starts_visit = event.type == "pageview" and (
            last is None or event.ts - last >= self._timeout_ms
        )
        self._visitors[key] = event.ts if last is None else max(last, event.ts)
        if len(self._visitors) > self._max_visitors:
            self._forget_visitor()
        return Row(
            event,
            visitor,
            starts_visit,
            event.type == "pageview",
            local_day(event.ts, tz),
            partition,
            offset,
        )

    def replay(self, event: Event, visitor: str) -> None:
        """Re-apply a stored row's effect on the state (no decision is made again)."""
        self._seen[event.site + event.event_id] = event.ts
        if event.ts > self.high_ts:
            self.high_ts = event.ts
        if event.bot:
            return
        site = event.site + ":"
        if visitor != event.visitor:
            self._aliases[site + event.visitor] = visitor
        last = self._visitors.pop(site + visitor, None)
        self._visitors[site + visitor] = event.ts if last is None else max(last, event.ts)

    def _forget_visitor(self) -> None:
        visitor, _ = self._visitors.popitem(last=False)
        # aliases pointing at a forgotten visitor are dropped lazily by expire()
        del visitor

    def expire(self) -> None:
        """Forget what can no longer change a decision (relative to the partition's latest ts)."""
        now = self.high_ts
        idle_before = now - self._timeout_ms
        visitors = self._visitors
        # Most-recently-updated visitors are at the end: stop at the first one still active.
        while visitors:
            _visitor, ts = next(iter(visitors.items()))
            if ts >= idle_before:
                break
            visitors.popitem(last=False)
        seen_before = now - self._dedup_ms
        seen = self._seen
        while seen:
            _key, ts = next(iter(seen.items()))
            if ts >= seen_before:
                break
            seen.popitem(last=False)
        if self._aliases:
            self._aliases = {
                k: v for k, v in self._aliases.items() if k.split(":", 1)[0] + ":" + v in visitors
            }
