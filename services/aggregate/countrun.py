"""The consumer's inner loop over one partition's run of records: decode each and count it
(``Aggregator.process`` hands every fetched run here). Its own module so that it runs compiled
(``make native``): the loop costs per record what the call it makes does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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

# Time zones named by records of sites this registry does not have (``Event.tz``), made once;
# None for a name that is no zone. Bounded: ingest names only its registry's zones.
_ZONES: dict[str, ZoneInfo | None] = {}


def _zone(name: str) -> ZoneInfo | None:
    if name in _ZONES:
        return _ZONES[name]
    try:
        zone: ZoneInfo | None = ZoneInfo(name) if name else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if len(_ZONES) < 1000:
        _ZONES[name] = zone
    return zone


def count_run(
    state: PartitionState,
    partition: int,
    run: Iterable[R],
    after: int,
    sites: Mapping[str, _Site],
    rows: list[Row],
    bad: list[tuple[R, str]],
    gap: Callable[[int, int, int], bool],
    strangers: set[str],
) -> tuple[int, int]:
    """Count ``run`` (records of ``partition`` in log order) from offset ``after`` on: each
    counted row goes to ``rows``, each record that cannot be counted to ``bad`` with the
    reason. A record below ``after`` was counted already (a redelivery, a stale prefetch); at
    a record past it, ``gap(partition, after, offset)`` says whether to stop (the rest is read
    again from ``after``). Returns the offset after the last record taken, and the number of
    duplicates. A record of a site that ``sites`` does not have is counted in the time zone
    it names (ingest's registry has the site, this one not yet: a rollout that reached ingest
    first), and its site added to ``strangers``."""
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
        if site is not None:
            zone = site.tz
        else:
            found = _zone(event.tz)
            if found is None:
                bad.append((rec, f"unknown site {event.site!r}"))
                continue
            zone = found
            strangers.add(event.site)
        row = state.apply(event, zone, partition, offset)
        if row is None:
            duplicates += 1
            continue
        rows.append(row)
    return after, duplicates
