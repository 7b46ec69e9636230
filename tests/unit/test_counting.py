"""PartitionState alone: the decisions, with no I/O and no clock but the events' own."""

from __future__ import annotations

import re
import uuid
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from services.aggregate.counting import PartitionState, local_day
from services.aggregate.store import periods
from services.record import Event

UTC = ZoneInfo("UTC")
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
MIN = 60_000


def ev(visitor: str, ts: int, kind: str = "pageview", eid: str = "", **kw: object) -> Event:
    return Event(
        eid or f"{visitor}-{ts}.{kw.get('micros', 0)}-{kind}",
        kw.get("site", "s"), kind, ts, visitor,  # type: ignore[arg-type]
        kw.get("prev"), False, bool(kw.get("bot", False)), "", "", "",  # type: ignore[arg-type]
        kw.get("micros", 0),  # type: ignore[arg-type]
    )  # fmt: skip


def test_first_pageview_starts_a_visit_and_the_timeout_starts_another() -> None:
    s = PartitionState(0)
    r1 = s.apply(ev("a", 0), UTC, 0, 0)
    r2 = s.apply(ev("a", 30 * MIN - 1), UTC, 0, 1)
    r3 = s.apply(ev("a", 60 * MIN - 1), UTC, 0, 2)
    assert r1 and r2 and r3
    assert [r1.starts_visit, r2.starts_visit, r3.starts_visit] == [True, False, True]
    assert all(r.pageview for r in (r1, r2, r3))


def test_heartbeats_never_start_a_visit_and_a_runs_first_page_view_does() -> None:
    s = PartitionState(0)
    hb = s.apply(ev("a", 0, "heartbeat"), UTC, 0, 0)
    assert hb and not hb.starts_visit and not hb.pageview and not hb.in_visit
    pv = s.apply(ev("a", 1 * MIN), UTC, 0, 1)
    assert pv and pv.starts_visit and pv.in_visit  # the run had no visit: this begins it
    leave = s.apply(ev("a", 20 * MIN, "leave"), UTC, 0, 2)
    assert leave and not leave.starts_visit and leave.in_visit
    again = s.apply(ev("a", 45 * MIN), UTC, 0, 3)
    assert again and not again.starts_visit  # 25 minutes after the leave: the same visit
    # back at a tab hidden for 45 minutes: the heartbeat begins a run but no visit, the first
    # page view of that run begins one, the next ones do not
    assert visits(s, [ev("a", k * MIN, t) for k, t in ((90, "heartbeat"), (91, "pageview"))]) == [
        False,
        True,
    ]
    assert visits(s, [ev("a", 95 * MIN, "heartbeat"), ev("a", 99 * MIN)], 6) == [False, False]


def test_duplicates_are_dropped_and_bots_never_count() -> None:
    s = PartitionState(0)
    assert s.apply(ev("a", 0, eid="e1"), UTC, 0, 0) is not None
    assert s.apply(ev("a", 5, eid="e1"), UTC, 0, 1) is None
    bot = s.apply(ev("b", 0, bot=True), UTC, 0, 2)
    assert bot and not bot.starts_visit and not bot.pageview
    assert len(s) == 1  # the bot keeps no visitor state


def test_expire_forgets_idle_visitors_and_old_event_ids() -> None:
    s = PartitionState(0, visit_timeout_s=1800, dedup_horizon_s=600)
    s.apply(ev("a", 0, eid="old"), UTC, 0, 0)
    s.apply(ev("b", 40 * MIN, eid="new"), UTC, 0, 1)
    s.expire()
    assert len(s) == 1
    # "old" is past the dedup horizon: a replay of it now would count (documented horizon)
    assert s.apply(ev("a", 41 * MIN, eid="old"), UTC, 0, 2) is not None
    assert s.apply(ev("b", 41 * MIN, eid="new"), UTC, 0, 3) is None


def test_the_visitor_cap_forgets_the_longest_idle_first() -> None:
    s = PartitionState(0, max_visitors=2)
    for i, v in enumerate("abc"):
        s.apply(ev(v, i * MIN), UTC, 0, i)
    assert len(s) == 2
    again = s.apply(ev("a", 4 * MIN), UTC, 0, 3)  # "a" was forgotten: a new visit
    assert again and again.starts_visit
    c = s.apply(ev("c", 5 * MIN), UTC, 0, 4)
    assert c and not c.starts_visit


