"""Who is online, kept up to date from the stored rows at the cost of what changed since the
last tick, not of the whole window.

The answer is the one of the query it replaces (``ONLINE_BY_QUERY``, kept for the tests and the
bench): over the rows of the last ``L`` seconds (``L`` = the longest window of all sites),
per (site, visitor), the latest row by ``(ts, kafka_offset)``; online when that row is within
the site's window and not a ``leave``; a bot when any of those rows is a bot, else a member when
the latest row says so, else a guest.

Per visitor that is a function of a state that only ever grows by ``max`` — the latest
``(ts, kafka_offset)`` with its ``leave`` and ``member``, and the time of the latest bot row —
judged against ``now`` (online: ``last >= now - window`` and not ``leave``; a bot:
``bot_ts >= now - L``). A visitor online now has ``last >= now - L``, so rows older than ``L``
never change the answer: folding in any superset of the window's rows, in any order, any
number of times, gives the same numbers. That is what makes it incremental:

* the window is cut into ``BUCKET_MS`` buckets of ``ts``; every tick one cheap query counts the
  rows per bucket (from a projection that keeps these counts in every part; the table only ever
  grows, so a bucket whose count is unchanged holds the very rows already folded in), and one
  query reads, grouped per visitor, only the buckets whose count changed (new rows, late rows
  of an older bucket alike);
* as ``now`` moves on, a heap brings each visitor back at the moment its answer may change (its
  window ends, its bot row leaves the window, or it is older than ``L`` and is forgotten).

Every aggregate process computes this from the same ClickHouse rows, so all serve the same
numbers. A step back of the clock, or a change of the windows, starts afresh from the rows.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

BUCKET_MS = 250
NONE, GUEST, MEMBER, BOT = 0, 1, 2, 3
NEVER = -(2**62)  # the bot_ts of a visitor without a bot row

# The rows per bucket of ``ts`` from bucket ``first`` on. Answered from the ``buckets``
# projection (migration 0003: a few rows per part, not a row per event), whose expression this
# must repeat exactly, the width included.
COUNTS_QUERY = f"""
SELECT intDiv(toUnixTimestamp64Milli(ts), {BUCKET_MS}) AS b, count()
FROM events
WHERE b >= {{first:Int64}} AND site IN {{sites:Array(String)}}
GROUP BY b
"""

# Per (site, visitor), the state of the rows in the buckets given (between ``lo`` and ``hi``).
STATES_QUERY = """
SELECT site, visitor,
       max(toUnixTimestamp64Milli(ts)) AS last,
       argMax(tuple(kafka_offset, type = 'leave', member), (ts, kafka_offset)) AS latest,
       if(max(bot) = 1, maxIf(toUnixTimestamp64Milli(ts), bot = 1), {never:Int64}) AS bot_ts
FROM events
WHERE ts >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')
  AND ts < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')
  AND site IN {sites:Array(String)}
  AND intDiv(toUnixTimestamp64Milli(ts), {bucket:Int64}) IN {buckets:Array(Int64)}
GROUP BY site, visitor
"""

# The same numbers in one query over the whole window (what the counter ran before).
ONLINE_BY_QUERY = """
SELECT site,
       countIf(NOT bot AND latest != 'leave' AND NOT member),
       countIf(NOT bot AND latest != 'leave' AND member),
       countIf(bot AND latest != 'leave')
FROM (
    SELECT site, visitor,
           argMax(type, (ts, kafka_offset)) AS latest,
           argMax(member, (ts, kafka_offset)) AS member,
           max(bot) AS bot,
           max(ts) AS last_ts
    FROM events
    WHERE ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
      AND site IN {sites:Array(String)}
    GROUP BY site, visitor
)
WHERE toUnixTimestamp64Milli(last_ts)
      >= {now:Int64} - transform(site, {sites:Array(String)}, {windows:Array(Int64)}, toInt64(0))
