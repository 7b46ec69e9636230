"""The unit that ingest hands on: one keyed record, ready bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class OutRecord:
    key: bytes
    value: bytes
    shard: int  # stable per visitor: picks the partition, so one visitor stays in one partition
    accepted_at: float = field(default_factory=time.monotonic)
