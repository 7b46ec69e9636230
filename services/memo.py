"""A bounded memo for pure one-argument functions of the hot paths.

``functools.lru_cache`` keeps each entry in a linked-list node that the cyclic garbage
collector tracks: 65,536 entries are 65,536 more objects that every full collection walks
(measured on an ingest worker: full collections of 30–90 ms, the whole tail of its latency).
Here the entries live in a plain dict, which the collector does not track as long as keys and
values are atomic (strings, numbers, ``None``, tuples of those); when it is full its oldest
sixteenth is forgotten (``forget_oldest``: emptying all at once made a pause of its own).

Entries are bounded in size too: a string argument longer than ``LONGEST_KEPT`` characters is
answered and not kept (hostile clients send the longest URLs and headers allowed, each one new:
65,536 of 8 KiB made a cache of half a gigabyte; the usual values are far shorter).

The memo is a class rather than a closure so that ``make native`` compiles its look-up: a
call from compiled code then runs no interpreted frame (round 12 in BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# The longest string a cache of the hot paths keeps as (part of) a key.
LONGEST_KEPT = 512


def forget_oldest(cache: dict[Any, Any], share: int = 16) -> None:
    """Make room in a full cache (a dict, in insertion order): its oldest ``1/share`` goes, at
    least one entry. The hot paths' caches hold 65,536 entries; emptying one of visitor keys at
    once took 4.7 ms, a pause every few seconds at full load, and a sixteenth 0.47 ms, while
    the entries used last stay."""
    for stale in list(islice(cache, max(1, len(cache) // share))):
        del cache[stale]


class Memo(Generic[K, V]):
    """``fn`` with its answers kept: at most ``maxsize``, in ``cache``."""

    def __init__(self, fn: Callable[[K], V], maxsize: int) -> None:
        self.fn = fn
        self.maxsize = maxsize
        self.cache: dict[K, V] = {}

    def __call__(self, arg: K) -> V:
        cache = self.cache
        if arg in cache:
            return cache[arg]
        if isinstance(arg, str) and len(arg) > LONGEST_KEPT:
            return self.fn(arg)
        if len(cache) >= self.maxsize:
            forget_oldest(cache)
        value = cache[arg] = self.fn(arg)
        return value


def memo(maxsize: int) -> Callable[[Callable[[K], V]], Memo[K, V]]:
    def decorate(fn: Callable[[K], V]) -> Memo[K, V]:
        return Memo(fn, maxsize)

    return decorate
