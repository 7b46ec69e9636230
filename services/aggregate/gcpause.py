"""Pausing Python's cyclic garbage collector over the allocation-heavy steps of a batch.

Counting a batch makes four objects per record that live until the batch is written (the event,
its row, their strings) and frees the rest by reference counting; none of it forms a cycle.
With the collector on, every 700 of those allocations trigger a collection, and the survivors
soon make it walk the whole heap again and again: measured, that cost more than decoding and
counting themselves (``bench/inproc.py aggregate``, main-thread CPU per event). Paused over the
step, the collector runs once after it instead, over what the step left.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (reference counting still frees everything);
    the collector's previous state is restored after it, whatever happens."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
