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

Memory per online visitor is what limits a partition, so the state is compact: a visitor key
(32 hex characters, as ingest makes them) and an event id (a UUID) are each kept as one
integer with the site folded into its high bits, in plain insertion-ordered dicts (an update
moves a visitor to the end); about 200 bytes per online visitor with one recent event id,
against about 400 with "site:hex" strings in ``OrderedDict``s (``make bench`` measures it).
Keys of any other shape (tests, foreign producers) are kept as strings: same decisions.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from itertools import islice
from typing import NamedTuple
from zoneinfo import ZoneInfo

from services.record import Event


class Row(NamedTuple):
    """One stored event: the event as consumed, plus what the rules made of it (a named
    tuple: one is made per event)."""

    event: Event
    visitor: str  # the canonical visitor key (linked across salt rotations)
    starts_visit: bool
    pageview: bool
    day: date
    partition: int
    offset: int


# tz -> (first ms, ms after the last, date) of the latest local day seen in that zone
_DAYS: dict[ZoneInfo, tuple[int, int, date]] = {}


def _day_of(ts_ms: int, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).astimezone(tz).date()


def local_day(ts_ms: int, tz: ZoneInfo) -> date:
    """The date of ``ts_ms`` in ``tz``. Events come in time order, so the bounds of the last
    day met per zone answer almost every call without converting a time stamp."""
    known = _DAYS.get(tz)
    if known is not None and known[0] <= ts_ms < known[1]:
        return known[2]
    day = _day_of(ts_ms, tz)
    start = datetime(day.year, day.month, day.day, tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), start.timetz())
    start_ms, end_ms = round(start.timestamp() * 1000), round(end.timestamp() * 1000)
    # Cached only for a day with one UTC offset throughout (not a daylight-saving day), checked
    # against the exact conversion at both ends.
    if (
        start.utcoffset() == end.utcoffset()
        and start_ms <= ts_ms < end_ms
        and _day_of(start_ms, tz) == day
        and _day_of(end_ms - 1, tz) == day
        and _day_of(end_ms, tz) != day
    ):
        _DAYS[tz] = (start_ms, end_ms, day)
    return day


_LOW = (1 << 128) - 1
_HEX_DIGITS = "0123456789abcdef"
_new_row = tuple.__new__  # Row(...) without the named tuple's Python-level __new__

# A visitor or an event id of one site: an int (site number << 128 | the 128-bit key or UUID)
# or, for any other shape, the string "site:key".
Key = int | str


def _visitor_of(key: Key) -> str:
    if isinstance(key, int):
        return f"{key & _LOW:032x}"
    return key.partition(":")[2]