def test_rotation_links_the_new_key_to_the_old_one() -> None:
    s = PartitionState(0)
    s.apply(ev("k1", 0), UTC, 0, 0)
    row = s.apply(ev("k2", MIN, prev="k1"), UTC, 0, 1)
    assert row and row.visitor == "k1" and not row.starts_visit
    later = s.apply(ev("k2", 2 * MIN), UTC, 0, 2)  # without prev: the alias is remembered
    assert later and later.visitor == "k1"


def test_replay_reproduces_the_decisions() -> None:
    live = PartitionState(0)
    rows = [live.apply(ev("a", 0, eid="x"), UTC, 0, 0), live.apply(ev("k2", MIN), UTC, 0, 1)]
    rebuilt = PartitionState(0)
    for r in rows:
        assert r is not None
        rebuilt.replay(r.event, r.visitor)
    assert rebuilt.apply(ev("a", 2 * MIN, eid="x"), UTC, 0, 2) is None
    nxt = rebuilt.apply(ev("a", 3 * MIN), UTC, 0, 3)
    assert nxt and not nxt.starts_visit


def test_local_day_and_periods() -> None:
    # 2026-03-01 17:30 UTC is 00:30 on 2 March in Ho Chi Minh City
    ts = 1772386200000
    assert local_day(ts, UTC) == date(2026, 3, 1)
    assert local_day(ts, HCM) == date(2026, 3, 2)
    p = periods(date(2026, 3, 2))  # a Monday
    assert p["this_week"] == (date(2026, 3, 2), date(2026, 3, 2))
    assert p["yesterday"] == (date(2026, 3, 1), date(2026, 3, 1))
    assert p["this_month"] == (date(2026, 3, 1), date(2026, 3, 2))
    assert periods(date(2026, 3, 8))["this_week"] == (date(2026, 3, 2), date(2026, 3, 8))


def test_the_event_id_memory_is_bounded_by_count_too() -> None:
    s = PartitionState(0, max_visitors=3)
    for i in range(5):
        s.apply(ev(f"v{i}", i, eid=f"e{i}"), UTC, 0, i)
    s.expire()
    assert s.apply(ev("v4", 10, eid="e4"), UTC, 0, 5) is None  # recent ids still known
    assert s.apply(ev("v0", 11, eid="e0"), UTC, 0, 6) is not None  # the oldest was forgotten


_HEX32_RE = re.compile(r"[0-9a-f]{32}").fullmatch
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch
_KEYISH = st.text(alphabet="0123456789abcdefABx-_ +\n", min_size=30, max_size=38)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_KEYISH, st.uuids().map(str), st.uuids().map(lambda u: u.hex)))
def test_keys_are_ints_exactly_for_canonical_hex_and_uuids(text: str) -> None:
    bits = 1 << 128
    visitor = PartitionState._visitor_key(bits, "s", text)
    event = PartitionState._event_key(bits, "s", text)
    assert isinstance(visitor, int) == bool(_HEX32_RE(text))
    assert isinstance(event, int) == bool(_UUID_RE(text))
    if isinstance(visitor, int):
        assert visitor == bits | int(text, 16)
    else:
        assert visitor == "s:" + text
    if isinstance(event, int):
        assert event == bits | uuid.UUID(text).int
    else:
        assert event == "s:" + text


def test_apply_keys_events_as_replay_does() -> None:
    """``apply`` inlines the key functions: a replayed row is then a duplicate of itself."""
    events = [
        ev("a" * 32, 1, eid=str(uuid.UUID(int=5))),
        ev("visitor-b", 2, eid="not-a-uuid"),
        ev("C" * 32, 3, eid=str(uuid.UUID(int=6)).upper()),
    ]
    s = PartitionState(0)
    rows = [s.apply(e, UTC, 0, i) for i, e in enumerate(events)]
    replayed = PartitionState(0)
    for r in rows:
        assert r is not None
        replayed.replay(r.event, r.visitor)
    assert [replayed.apply(e, UTC, 0, i) for i, e in enumerate(events)] == [None] * 3
    assert len(replayed) == len(s) == 3


