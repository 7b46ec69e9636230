"""Who is online, per partition (``PartitionState``): the tallies are, at every ``now``, those of
the rules over the rows the state decided (the rules as ``ONLINE_BY_QUERY`` computes them, here
in Python), on random streams: late rows, rows older than the window, future rows, equal-ms rows
(ordered by their microseconds, or equal to the microsecond), leaves, members, bots (also under
a human's key), two sites with different windows, salt-rotation aliases, expiry and replay into
another state."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from services.aggregate.counting import PartitionState, Row
from services.record import Event

UTC = ZoneInfo("UTC")
WINDOWS = {"a": 60, "b": 300}
T0 = 1_780_000_000_000
KEYS = [f"{i:032x}" for i in range(1, 6)] + ["plain-1", "plain-2"]


def oracle(rows: list[Row], now: int, windows: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """``ONLINE_BY_QUERY`` in Python: per (site, stored visitor), over the rows of the last L."""
    longest = max(windows.values()) * 1000
    groups: dict[tuple[str, str], tuple[tuple[int, int, int], Row, bool]] = {}
    for r in rows:
        e = r.event
        if e.ts < now - longest or e.site not in windows:
            continue
        g = groups.get((e.site, r.visitor))
        order = (e.ts, e.micros, r.offset)
        if g is None:
            groups[(e.site, r.visitor)] = (order, r, e.bot)
        else:
            latest = (order, r) if order > g[0] else (g[0], g[1])
            groups[(e.site, r.visitor)] = (*latest, g[2] or e.bot)
    out = {s: [0, 0, 0] for s in windows}
    for (site, _), ((ts, _, _), r, bot) in groups.items():
        if r.event.type == "leave" or ts < now - windows[site] * 1000:
            continue
        out[site][2 if bot else 1 if r.event.member else 0] += 1
    return {s: (g, m, b) for s, (g, m, b) in out.items()}


@dataclass
class Step:
    kind: int  # 0..9: the shape of the row's ts
    dt: int
    micros: int
    key: int
    prev: int
    site: int
    type: int
    member: bool
    bot: bool
    advance: int
    dup: bool


steps = st.builds(
    Step,
    kind=st.integers(0, 9),
    dt=st.integers(0, 400_000),
    micros=st.sampled_from([0, 0, 1, 500, 999]),
    key=st.integers(0, len(KEYS) - 1),
    prev=st.integers(-3, len(KEYS) - 1),
    site=st.integers(0, 1),
    type=st.integers(0, 2),
    member=st.booleans(),
    bot=st.integers(0, 9).map(lambda n: n == 0),
    advance=st.sampled_from([0, 0, 1, 999, 1000, 1001, 5_000, 59_999, 60_000, 60_001, 300_001]),
    dup=st.integers(0, 19).map(lambda n: n == 0),
)


def run(steps: list[Step], expire_every: int) -> None:
    state = PartitionState(0, windows=WINDOWS)
    now = T0
    state.advance(now)
    rows: list[Row] = []
    stamps: list[int] = []
    ids: list[str] = []
    for i, s in enumerate(steps):
        if s.kind < 5:
            ts = now - s.dt % 2_000
        elif s.kind < 7:
            ts = now - s.dt  # late, maybe beyond every window
        elif s.kind < 8:
            ts = now + s.dt % 5_000  # a clock ahead of ours
        else:
            ts = stamps[s.dt % len(stamps)] if stamps else now  # the same ms as another row
        stamps.append(ts)
        site = "ab"[s.site]
        event_id = ids[s.dt % len(ids)] if s.dup and ids else str(uuid.UUID(int=i + 1))
        ids.append(event_id)
        event = Event(
            event_id, site, ("pageview", "heartbeat", "leave")[s.type], ts, KEYS[s.key],
            KEYS[s.prev] if s.prev >= 0 else None, s.member, s.bot, "", "", "", s.micros,
        )  # fmt: skip
        row = state.apply(event, UTC, 0, i)
        if row is not None:
            rows.append(row)
        now += s.advance
        state.advance(now)
        if expire_every and i % expire_every == 0:
            state.expire()
        assert state.tallies() == oracle(rows, now, WINDOWS), (i, now - T0)
    # a process rebuilding the partition from its rows serves the same numbers
    rebuilt = PartitionState(0, windows=WINDOWS)
    rebuilt.advance(now)
    for r in rows:
        rebuilt.replay(r.event, r.visitor, r.starts_visit, r.in_visit)
    assert rebuilt.tallies() == oracle(rows, now, WINDOWS)
    for later in (1, 60_001, 300_001, 10**7):
        state.advance(now + later)
        rebuilt.advance(now + later)
        want = oracle(rows, now + later, WINDOWS)
        assert state.tallies() == want == rebuilt.tallies(), later


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=60), st.sampled_from([0, 1, 7]))
def test_the_tallies_are_the_rules_over_the_rows(steps: list[Step], expire_every: int) -> None:
    run(steps, expire_every)


def ev(key: str, ts: int, kind: str = "pageview", **kw: object) -> Event:
    return Event(
        str(uuid.uuid4()), str(kw.get("site", "b")), kind, ts, key, None,
        bool(kw.get("member", False)), bool(kw.get("bot", False)), "", "", "",
        int(kw.get("micros", 0)),  # type: ignore[call-overload]
    )  # fmt: skip


def test_the_window_ends_to_the_millisecond() -> None:
    s = PartitionState(0, windows=WINDOWS)
    s.advance(T0)
    s.apply(ev(KEYS[0], T0, site="a"), UTC, 0, 0)
    s.apply(ev(KEYS[1], T0, member=True), UTC, 0, 1)
    assert s.tallies() == {"a": (1, 0, 0), "b": (0, 1, 0)}
    s.advance(T0 + 60_000)
    assert s.tallies() == {"a": (1, 0, 0), "b": (0, 1, 0)}
    s.advance(T0 + 60_001)
    assert s.tallies() == {"a": (0, 0, 0), "b": (0, 1, 0)}
    s.advance(T0 + 300_000)
    assert s.tallies()["b"] == (0, 1, 0)
    s.advance(T0 + 300_001)
    assert s.tallies()["b"] == (0, 0, 0)


def test_a_bot_row_makes_the_visitor_a_bot_for_the_longest_window() -> None:
    s = PartitionState(0, windows=WINDOWS)
    s.advance(T0)
    s.apply(ev(KEYS[0], T0, site="a", bot=True), UTC, 0, 0)
    s.apply(ev(KEYS[0], T0 + 100_000, site="a"), UTC, 0, 1)
    s.advance(T0 + 100_000)
    assert s.tallies()["a"] == (0, 0, 1)
    s.advance(T0 + 160_000)
    assert s.tallies()["a"] == (0, 0, 1)
    s.advance(T0 + 160_001)
    assert s.tallies()["a"] == (0, 0, 0)  # the window of "a" ended
    s.apply(ev(KEYS[0], T0 + 290_000, site="a"), UTC, 0, 2)
    assert s.tallies()["a"] == (0, 0, 1)
    s.advance(T0 + 300_001)  # the bot row left the longest window: a guest now
    assert s.tallies()["a"] == (1, 0, 0)


def test_the_visitor_cap_and_expiry_take_visitors_out_of_the_tally() -> None:
    s = PartitionState(0, max_visitors=1000, windows={"b": 3600})
    s.advance(T0)
    for i in range(1001):
        s.apply(ev(f"{i:032x}", T0 + i), UTC, 0, i)
    assert s.tallies()["b"] == (len(s), 0, 0) and len(s) < 1000
    s.advance(T0 + 4_000_000)
    s.apply(ev(KEYS[0], T0 + 4_000_000), UTC, 0, 2000)
    s.expire()
    assert len(s) == 1 and s.tallies()["b"] == (1, 0, 0)


def test_the_value_is_shared_with_the_event_id() -> None:
    """One int per visitor: the latest event id maps to the very object (the memory bound),
    whether decided, replayed, or of a visitor a bot row also holds; compiled too (mypyc holds
    an int unboxed and boxes it at each store unless it is handed on as an object)."""
    s = PartitionState(0, windows=WINDOWS)
    s.advance(T0)
    first, later = ev(KEYS[0], T0), ev(KEYS[0], T0 + 5)
    s.apply(first, UTC, 0, 0)
    assert (
        s._visitors[int(KEYS[0], 16) | 1 << 128]
        is s._seen[int(first.event_id.replace("-", ""), 16) | 1 << 128]
    )
    s.apply(ev(KEYS[1], T0, bot=True), UTC, 0, 1)
    s.apply(ev(KEYS[1], T0 + 1), UTC, 0, 2)  # a human row of a key a bot row holds
    replayed = PartitionState(0, windows=WINDOWS)
    replayed.advance(T0)
    replayed.replay(later, KEYS[0])
    for state, keys, event_ids in ((s, KEYS[:2], 3), (replayed, KEYS[:1], 1)):
        values = {key: state._visitors[int(key, 16) | 1 << 128] for key in keys}
        seen = list(state._seen.values())
        assert len(seen) == event_ids
        for value in values.values():
            assert any(value is v for v in seen)
    assert values[KEYS[0]] >> 15 == T0 + 5


def test_equal_ms_rows_of_a_bot_and_a_human_key_go_by_log_order() -> None:
    """Of a bot row and a human row of one key with the same ts, the later in the log is the
    latest row (``(ts, offset)``)."""
    s = PartitionState(0, windows=WINDOWS)
    s.advance(T0)
    s.apply(ev(KEYS[0], T0, bot=True), UTC, 0, 0)
    assert s.tallies()["b"] == (0, 0, 1)
    s.apply(ev(KEYS[0], T0, "leave"), UTC, 0, 1)
    assert s.tallies()["b"] == (0, 0, 0)  # the leave came after the bot's page view
    s.apply(ev(KEYS[0], T0, bot=True), UTC, 0, 2)
    assert s.tallies()["b"] == (0, 0, 1)  # and another bot row after the leave
    s.apply(ev(KEYS[1], T0, "leave"), UTC, 0, 3)
    s.apply(ev(KEYS[1], T0, bot=True), UTC, 0, 4)
    assert s.tallies()["b"] == (0, 0, 2)
    rows = [(KEYS[0], False, "pageview"), (KEYS[0], True, "leave")]
    r = PartitionState(0, windows=WINDOWS)
    r.advance(T0)
    for i, (key, bot, kind) in enumerate(rows):
        r.apply(ev(key, T0, kind, bot=bot), UTC, 0, i)
    assert r.tallies()["b"] == (0, 0, 0)  # a bot row that is a leave: gone, bot or not


def test_rows_of_one_millisecond_go_by_their_microseconds_not_the_log() -> None:
    """Two ingest processes may put a reader's two beacons of one millisecond in the log out of
    order: the later in time is the latest row, wherever it is in the log, in ``apply`` and in
    ``replay``."""
    for bot in (False, True):
        s = PartitionState(0, windows=WINDOWS)
        s.advance(T0)
        rows = [
            s.apply(ev(KEYS[0], T0, "leave", micros=900, bot=bot), UTC, 0, 0),
            s.apply(ev(KEYS[0], T0, "heartbeat", micros=100, bot=bot), UTC, 0, 1),
            s.apply(ev(KEYS[1], T0, "heartbeat", micros=900, bot=bot), UTC, 0, 2),
            s.apply(ev(KEYS[1], T0, "leave", micros=100, bot=bot), UTC, 0, 3),
        ]
        want = (0, 0, 1) if bot else (1, 0, 0)  # KEYS[0] left; KEYS[1] is online
        assert s.tallies()["b"] == want
        rebuilt = PartitionState(0, windows=WINDOWS)
        rebuilt.advance(T0)
        for r in rows:
            assert r is not None
            rebuilt.replay(r.event, r.visitor, r.starts_visit, r.in_visit)
        assert rebuilt.tallies()["b"] == want
        assert oracle([r for r in rows if r is not None], T0, WINDOWS)["b"] == want