class PartitionState:
    """Counting state of one partition. Bounded: visitors idle longer than the visit timeout
    and event ids older than the dedup horizon are forgotten by ``expire`` (which also keeps at
    most ``max_visitors`` event ids, oldest forgotten first); on top of that at most
    ``max_visitors`` visitors are kept (the longest idle is forgotten first, which at worst starts
    a new visit for them — a stated bound under a flood of fake visitors; once the cap is
    passed, the longest idle 0.1 % of the cap go at once, so that a flood costs O(1) a visitor)."""

    __slots__ = (
        "_aliases",
        "_dedup_ms",
        "_max_visitors",
        "_seen",
        "_sites",
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
        # visitor key (site + canonical visitor) -> ts of their latest event (humans only),
        # least recently updated first
        self._visitors: dict[Key, int] = {}
        self._aliases: dict[Key, Key] = {}  # key under a later salt -> canonical key
        self._seen: dict[Key, int] = {}  # (site, event_id) -> ts, in arrival order
        self._sites: dict[str, int] = {}  # site id -> its number, shifted past the 128 bits
        self.high_ts = 0  # the latest ts seen in this partition: "now" for expiry

    def __len__(self) -> int:
        return len(self._visitors)

    def _site(self, site: str) -> int:
        bits = self._sites.get(site)
        if bits is None:
            bits = self._sites[site] = (len(self._sites) + 1) << 128
        return bits

    @staticmethod
    def _visitor_key(bits: int, site: str, visitor: str) -> Key:
        if len(visitor) == 32 and not visitor.strip(_HEX_DIGITS):  # 32 lowercase hex digits
            return bits | int(visitor, 16)
        return site + ":" + visitor

    @staticmethod
    def _event_key(bits: int, site: str, event_id: str) -> Key:
        digits = event_id.replace("-", "")
        if (  # a UUID in canonical form: 8-4-4-4-12 lowercase hex digits
            len(digits) == 32
            and len(event_id) == 36
            and event_id[8] == event_id[13] == event_id[18] == event_id[23] == "-"
            and not digits.strip(_HEX_DIGITS)
        ):
            return bits | int(digits, 16)
        return site + ":" + event_id

    def _canonical(self, event: Event, bits: int, own: Key) -> Key:
        known = self._aliases.get(own)
        if known is not None:
            return known
        if own in self._visitors:
            return own
        prev = event.visitor_prev
        if prev is not None:
            prev_key = self._visitor_key(bits, event.site, prev)
            linked = self._aliases.get(prev_key, prev_key)
            if linked in self._visitors:
                self._aliases[own] = linked
                return linked
        return own

    def canonical(self, event: Event) -> str:
        """The visitor's key as first seen: a key under a new salt that carries a known key of
        the previous salt (``visitor_prev``) is linked to it. Keys are per site."""
        bits = self._site(event.site)
        own = self._visitor_key(bits, event.site, event.visitor)
        key = self._canonical(event, bits, own)
        return event.visitor if key == own else _visitor_of(key)

    def apply(self, event: Event, tz: ZoneInfo, partition: int, offset: int) -> Row | None:
        """Decide what ``event`` counts for; ``None`` for a duplicate."""
        # (``_site``, ``_event_key`` and ``_visitor_key`` inlined: this runs once per event)
        site = event.site
        bits = self._sites.get(site)
        if bits is None:
            bits = self._site(site)
        event_id = event.event_id
        digits = event_id.replace("-", "")
        if (
            len(digits) == 32
            and len(event_id) == 36
            and event_id[8] == event_id[13] == event_id[18] == event_id[23] == "-"
            and not digits.strip(_HEX_DIGITS)
        ):
            seen_key: Key = bits | int(digits, 16)
        else:
            seen_key = site + ":" + event_id
        seen = self._seen
        if seen_key in seen:
            return None
        ts = event.ts
        seen[seen_key] = ts
        if ts > self.high_ts:
            self.high_ts = ts
        day = local_day(ts, tz)
        visitor = event.visitor
        if event.bot:
            return _new_row(Row, (event, visitor, False, False, day, partition, offset))
        if len(visitor) == 32 and not visitor.strip(_HEX_DIGITS):
            own: Key = bits | int(visitor, 16)
        else:
            own = site + ":" + visitor
        key = self._canonical(event, bits, own)
        visitors = self._visitors
        last = visitors.pop(key, None)
        pageview = event.type == "pageview"
        starts_visit = pageview and (last is None or ts - last >= self._timeout_ms)
        visitors[key] = ts if last is None or ts > last else last
        if len(visitors) > self._max_visitors:
            self._forget_visitors()
        if key != own:
            visitor = _visitor_of(key)
        return _new_row(Row, (event, visitor, starts_visit, pageview, day, partition, offset))

    def replay(self, event: Event, visitor: str) -> None:
        """Re-apply a stored row's effect on the state (no decision is made again)."""
        site = event.site
        bits = self._site(site)
        ts = event.ts
        self._seen[self._event_key(bits, site, event.event_id)] = ts
        if ts > self.high_ts:
            self.high_ts = ts
        if event.bot:
            return
        key = self._visitor_key(bits, site, visitor)
        if visitor != event.visitor:
            self._aliases[self._visitor_key(bits, site, event.visitor)] = key
        visitors = self._visitors
        last = visitors.pop(key, None)
        visitors[key] = ts if last is None or ts > last else last

    def _forget_visitors(self) -> None:
        # aliases pointing at a forgotten visitor are dropped lazily by expire()
        visitors = self._visitors
        excess = len(visitors) - self._max_visitors + self._max_visitors // 1000
        for key in list(islice(visitors, excess)):
            del visitors[key]

    def expire(self) -> None:
        """Forget what can no longer change a decision (relative to the partition's latest ts)."""
        now = self.high_ts
        _drop_older(self._visitors, now - self._timeout_ms)
        _drop_older(self._seen, now - self._dedup_ms)
        # The dedup memory is bounded by count too (as many ids as visitors): under a flood from
        # many addresses the oldest ids go first, and only a resend older than them could count
        # twice.
        seen = self._seen
        excess = len(seen) - self._max_visitors
        if excess > 0:
            for key in list(islice(seen, excess)):
                del seen[key]
        if self._aliases:
            visitors = self._visitors
            self._aliases = {k: v for k, v in self._aliases.items() if v in visitors}


def _drop_older(entries: dict[Key, int], before: int) -> None:
    """Drop entries from the front while their ts is before ``before``: the oldest entries are
    at the front, and the walk stops at the first one still current."""
    doomed = []
    for key, ts in entries.items():
        if ts >= before:
            break
        doomed.append(key)
    for key in doomed:
        del entries[key]