def visits(state: PartitionState, events: list[Event], first_offset: int = 0) -> list[bool]:
    rows = [state.apply(e, UTC, 0, first_offset + i) for i, e in enumerate(events)]
    return [r is not None and r.starts_visit for r in rows]


def test_a_page_view_that_arrives_late_still_begins_its_visit() -> None:
    """Two ingest processes, or a spool drained after an outage: the reader's first page view
    reaches the partition after their heartbeat."""
    s = PartitionState(0)
    assert visits(s, [ev("a", 10_000, "heartbeat"), ev("a", 5_000), ev("a", 3_000)]) == [
        False,
        True,  # earlier than every event of the run: the visit begins here
        False,  # the run has its visit
    ]


def test_a_late_page_view_of_a_run_without_a_visit_begins_it() -> None:
    s = PartitionState(0)
    # by time: heartbeat at 0, page view at 5 s, heartbeat at 10 s
    assert visits(s, [ev("a", 0, "heartbeat"), ev("a", 10_000, "heartbeat"), ev("a", 5_000)]) == [
        False,
        False,
        True,
    ]
    t = PartitionState(0)
    late_heartbeat = [ev("b", 10_000, "heartbeat"), ev("b", 2_000, "heartbeat"), ev("b", 5_000)]
    assert visits(t, late_heartbeat) == [False, False, True]


def rebuilt_from_the_last(rows: list[Any], horizon_ms: int) -> PartitionState:
    """A new owner's state, from the stored rows within ``horizon_ms`` of the latest (as
    ``Aggregator.rebuild`` reads them)."""
    latest = max(r.event.ts for r in rows)
    state = PartitionState(0)
    for r in rows:
        if r.event.ts >= latest - horizon_ms:
            state.replay(r.event, r.visitor, r.starts_visit, r.in_visit)
    return state


def test_a_rebuild_knows_whether_a_run_begun_before_its_rows_has_its_visit() -> None:
    """Runs of heartbeats longer than the rows a rebuild reads (an hour): one that began with
    a page view has its visit, one that began with a heartbeat has none until a page view."""
    live = PartitionState(0)
    rows = [live.apply(ev("a", 0), UTC, 0, 0), live.apply(ev("b", 0, "heartbeat"), UTC, 0, 1)]
    for k in range(1, 19):  # a heartbeat of each every 10 minutes, for three hours
        rows += [live.apply(ev(v, k * 10 * MIN, "heartbeat"), UTC, 0, len(rows)) for v in "ab"]
    rebuilt = rebuilt_from_the_last(rows, 60 * MIN)
    after = [ev("a", 181 * MIN), ev("b", 181 * MIN), ev("b", 182 * MIN)]
    assert (
        visits(rebuilt, after, len(rows))
        == visits(live, after, len(rows))
        == [
            False,  # a's visit began three hours ago, with its page view
            True,  # b's run began with a heartbeat: its first page view begins the visit
            False,
        ]
    )


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["pageview", "heartbeat", "leave"]), min_size=1, max_size=6),
    order=st.randoms(use_true_random=False),
    cut=st.integers(min_value=0, max_value=7),
    one_ms=st.booleans(),
)
def test_a_run_with_a_page_view_is_one_visit_in_any_arrival_order(
    kinds: list[str], order: Any, cut: int, one_ms: bool
) -> None:
    """Events of one visitor within the visit timeout (minutes apart, or all in one millisecond
    and ordered by their microseconds) arrive in any order; the partition changes owner after
    ``cut`` of them (the new owner rebuilds from the rows): exactly one visit when any of them
    is a page view, none otherwise."""
    events = [
        ev("a", 0, k, micros=i + 1) if one_ms else ev("a", (i + 1) * MIN, k)
        for i, k in enumerate(kinds)
    ]
    order.shuffle(events)
    live = PartitionState(0)
    rows = [live.apply(e, UTC, 0, i) for i, e in enumerate(events[:cut])]
    rebuilt = PartitionState(0)
    for r in rows:
        assert r is not None
        rebuilt.replay(r.event, r.visitor, r.starts_visit, r.in_visit)
    later = [rebuilt.apply(e, UTC, 0, cut + i) for i, e in enumerate(events[cut:])]
    assert sum(r is not None and r.starts_visit for r in rows + later) == ("pageview" in kinds)
