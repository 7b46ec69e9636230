"""The unit that ingest hands on: one keyed record, ready bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class OutRecord:
    key: bytes
    value: bytes
    shard: int  # stable per visitor: picks the partition, so one visitor stays in one partition
    # metric children to add 1 to once the record is safe (acknowledged or spooled): the
    # publisher adds them up per batch (an increment in Prometheus' multiprocess mode is a
    # locked write to a shared file: once per batch, not once per beacon)
    counters: tuple[Any, ...] = ()
    accepted_at: float = field(default_factory=time.monotonic)
