"""Batched metric updates (``services/metrics.py``) give exactly what one update per event
gives: the publisher counts a batch at once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from services import metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False) | st.sampled_from(BUCKETS)))
def test_observe_many_is_one_observe_per_value(values: list[float]) -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    each = Histogram("h", "h", buckets=BUCKETS, registry=one)
    batched = Histogram("h", "h", buckets=BUCKETS, registry=many)
    for v in values:
        each.observe(v)
    metrics.observe_many(batched, values)
    assert _samples(one) == _samples(many)


def test_count_safe_adds_each_child_once_per_record() -> None:
    registry = CollectorRegistry()
    c = Counter("c", "c", ["site", "endpoint"], registry=registry)
    a, b, pixel = c.labels("a", "collect"), c.labels("b", "collect"), c.labels("a", "pixel")
    metrics.count_safe([(a, pixel), (b,), (a, pixel), (), (a,)])
    assert a._value.get() == 3
    assert b._value.get() == 1
    assert pixel._value.get() == 2


def _samples(registry: CollectorRegistry) -> list[str]:
    # the exposition without the creation time stamps
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]
