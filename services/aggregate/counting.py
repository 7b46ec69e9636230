"""The counting rules of visitorstats, in one place. Pure: no I/O, no clock of its own.

Both paths run this code: ``visitorstats run`` (in-process hand-off) and the Kafka consumer.
It decides, for each event of one partition taken in log order, what the event counts for:

* a **duplicate** ``event_id`` (within ``dedup_horizon``) counts for nothing and is not stored;
* a **bot** is stored for the ``online.bots`` tally and is never a visit or a page view;
* a **visit** starts with a ``pageview`` after ``visit_timeout`` without any event from that
  visitor (or their first ever); heartbeats and leaves keep a visit alive, never start one. A
  run of events (no gap of ``visit_timeout``) that began with a heartbeat or a leave has no
  visit to keep alive: its first page view begins one (a reader back at a tab hidden for an
  hour, who then reads on; a visitor whose first beacon was a heartbeat). So every run with a
  page view is one visit, whatever the order its events arrive in;
* a **page view** is every accepted ``pageview``;
* the **day** of a visit or page view is the date of its ``ts`` in the site's time zone.

"Latest" and "earlier" below compare ``(ts, micros)``: the time of acceptance to the
microsecond (ingest stamps both), then the log order.

Who is *online* is answered here too, per partition, from the same state: ingest keys a
visitor to one partition across salt rotations, and the partition's events come in log order,
so the state already sees, per canonical visitor, every row that decides it. The rules are
those of ``ONLINE_BY_QUERY`` (the oracle of the tests): over the rows of the last ``L`` seconds
(``L`` = the longest window of all sites), per (site, visitor), the latest row by
``(ts, micros, offset)``; online when it is within the site's window (``last >= now - window``)
and not a ``leave``; a bot when any of those rows is a bot, else a member when the latest row
says so, else a guest. ``now`` is given (``advance``); a timing wheel of seconds brings each visitor
back when its window ends, so a tick costs what changed, not the number of visitors. The
per-site tallies (``tallies``) are kept as visitors change.

That state is a function of the partition's recent rows, so it is rebuilt from ClickHouse on
start and on rebalance by ``replay`` (exactly the decisions made before, the same online
numbers).

Memory per online visitor is what limits a partition, so the state is compact: a visitor key
(32 hex characters, as ingest makes them) and an event id (a UUID) are each kept as one
integer with the site folded into its high bits, in plain insertion-ordered dicts (an update
moves a visitor to the end); a visitor's value is ONE integer, its latest time stamp (to the
microsecond: see ``_SHIFT``) with its online flags in the low bits, the very object the event id
of its latest event maps to. About 220 bytes per online visitor with one recent event id, the
timing wheel included (``python -m bench.inproc memory`` measures it). Bots are few: their state
is a small dict of its own. Keys of any other shape (tests, foreign producers) are kept as
strings: same decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from heapq import heappop, heappush
from itertools import islice
from typing import Any, NamedTuple
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
    # whether the visitor's run of events (no gap of the visit timeout) has its visit, as of
    # this row: False while a run that began with a heartbeat or a leave waits for its first
    # page view. Stored, so that a rebuild knows it of a run that began before the rows it
    # replays (``replay``).
    in_visit: bool = True


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
# A visitor's value as one int object, stored under two keys (the visitor and its latest event
# id): typed ``Any`` where it is handed on, because compiled (mypyc) code holds an ``int``
# unboxed and would box it anew for each store, two objects where the memory bound counts one.
Shared = Any


def _visitor_of(key: Key) -> str:
    if isinstance(key, int):
        return f"{key & _LOW:032x}"
    return key.partition(":")[2]


# A visitor's value, one int: ``stamp << _FLAG_BITS | flags``. The stamp is the time of their
# latest row (the max) in ms and the microseconds past it, ``ts << _MICRO_BITS | micros``, so
# ``value >> _SHIFT`` is its ms; the flags are those of the latest row by (stamp, offset) — rows
# come in offset order, so a row with a stamp ``>=`` the stored one replaces them — and what the
# visitor is counted as now. (Below 2**60, such a value is an int of two digits, as ``ts << 5``.)
_FLAG_BITS = 5
_MICRO_BITS = 10
_SHIFT = _FLAG_BITS + _MICRO_BITS
_LEAVE = 1  # the latest row is a ``leave``
_MEMBER = 2  # the latest row says ``member`` (for a bot entry: _NEWER)
_NEWER = 2  # bot entry: its latest row comes after the human latest row of the same stamp
_KIND = 12  # two bits: NONE, GUEST, MEMBER or BOT (what the tally counts this visitor as)
_WHEEL = 16  # the timing wheel holds an entry for this visitor
_KIND_SHIFT = 2
NONE, GUEST, MEMBER, BOT = 0, 1, 2, 3
DEFAULT_WINDOW_S = 300


class PartitionState:
    """Counting state of one partition, and who of it is online. Bounded: visitors idle longer
    than the visit timeout (and out of every online window) and event ids older than the dedup
    horizon are forgotten by ``expire`` (which also keeps at most ``max_visitors`` event ids,
    oldest forgotten first); on top of that at most ``max_visitors`` visitors are kept (the
    longest idle is forgotten first, which at worst starts a new visit for them and takes them
    out of the online tally — a stated bound under a flood of fake visitors; once the cap is
    passed, the longest idle 0.1 % of the cap go at once, so that a flood costs O(1) a visitor).

    Online: ``windows`` maps each site to its window in seconds (``None``: every site
    ``DEFAULT_WINDOW_S``; a site absent from a mapping given is never online). ``advance(now)``
    moves the clock (never back); ``tallies()`` gives (guests, members, bots) per site as of it.
    """

    __slots__ = (
        "_aliases",
        "_bots",
        "_cutoffs",
        "_dedup_ms",
        "_default_window",
        "_held",
        "_longest",
        "_max_visitors",
        "_names",
        "_now",
        "_runs",
        "_seen",
        "_sites",
        "_slots",
        "_tally",
        "_timeout_ms",
        "_visitors",
        "_wheel",
        "_windows",
        "high_ts",
        "partition",
    )

    def __init__(
        self,
        partition: int,
        visit_timeout_s: int = 1800,
        dedup_horizon_s: int = 3600,
        max_visitors: int = 2_000_000,
        windows: Mapping[str, int] | None = None,
    ) -> None:
        self.partition = partition
        self._timeout_ms = visit_timeout_s * 1000
        self._dedup_ms = dedup_horizon_s * 1000
        self._max_visitors = max_visitors
        # visitor key (site + canonical visitor) -> stamp << _FLAG_BITS | flags of their latest
        # event
        # (humans only), least recently updated first
        self._visitors: dict[Key, int] = {}
        self._aliases: dict[Key, Key] = {}  # key under a later salt -> canonical key
        # visitor keys whose current run of events has no visit yet (it began with a heartbeat
        # or a leave): their next page view begins it (see ``_note_run``); rare, so a set of
        # its own rather than a bit of every visitor's value
        self._runs: set[Key] = set()
        # (site, event_id) -> stamp << _FLAG_BITS (the visitor's very value when it is their
        # latest),
        # in arrival order
        self._seen: dict[Key, int] = {}
        self._sites: dict[str, int] = {}  # site id -> its number, shifted past the 128 bits
        self._names: list[str] = []  # site number - 1 -> site id
        self.high_ts = 0  # the latest ts seen in this partition: "now" for expiry
        # -- online --
        self._windows: dict[str, int] = {s: w * 1000 for s, w in (windows or {}).items()}
        self._default_window: int | None = DEFAULT_WINDOW_S * 1000 if windows is None else None
        self._longest = max(self._windows.values(), default=self._default_window or 0)
        # (site, visitor) of a bot row (the visitor as stored: not linked) -> stamp << _FLAG_BITS |
        # flags of their latest bot row; while an entry is here it holds the visitor's count
        self._bots: dict[Key, int] = {}
        self._tally: dict[str, list[int]] = {s: [0, 0, 0, 0] for s in self._windows}
        self._now = 0  # ms: the time the tally is for
        # site -> now - its window: online from that ms on (sites never online: absent)
        self._cutoffs: dict[str, int] = {s: -w for s, w in self._windows.items()}
        self._wheel: dict[int, list[Key]] = {}  # second -> visitors to judge again by then
        self._slots: list[int] = []  # heap of the wheel's seconds
        self._held: list[Key] | None = None  # while ``advance`` runs: due in its second

    def __len__(self) -> int:
        return len(self._visitors)

    def _site(self, site: str) -> int:
        bits = self._sites.get(site)
        if bits is None:
            self._names.append(site)
            bits = self._sites[site] = len(self._names) << 128
            window = self._window(site)
            if window is not None:
                self._cutoffs[site] = self._now - window
        return bits

    def _site_of(self, key: Key) -> str:
        if isinstance(key, int):
            return self._names[(key >> 128) - 1]
        return key.partition(":")[0]

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
        stamp = ts << 10 | event.micros  # (ts << _MICRO_BITS | micros)
        if ts > self.high_ts:
            self.high_ts = ts
        day = local_day(ts, tz)
        visitor = event.visitor
        if len(visitor) == 32 and not visitor.strip(_HEX_DIGITS):
            own: Key = bits | int(visitor, 16)
        else:
            own = site + ":" + visitor
        kind_of_event = event.type
        pageview = kind_of_event == "pageview"
        if event.bot:
            seen[seen_key] = stamp << _FLAG_BITS
            self._fold_bot(own, site, stamp, _LEAVE if kind_of_event == "leave" else 0)
            return _new_row(Row, (event, visitor, False, False, day, partition, offset, True))
        visitors = self._visitors
        aliases = self._aliases
        # (``_canonical``'s usual answers inlined: no alias, a known key or no previous key)
        if aliases and own in aliases:
            key = aliases[own]
        elif event.visitor_prev is None or own in visitors:
            key = own
        else:
            key = self._canonical(event, bits, own)
        old = visitors.pop(key, None)
        # The value's bits written as literals here (this runs once per event; a module
        # global costs a lookup each): _FLAG_BITS = 5, _SHIFT = 15, _WHEEL = 16,
        # _KIND = 12 (kind << 2), _MEMBER = 2, _LEAVE = 1.
        if old is None:
            starts_visit = pageview
            opens = True
            kept = 0
        else:
            opens = ts - (old >> 15) >= self._timeout_ms
            starts_visit = pageview and opens
            kept = old & 28  # _WHEEL | _KIND
        if self._runs or (opens and not pageview):  # (``_note_run``'s usual answers inlined)
            starts_visit = self._note_run(key, pageview, opens)
        if old is not None and stamp < old >> 5:  # a late row: the latest stays what it was
            visitors[key] = old
            seen[seen_key] = stamp << 5
            kept = -1
        if kept >= 0:
            flags = (1 if kind_of_event == "leave" else 0) | (2 if event.member else 0)
            bots = self._bots
            shared: Shared
            if bots and key in bots:
                shared = self._fold_human(key, old, site, stamp, flags)
            else:
                # ``_judge_human`` inlined
                cutoff = self._cutoffs.get(site)  # now - the site's window
                # NONE (a leave, or out of the window), else MEMBER or GUEST
                kind = 0 if flags & 1 or cutoff is None or ts < cutoff else 2 if flags & 2 else 1
                if kind != kept >> 2 & 3:
                    self._count(site, kept >> 2 & 3, kind)
                value = stamp << 5 | kept & 16 | kind << 2 | flags
                if kind and not kept & 16:
                    self._schedule(key, ts - cutoff + self._now + 1)  # type: ignore[operator]
                    value |= 16
                shared = value
                visitors[key] = shared
            seen[seen_key] = shared  # the same object: one int per visitor
        if len(visitors) > self._max_visitors:
            self._forget_visitors()
        if key != own:
            visitor = _visitor_of(key)
        in_visit = not (self._runs and key in self._runs)
        return _new_row(
            Row, (event, visitor, starts_visit, pageview, day, partition, offset, in_visit)
        )

    def _note_run(self, key: Key, pageview: bool, opens: bool) -> bool:
        """Keep ``_runs`` for a human event of ``key``; whether it starts a visit.

        ``opens``: no event of the visitor within the visit timeout before this one, as far as
        the events seen so far go (their first, or its ``ts`` at least the timeout after the
        latest): the event begins a run. A page view that begins a run begins its visit; a
        heartbeat or a leave begins a run without one, and the run's first page view to arrive
        begins it. (Events of one visitor can arrive out of time order: two ingest processes,
        a spool drained after an outage. Either way the run has exactly one visit.)"""
        runs = self._runs
        if opens:
            if pageview:
                runs.discard(key)
                return True
            runs.add(key)
            return False
        if pageview and key in runs:
            runs.remove(key)
            return True
        return False

    def replay(
        self, event: Event, visitor: str, starts_visit: bool = False, in_visit: bool = True
    ) -> None:
        """Re-apply a stored row's effect on the state (no decision is made again)."""
        site = event.site
        bits = self._site(site)
        ts = event.ts
        stamp = ts << _MICRO_BITS | event.micros
        seen_key = self._event_key(bits, site, event.event_id)
        if ts > self.high_ts:
            self.high_ts = ts
        flags = _LEAVE if event.type == "leave" else 0
        if event.bot:
            self._seen[seen_key] = stamp << _FLAG_BITS
            self._fold_bot(self._visitor_key(bits, site, visitor), site, stamp, flags)
            return
        key = self._visitor_key(bits, site, visitor)
        if visitor != event.visitor:
            self._aliases[self._visitor_key(bits, site, event.visitor)] = key
        visitors = self._visitors
        old = visitors.pop(key, None)
        # the run the row belongs to, as ``_note_run`` left it (the row says: its run may have
        # begun before the rows replayed)
        if in_visit:
            self._runs.discard(key)
        else:
            self._runs.add(key)
        if old is None or stamp >= old >> _FLAG_BITS:
            shared = self._fold_human(key, old, site, stamp, flags | event.member << 1)
            self._seen[seen_key] = shared
        else:
            visitors[key] = old
            self._seen[seen_key] = stamp << _FLAG_BITS

    # -- online --------------------------------------------------------------------------------
    @property
    def now(self) -> int:
        return self._now

    def tallies(self) -> dict[str, tuple[int, int, int]]:
        """(guests, members, bots) online per site as of ``now`` (every site of ``windows``)."""
        return {site: (t[GUEST], t[MEMBER], t[BOT]) for site, t in self._tally.items()}

    def advance(self, now_ms: int) -> None:
        """Move the clock to ``now_ms`` (never back): visitors whose window ended by then leave
        the tally. Costs the visitors due, not the number online."""
        if now_ms <= self._now:
            return
        self._now = now_ms
        cutoffs = self._cutoffs
        for site in cutoffs:
            cutoffs[site] = now_ms - self._window(site)  # type: ignore[operator]
        cur = now_ms // 1000
        slots, wheel = self._slots, self._wheel
        held = self._held = []
        try:
            while slots and slots[0] <= cur:
                for key in wheel.pop(heappop(slots)):
                    self._recheck(key)
        finally:
            self._held = None
        if held:
            wheel[cur] = held
            heappush(slots, cur)

    def _schedule(self, key: Key, due_ms: int) -> None:
        """Have ``advance`` judge ``key`` again by the time ``now`` reaches ``due_ms``."""
        slot = due_ms // 1000
        held = self._held
        if held is not None and slot <= self._now // 1000:
            held.append(key)  # in the second being judged: in its slot again, after it
            return
        keys = self._wheel.get(slot)
        if keys is None:
            self._wheel[slot] = [key]
            heappush(self._slots, slot)
        else:
            keys.append(key)

    def _count(self, site: str, was: int, kind: int) -> None:
        t = self._tally.get(site)
        if t is None:
            t = self._tally[site] = [0, 0, 0, 0]
        t[was] -= 1
        t[kind] += 1

    def _window(self, site: str) -> int | None:
        return self._windows.get(site, self._default_window)

    def _fold_human(self, key: Key, old: int | None, site: str, stamp: int, flags: int) -> Shared:
        """Store a visitor's new latest row (``stamp`` >= the stored one); return their value."""
        bots = self._bots
        if bots and key in bots:
            # the bot entry holds the count: the visitor's own value counts nothing
            value: Shared = stamp << _FLAG_BITS | flags
            self._visitors[key] = value
            b = bots[key]
            if b & _NEWER and stamp >= b >> _FLAG_BITS:
                b ^= _NEWER
            self._judge_bot(key, site, b)
            return value
        if old is not None:
            flags |= old & (_WHEEL | _KIND)
        return self._judge_human(key, site, stamp << _FLAG_BITS | flags)

    def _judge_human(self, key: Key, site: str, value: int) -> Shared:
        """Count a visitor without a bot entry for what ``value`` says at ``now``; store it (and
        return it) with its count, making sure the wheel brings it back when its window ends."""
        ts = value >> _SHIFT
        window = self._windows.get(site, self._default_window)
        if value & _LEAVE or window is None or ts < self._now - window:
            kind = NONE
        else:
            kind = MEMBER if value & _MEMBER else GUEST
        was = (value & _KIND) >> _KIND_SHIFT
        if kind != was:
            self._count(site, was, kind)
            value = value & ~_KIND | kind << _KIND_SHIFT
        if kind and not value & _WHEEL:
            assert window is not None
            self._schedule(key, ts + window + 1)
            value |= _WHEEL
        shared: Shared = value
        self._visitors[key] = shared
        return shared

    def _fold_bot(self, key: Key, site: str, stamp: int, flags: int) -> None:
        """A bot row of ``key`` (its visitor as stored, not linked) of time ``stamp``."""
        bots = self._bots
        b = bots.get(key)
        h = self._visitors.get(key)
        if b is None:
            b = 0
            if h is not None and h & (_KIND | _WHEEL):
                # from now on the bot entry holds the visitor's count
                was = (h & _KIND) >> _KIND_SHIFT
                if was:
                    self._count(site, was, NONE)
                self._visitors[key] = h & ~(_KIND | _WHEEL)
        elif stamp < b >> _FLAG_BITS:
            return  # an earlier bot row changes nothing
        if h is None or stamp >= h >> _FLAG_BITS:
            flags |= _NEWER
        self._judge_bot(key, site, stamp << _FLAG_BITS | b & (_KIND | _WHEEL) | flags)

    def _judge_bot(self, key: Key, site: str, b: int) -> None:
        """Count ``key`` of a bot entry ``b`` for what it is at ``now``: a bot while any bot row
        is within ``L`` and the latest row (bot or not) is online; the entry goes when its
        latest bot row leaves ``L`` (the visitor is then judged by its own rows)."""
        now, longest = self._now, self._longest
        bts = b >> _SHIFT
        h = self._visitors.get(key)
        was = (b & _KIND) >> _KIND_SHIFT
        if bts < now - longest:
            self._bots.pop(key, None)
            if was:
                self._count(site, was, NONE)
            if h is not None:
                self._judge_human(key, site, h)
            return
        bstamp = b >> _FLAG_BITS
        if h is None or bstamp > h >> _FLAG_BITS or (bstamp == h >> _FLAG_BITS and b & _NEWER):
            latest, leave = bts, b & _LEAVE
        else:
            latest, leave = h >> _SHIFT, h & _LEAVE
        window = self._window(site)
        due = bts + longest + 1
        if leave or window is None or latest < now - window:
            kind = NONE
        else:
            kind = BOT
            due = min(due, latest + window + 1)
        if kind != was:
            self._count(site, was, kind)
            b = b & ~_KIND | kind << _KIND_SHIFT
        # Its due time only grows, except when it turns a bot: its window may end before its
        # latest bot row leaves ``L`` (an entry too many is harmless: judged again, it goes).
        if not b & _WHEEL or (kind == BOT and was != BOT):
            self._schedule(key, due)
            b |= _WHEEL
        self._bots[key] = b

    def _recheck(self, key: Key) -> None:
        """A wheel entry of ``key`` came due: judge it again (it may be due later now)."""
        site = self._site_of(key)
        b = self._bots.get(key)
        if b is not None:
            self._judge_bot(key, site, b & ~_WHEEL)
            return
        value = self._visitors.get(key)
        if value is None or not value & _WHEEL:
            return  # forgotten, or an entry of before (another is in the wheel)
        self._judge_human(key, site, value & ~_WHEEL)

    def _drop_visitor(self, key: Key) -> None:
        """Forget a visitor: out of the tally too."""
        value = self._visitors.pop(key)
        if self._runs:
            self._runs.discard(key)
        kind = (value & _KIND) >> _KIND_SHIFT
        if kind or self._bots:
            site = self._site_of(key)
            if kind:
                self._count(site, kind, NONE)
            b = self._bots.get(key)
            if b is not None:
                self._judge_bot(key, site, b)

    # -- forgetting ----------------------------------------------------------------------------
    def _forget_visitors(self) -> None:
        # aliases pointing at a forgotten visitor are dropped lazily by expire()
        visitors = self._visitors
        excess = len(visitors) - self._max_visitors + self._max_visitors // 1000
        for key in list(islice(visitors, excess)):
            self._drop_visitor(key)

    def expire(self) -> None:
        """Forget what can no longer change a decision (relative to the partition's latest ts)
        nor who is online (relative to ``now``, or to that ts while no clock was given)."""
        now = self.high_ts
        before = min(now - self._timeout_ms, (self._now or now) - self._longest)
        doomed = []
        for key, value in self._visitors.items():
            if value >> _SHIFT >= before:
                break
            doomed.append(key)
        for key in doomed:
            self._drop_visitor(key)
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
    """Drop entries from the front while their ts (``value >> _SHIFT``) is before ``before``: the
    oldest entries are at the front, and the walk stops at the first one still current."""
    doomed = []
    for key, value in entries.items():
        if value >> _SHIFT >= before:
            break
        doomed.append(key)
    for key in doomed:
        del entries[key]
