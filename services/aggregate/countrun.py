"""The consumer's inner loop over one partition's run of records: decode each and count it
(``Aggregator.process`` hands every fetched run here). Its own module so that it runs compiled
(``make native``): the loop costs per record what the call it makes does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar
from zoneinfo import ZoneInfo

from services.aggregate.counting import PartitionState, Row
from services.record import RecordError, decode


class _Record(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


class _Site(Protocol):
    @property
    def tz(self) -> ZoneInfo: ...


R = TypeVar("R", bound=_Record)


def count_run(
    state: PartitionState,
    partition: int,
    run: Iterable[R],
    after: int,
    sites: Mapping[str, _Site],
    rows: list[Row],
    bad: list[tuple[R, str]],
    gap: Callable[[int, int, int], bool],
) -> tuple[int, int]:
    """Count ``run`` (records of ``partition`` in log order) from offset ``after`` on: each
    counted row goes to ``rows``, each record that cannot be counted to ``bad`` with the
    reason. A record below ``after`` was counted already (a redelivery, a stale prefetch); at
    a record past it, ``gap(partition, after, offset)`` says whether to stop (the rest is read
    again from ``after``). Returns the offset after the last record taken, and the number of
    duplicates."""
    duplicates = 0
    for rec in run:
        offset = rec.offset
        if offset < after:
            continue
        if offset > after and gap(partition, after, offset):
            break
        after = offset + 1
        try:
            event = decode(rec.value)
        except RecordError as e:
            bad.append((rec, str(e)))
            continue
        site = sites.get(event.site)
        if site is None:
            bad.append((rec, f"unknown site {event.site!r}"))
            continue
        row = state.apply(event, site.tz, partition, offset)
        if row is None:
            duplicates += 1
            continue
        rows.append(row)
    return after, duplicates
