"""Python's cyclic garbage collector on timers instead of on allocation counts.

Counting a batch makes three objects per record that live until the batch is written (the
fetched record, its event, its row) and frees the rest by reference counting; none of it forms
a cycle. With the collector on, every 700 of those allocations trigger a young collection, and
the survivors soon make it walk the whole heap again and again: measured, that cost more than
decoding and counting themselves (``bench/inproc.py aggregate``, main-thread CPU per event).
So while a consumer runs there is no automatic collection at all: the young generations are
collected once a second (``young_collections_every``), when most of the batches' objects have
died by reference counting and are never walked, and full collections, which walk the whole
heap, once a minute (``full_collections_every``). (Until the eighth session the collector was
paused over each batch's counting instead; that only moved the walks to just after it.)

Every server process does the same for full collections from its start
(``services.http.serve``): under load, the ingest's caches (visitor keys, addresses, memos)
reach the oldest generation and full collections walked them every few seconds, 5-20 ms each,
with nothing to collect.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

FULL_COLLECTION_SECONDS = 60.0
_NEVER = 1 << 30  # young collections before an automatic full one: never in practice


_users: list[Callable[[], None]] = []  # the timers' cancels: one per server process, per consumer
_saved: list[int] = []  # the threshold of full collections before the first user


def full_collections_every(seconds: float = FULL_COLLECTION_SECONDS) -> Callable[[], None]:
    """Automatic full collections off, one every ``seconds`` instead (from the running loop);
    young collections go on as usual. Returns the function that undoes it (the automatic
    ones come back once every user has undone it).

    A batch's rows live until it is written, so they reach the oldest generation, and the
    collector then runs a full collection every few batches: each walks the whole heap (the
    counting state of every visitor included), ~100 ms at 1,000,000 online, and together they
    cost ~15 % of the consumer's time (``bench/inproc.py aggregate``, with ``gc.callbacks``).
    Cyclic garbage waits at most ``seconds`` for its collection."""

    def first() -> None:
        young, middle, old = gc.get_threshold()
        _saved[:] = [old]
        gc.set_threshold(young, middle, _NEVER)

    def last() -> None:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _saved[0])

    return _on_a_timer(seconds, 2, _users, first, last)


YOUNG_COLLECTION_SECONDS = 1.0
_young_users: list[Callable[[], None]] = []  # the young timers' cancels
_was_enabled: list[bool] = []  # whether automatic collection was on before the first user


def young_collections_every(seconds: float = YOUNG_COLLECTION_SECONDS) -> Callable[[], None]:
    """Automatic collection off altogether, the two young generations collected every
    ``seconds`` instead (from the running loop); what survives moves to the oldest generation,
    left to ``full_collections_every``. Returns the function that undoes it (automatic
    collection comes back, if it was on, once every user has undone it).

    For the consumer: counting a batch makes three tracked objects per record (the fetched
    record, its event and its row) that live until the batch is written, a few tenths of a
    second. The automatic collector walks each of them in young collections every 700
    allocations, and again in the middle generation's: 0.56-0.64 s of a 4.5 s run of
    ``python -m bench.inproc aggregate`` (timed with ``gc.callbacks``). On a one-second timer,
    the batches written meanwhile have died before it runs: 0.20-0.23 s, three collections of
    what is alive at the moment (up to ~70 ms each at 100,000 events/s, a pause the counter's
    one-second tick absorbs; in ``visitorstats run`` the beacons' answers wait through it too,
    for less at lower rates: it walks what is alive, the batches not yet written). Cyclic
    garbage waits at most ``seconds`` (plus the loop's current step) for its collection.

    Not for the ingest's server processes: their young collections find nothing to collect, but
    a once-a-second pause of a few milliseconds took the p99 at 20,000 beacons/s past 5 ms
    (BENCHMARKS.md, round 10)."""

    def first() -> None:
        _was_enabled[:] = [gc.isenabled()]
        gc.disable()

    def last() -> None:
        if _was_enabled[0]:
            gc.enable()

    return _on_a_timer(seconds, 1, _young_users, first, last)


def _on_a_timer(
    seconds: float,
    generation: int,
    users: list[Callable[[], None]],
    first: Callable[[], None],
    last: Callable[[], None],
) -> Callable[[], None]:
    """Collect ``generation`` (and the younger ones) every ``seconds`` from the running loop,
    as one of ``users``: ``first`` runs before the first user's timer starts, ``last`` once the
    last user has undone theirs. Returns the undo (undoing twice changes nothing)."""
    loop = asyncio.get_running_loop()
    if not users:
        first()
    handle: asyncio.TimerHandle | None = None

    def collect() -> None:
        nonlocal handle
        gc.collect(generation)
        handle = loop.call_later(seconds, collect)

    def cancel() -> None:
        if handle is not None:
            handle.cancel()

    handle = loop.call_later(seconds, collect)
    users.append(cancel)

    def undo() -> None:
        if cancel not in users:
            return  # undone already
        cancel()
        users.remove(cancel)
        if not users:
            last()

    return undo
