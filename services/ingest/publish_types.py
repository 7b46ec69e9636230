"""The unit that ingest hands on: one keyed record, ready bytes.

A plain class with its own ``__init__`` (not a dataclass, whose generated ``__init__`` is
interpreted code): one is made per beacon, and compiled (``make native``) making one runs no
interpreted frame."""

from __future__ import annotations

import time
from typing import Any


class OutRecord:
    __slots__ = ("accepted_at", "counters", "key", "shard", "value")

    def __init__(
        self,
        key: bytes,
        value: bytes,
        shard: int,
        counters: tuple[Any, ...] = (),
        accepted_at: float | None = None,
    ) -> None:
        self.key = key
        self.value = value
        # stable per visitor: picks the partition, so one visitor stays in one partition
        self.shard = shard
        # metric children to add 1 to once the record is safe (acknowledged or spooled): the
        # publisher adds them up per batch (an increment in Prometheus' multiprocess mode is a
        # locked write to a shared file: once per batch, not once per beacon)
        self.counters = counters
        self.accepted_at = time.monotonic() if accepted_at is None else accepted_at

    def __repr__(self) -> str:
        return f"OutRecord(key={self.key!r}, value={self.value!r}, shard={self.shard})"
