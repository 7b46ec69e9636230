"""The stream fan-out: every subscriber of a site gets the one prepared snapshot, no change is
missed, changes within a subscriber's quiet second are coalesced to the latest, keep-alives
when nothing changes, and closing ends every subscription; the same for sinks (subscribers
written to directly, the fast lane's connections), paced by the fan-out itself."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from services.aggregate.counter import KEEPALIVE_CHUNK, Fanout, Prepared, prepare


def snapshot(total: int, **extra: Any) -> Prepared:
    return prepare({"site": "dongha", "online": {"total": total}, "as_of": "t", **extra})


async def test_every_subscriber_gets_the_same_prepared_object() -> None:
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(1))
    subs = [fanout.subscribe("dongha", min_interval=0) for _ in range(100)]
    firsts = [await anext(s) for s in subs]
    assert all(f is fanout.prepared["dongha"] for f in firsts)
    pending = [asyncio.ensure_future(anext(s)) for s in subs]
    await asyncio.sleep(0)
    fanout.publish("dongha", snapshot(2))
    seconds = await asyncio.gather(*pending)
    assert all(s is fanout.prepared["dongha"] for s in seconds)
    assert {s.payload["online"]["total"] for s in seconds} == {2}
    for s in subs:
        await s.aclose()


async def test_changes_within_the_quiet_interval_are_coalesced_to_the_latest() -> None:
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(1))
    sub = fanout.subscribe("dongha", min_interval=0.05)
    assert (await anext(sub)).payload["online"]["total"] == 1
    # published while the subscriber is in its quiet interval: it wakes to the latest only
    for n in (2, 3, 4):
        fanout.publish("dongha", snapshot(n))
    assert (await anext(sub)).payload["online"]["total"] == 4
    fanout.publish("dongha", snapshot(5))
    assert (await anext(sub)).payload["online"]["total"] == 5
    await sub.aclose()


async def test_same_numbers_with_a_newer_as_of_are_not_pushed() -> None:
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(1))
    sub = fanout.subscribe("dongha", min_interval=0, keepalive=0.05)
    await anext(sub)
    newer = prepare({"site": "dongha", "online": {"total": 1}, "as_of": "later"})
    assert newer.etag == fanout.prepared["dongha"].etag
    fanout.replace("dongha", newer)
    assert fanout.prepared["dongha"] is newer  # served to GETs ...
    assert await anext(sub) is None  # ... but the stream only gets a keep-alive
    await sub.aclose()


async def test_a_subscriber_sees_a_change_published_before_it_waits() -> None:
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(1))
    sub = fanout.subscribe("dongha", min_interval=0, keepalive=30)
    await anext(sub)
    fanout.publish("dongha", snapshot(2))  # before the subscriber came back for more
    got = await asyncio.wait_for(anext(sub), 30)
    assert got is not None
    assert got.payload["online"]["total"] == 2
    await sub.aclose()


async def test_stale_is_a_change() -> None:
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(1, stale=False))
    sub = fanout.subscribe("dongha", min_interval=0)
    await anext(sub)
    fanout.publish("dongha", snapshot(1, stale=True))
    got = await asyncio.wait_for(anext(sub), 30)
    assert got is not None
    assert got.payload["stale"] is True
    await sub.aclose()


async def test_closing_ends_every_subscription() -> None:
    fanout = Fanout(["dongha", "utc"])
    fanout.publish("dongha", snapshot(1))

    async def drain(site: str) -> int:
        n = 0
        async for _ in fanout.subscribe(site, min_interval=0, keepalive=30):
            n += 1
        return n

    tasks = [asyncio.ensure_future(drain("dongha")), asyncio.ensure_future(drain("utc"))]
    await asyncio.sleep(0.01)
    fanout.close()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 30) == [1, 0]


async def test_a_subscriber_waking_after_a_replace_gets_the_published_bytes() -> None:
    """Every subscriber of one change writes the very same bytes: one that was still pacing
    (``min_interval``) when the change came gets the change as published, not the copy with a
    newer ``as_of`` that requests get since."""
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(0))
    sub = fanout.subscribe("dongha", min_interval=0, keepalive=30)
    await anext(sub)
    change = prepare({"site": "dongha", "online": {"total": 1}, "as_of": "first"})
    fanout.publish("dongha", change)
    newer = prepare({"site": "dongha", "online": {"total": 1}, "as_of": "later"})
    fanout.replace("dongha", newer)
    assert fanout.prepared["dongha"] is newer
    assert await asyncio.wait_for(anext(sub), 30) is change
    await sub.aclose()


class FakeSink:
    """Records what the fan-out writes, with the loop's time; refuses once ``full``."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []
        self.full = False
        self.ended = False

    def send(self, chunk: bytes, limit: int) -> bool:
        if self.full:
            return False
        self.writes.append((asyncio.get_running_loop().time(), chunk))
        return True

    def end(self) -> None:
        self.ended = True

    def events(self) -> list[tuple[float, bytes]]:
        return [(t, c) for t, c in self.writes if c != KEEPALIVE_CHUNK]