GROUP BY site
"""


# Per visitor: (last, offset, leave, member, bot_ts, kind, due) — ``last`` the ms of the latest
# row, ``offset`` its kafka_offset (ties of ``last``), ``bot_ts`` the ms of the latest bot row
# (or NEVER), ``kind`` what it counts for now (NONE, GUEST, MEMBER or BOT), ``due`` when its heap
# entry comes due (ms; 0: none). A plain tuple of numbers and booleans: the cyclic garbage
# collector stops tracking it after one pass, so a full collection does not walk every visitor
# online (a slotted object per visitor made them 100-160 ms each, every two seconds, at 300,000
# online).
_State = tuple[int, int, bool, bool, int, int, int]


class OnlineTracker:
    """Not thread-safe: one caller at a time (the store's reading thread)."""

    def __init__(self) -> None:
        self._windows: dict[str, int] = {}
        self._longest = 0
        self.reset()

    def reset(self) -> None:
        self._counts: dict[int, int] = {}  # bucket -> rows folded in
        self._visitors: dict[tuple[str, str], _State] = {}
        self._heap: list[tuple[int, str, str]] = []
        self._tally: dict[str, list[int]] = {}  # site -> [_, guests, members, bots]
        self._now = NEVER

    def __len__(self) -> int:
        return len(self._visitors)

    # -- one tick: plan (which buckets to read), then apply --------------------------------------
    def first_bucket(self, windows_ms: dict[str, int], now_ms: int) -> int:
        """The first bucket of the window; starts afresh if the windows changed or the clock
        went back."""
        if windows_ms != self._windows or now_ms < self._now:
            self._windows = dict(windows_ms)
            self._longest = max(windows_ms.values(), default=0)
            self.reset()
        return (now_ms - self._longest) // BUCKET_MS

    def changed(self, counts: Iterable[tuple[int, int]]) -> dict[int, int]:
        """Of the buckets' counts now, those that differ from the rows folded in."""
        return {b: n for b, n in counts if self._counts.get(b) != n}

    def apply(
        self,
        now_ms: int,
        first: int,
        read: dict[int, int],
        states: Sequence[tuple[str, str, int, tuple[int, int, int], int]],
    ) -> dict[str, tuple[int, int, int]]:
        """Fold in the states read from the buckets ``read`` (bucket -> its count before the
        read), move the clock to ``now_ms``; the tally per site: (guests, members, bots)."""
        self._now = now_ms
        longest = self._longest
        for site, visitor, last, (offset, leave, member), bot_ts in states:
            self._fold(site, visitor, int(last), int(offset), bool(leave), bool(member), bot_ts)
        self._counts.update(read)
        for b in [b for b in self._counts if b < first]:
            del self._counts[b]
        heap = self._heap
        visitors = self._visitors
        while heap and heap[0][0] < now_ms:
            due, site, visitor = heapq.heappop(heap)
            v = visitors.get((site, visitor))
            if v is None or v[6] != due:
                continue  # superseded by an earlier entry
            if v[0] < now_ms - longest:
                self._count(site, v[5], -1)
                del visitors[(site, visitor)]
                continue
            self._judge(site, visitor, (*v[:6], 0))
        return {site: (t[GUEST], t[MEMBER], t[BOT]) for site, t in self._tally.items()}

    # -- per visitor -------------------------------------------------------------------------------
    def _fold(
        self, site: str, visitor: str, last: int, offset: int, leave: bool, member: bool, bot: int
    ) -> None:
        v = self._visitors.get((site, visitor))
        if v is None:
            v = (last, offset, leave, member, bot, NONE, 0)
        else:
            v_last, v_offset, v_leave, v_member, v_bot, kind, due = v
            if (last, offset) > (v_last, v_offset):
                v_last, v_offset, v_leave, v_member = last, offset, leave, member
            v = (v_last, v_offset, v_leave, v_member, max(v_bot, bot), kind, due)
        self._judge(site, visitor, v)

    def _judge(self, site: str, visitor: str, v: _State) -> None:
        """Count visitor ``v`` for what it is at ``now``, store it, and make sure the heap brings
        it back by the time that may change."""
        last, offset, leave, member, bot_ts, was, due = v
        now = self._now
        window = self._windows.get(site, 0)
        longest = self._longest
        if leave or last < now - window:
            kind = NONE
        elif bot_ts >= now - longest:
            kind = BOT
        else:
            kind = MEMBER if member else GUEST
        if kind != was:
            self._count(site, was, -1)
            self._count(site, kind, 1)
        wanted = last + longest  # forgotten after that
        if kind != NONE:
            wanted = min(wanted, last + window)  # leaves the window
        if kind == BOT:
            wanted = min(wanted, bot_ts + longest)  # no longer a bot
        # An entry already due earlier brings it back in time (and is renewed then).
        if due == 0 or wanted < due:
            due = wanted
            heapq.heappush(self._heap, (due, site, visitor))
        self._visitors[(site, visitor)] = (last, offset, leave, member, bot_ts, kind, due)

    def _count(self, site: str, kind: int, n: int) -> None:
        if kind != NONE:
            self._tally.setdefault(site, [0, 0, 0, 0])[kind] += n
