"""The stream fan-out: every subscriber of a site gets the one prepared snapshot, no change is
missed, changes within a subscriber's quiet second are coalesced to the latest, keep-alives
when nothing changes, and closing ends every subscription."""

from __future__ import annotations

import asyncio
from typing import Any

from services.aggregate.counter import Fanout, Prepared, prepare


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