async def test_sinks_get_every_change_paced_and_end_on_the_latest() -> None:
    fanout = Fanout(["dongha"], min_interval=0.2, keepalive=30)
    fanout.publish("dongha", snapshot(0))
    sinks = [FakeSink() for _ in range(50)]
    for sink in sinks:
        fanout.attach("dongha", sink)
    assert all(s.events() == [(s.writes[0][0], fanout.prepared["dongha"].chunk)] for s in sinks)
    for n in range(1, 25):  # a change every 0.05 s for 1.2 s
        await asyncio.sleep(0.05)
        fanout.publish("dongha", snapshot(n))
    await asyncio.sleep(0.3)
    latest = fanout.prepared["dongha"].chunk
    for sink in sinks:
        times = [t for t, _ in sink.events()]
        assert all(b - a >= 0.2 - 1e-6 for a, b in itertools.pairwise(times))
        assert len(times) >= 2  # the first at once, the latest after the quiet interval
        assert sink.events()[-1][1] is latest
    # every sink wrote the very same bytes objects, in one loop per push
    assert len({tuple(id(c) for _, c in s.events()) for s in sinks}) == 1


async def test_a_sink_that_joins_late_gets_the_current_numbers_then_is_paced() -> None:
    fanout = Fanout(["dongha"], min_interval=0.3, keepalive=30)
    fanout.publish("dongha", snapshot(1))
    sink = FakeSink()
    fanout.attach("dongha", sink)
    fanout.publish("dongha", snapshot(2))  # within its quiet interval: later, not now
    assert [c for _, c in sink.events()] == [snapshot(1).chunk]
    await asyncio.sleep(0.45)
    (t1, _first), (t2, second) = sink.events()
    assert second == fanout.prepared["dongha"].chunk and t2 - t1 >= 0.3 - 1e-6


async def test_a_sink_that_does_not_read_is_dropped() -> None:
    fanout = Fanout(["dongha"], min_interval=0, keepalive=30)
    fanout.publish("dongha", snapshot(1))
    slow, fine = FakeSink(), FakeSink()
    fanout.attach("dongha", slow)
    fanout.attach("dongha", fine)
    slow.full = True
    fanout.publish("dongha", snapshot(2))
    slow.full = False
    fanout.publish("dongha", snapshot(3))
    assert len(slow.events()) == 1  # dropped at its first refusal, never written again
    assert len(fine.events()) == 3


async def test_sinks_get_keepalives_and_not_replaced_numbers() -> None:
    fanout = Fanout(["dongha"], min_interval=0, keepalive=0.15)
    fanout.publish("dongha", snapshot(1))
    sink = FakeSink()
    fanout.attach("dongha", sink)
    fanout.replace("dongha", prepare({"site": "dongha", "online": {"total": 1}, "as_of": "x"}))
    await asyncio.sleep(0.4)
    assert len(sink.events()) == 1
    assert KEEPALIVE_CHUNK in [c for _, c in sink.writes]


async def test_closing_ends_every_sink_and_refuses_new_ones() -> None:
    fanout = Fanout(["dongha", "utc"], min_interval=0.5)
    fanout.publish("dongha", snapshot(1))
    sinks = [FakeSink(), FakeSink()]
    fanout.attach("dongha", sinks[0])
    fanout.attach("utc", sinks[1])
    fanout.publish("dongha", snapshot(2))  # a paced push pending
    fanout.close()
    late = FakeSink()
    fanout.attach("dongha", late)
    await asyncio.sleep(0.6)
    assert all(s.ended for s in (*sinks, late))
    assert len(sinks[0].events()) == 1 and late.writes == []


async def test_a_new_subscriber_gets_the_numbers_as_of_the_latest_refresh() -> None:
    """Unchanged numbers are pushed once, with the ``as_of`` of their change; a subscriber that
    comes later gets them first as of the latest refresh (an outside audit: a first event hours
    old on a counter unchanged since), the same ETag, so it is not sent them again."""
    fanout = Fanout(["dongha"], min_interval=0, keepalive=30)
    fanout.publish("dongha", snapshot(1))
    newer = prepare({"site": "dongha", "online": {"total": 1}, "as_of": "later"})
    fanout.replace("dongha", newer)
    sink = FakeSink()
    fanout.attach("dongha", sink)
    assert [c for _, c in sink.events()] == [newer.chunk]
    sub = fanout.subscribe("dongha", min_interval=0, keepalive=0.05)
    assert await anext(sub) is newer
    assert await anext(sub) is None  # a keep-alive: the same numbers are not sent again
    await sub.aclose()


async def test_a_subscriber_cancelled_as_a_change_comes_ends() -> None:
    """The server cancels a stream's handler when its client goes; a change arriving in the
    same turn must not swallow that cancel (Python 3.11's ``wait_for`` did: the stream outlived
    its client until a keep-alive's write failed, an outside audit)."""
    fanout = Fanout(["dongha"])
    fanout.publish("dongha", snapshot(1))
    sub = fanout.subscribe("dongha", min_interval=0, keepalive=30)
    await anext(sub)
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0.01)  # it waits for the next change
    fanout.publish("dongha", snapshot(2))
    waiting.cancel()  # the client went away, in the same turn
    with pytest.raises(asyncio.CancelledError):
        await waiting
