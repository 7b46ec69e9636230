"""The per-client budget: the token bucket, its memory bound, whose budget a beacon is charged
to (the real client behind trusted proxies only, IPv6 by /64), and the pipeline under a flood
that varies everything a client controls."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from services.aggregate.counting import PartitionState
from services.ingest.beacon import parse_beacon
from services.ingest.pipeline import ClientContext, Pipeline, client_address, rate_key
from services.ingest.publish import LocalPublisher
from services.ingest.publish_types import OutRecord
from services.ingest.ratelimit import RateLimiter
from services.ingest.visitor import VisitorHasher
from services.record import Event
from services.settings import parse_networks
from services.sites import Registry

TRUSTED = parse_networks("127.0.0.1/8,::1,10.0.0.0/8")


@given(
    rate=st.floats(min_value=0.1, max_value=100),
    burst=st.integers(min_value=1, max_value=50),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=300),
)
def test_a_client_gets_at_most_its_burst_plus_its_rate(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate, burst)
    now, allowed = 1000.0, 0
    for gap in gaps:
        now += gap
        wait = limiter.allow("s", "c", now)
        if wait == 0:
            allowed += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9
    assert allowed <= burst + rate * (now - 1000.0) + 1e-6


@given(rate=st.floats(min_value=0.5, max_value=50), n=st.integers(min_value=1, max_value=200))
def test_a_client_within_its_rate_is_never_refused(rate: float, n: int) -> None:
    limiter = RateLimiter(rate, 1)
    assert all(limiter.allow("s", "c", 10.0 + i / rate) == 0 for i in range(n))


def test_budgets_are_per_site_and_client() -> None:
    limiter = RateLimiter(1, 2)
    assert [limiter.allow("a", "x", 0) for _ in range(3)][2] > 0
    assert limiter.allow("b", "x", 0) == 0  # another site
    assert limiter.allow("a", "y", 0) == 0  # another client


def test_memory_is_bounded_and_the_least_recently_used_bucket_goes_first() -> None:
    limiter = RateLimiter(1, 1, max_clients=100)
    for i in range(10_000):
        limiter.allow("s", f"fake-{i}", 0)
        assert len(limiter) <= 100
    assert limiter.allow("s", "fake-9999", 0) > 0  # recent: still remembered, still empty
    assert limiter.allow("s", "fake-0", 0) == 0  # evicted long ago: a fresh bucket


def test_the_real_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() -> None:
    # an untrusted peer cannot name another client
    assert client_address("198.51.100.7", "1.2.3.4", TRUSTED) == "198.51.100.7"
    # behind the trusted proxy: the right-most untrusted hop; what the client wrote is ignored
    assert client_address("127.0.0.1", "6.6.6.6, 1.2.3.4", TRUSTED) == "1.2.3.4"
    assert client_address("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", TRUSTED) == "1.2.3.4"
    # a proxy that added its own header line: the lines are joined in order
    assert client_address("127.0.0.1", "6.6.6.6,1.2.3.4", TRUSTED) == "1.2.3.4"
    # forms: port, brackets, IPv4-mapped IPv6, spaces, empty hops
    assert client_address("127.0.0.1", "1.2.3.4:5678", TRUSTED) == "1.2.3.4"
    assert client_address("127.0.0.1", "[2001:db8::1]:443", TRUSTED) == "2001:db8::1"
    assert client_address("127.0.0.1", " ::ffff:1.2.3.4 ,, ", TRUSTED) == "1.2.3.4"
    assert client_address("::ffff:127.0.0.1", "1.2.3.4", TRUSTED) == "1.2.3.4"
    # junk stops the walk at the last trusted hop (never at a name the client chose)
    assert client_address("127.0.0.1", "1.2.3.4, garbage", TRUSTED) == "127.0.0.1"
    assert client_address("127.0.0.1", "\udcff", TRUSTED) == "127.0.0.1"
    assert client_address(None, "1.2.3.4", TRUSTED) == ""


@given(st.lists(st.ip_addresses().map(str) | st.text(max_size=20), max_size=6))
def test_the_client_address_is_always_a_canonical_address(hops: list[str]) -> None:
    addr = client_address("127.0.0.1", ",".join(hops), TRUSTED)
    assert str(ipaddress.ip_address(addr)) == addr


def test_ipv6_clients_are_charged_by_their_slash_64() -> None:
    assert rate_key("2001:db8:1:2::1") == rate_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert rate_key("2001:db8:1:2::1") != rate_key("2001:db8:1:3::1")
    assert rate_key("203.0.113.9") == "203.0.113.9"


REGISTRY = Registry.parse('[sites.flood]\ntimezone = "UTC"\n')


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=400),
    spread=st.floats(min_value=0, max_value=20),
    v6=st.booleans(),
)
def test_varying_user_agent_visitor_and_event_id_gains_nothing(
    n: int, spread: float, v6: bool
) -> None:
    """One client, n beacons over ``spread`` seconds, each with a new User-Agent, visitor id and
    event id (and, over IPv6, a new address in its /64): published <= burst + rate * spread."""
    rate, burst = 5.0, 20
    clock = [1_800_000_000.0]
    records: list[OutRecord] = []
    publisher = LocalPublisher(records.append)
    pipeline = Pipeline(
        REGISTRY,
        publisher,
        VisitorHasher(b"k", 86400, 3600),
        RateLimiter(rate, burst),
        clock=lambda: clock[0],
    )

    async def flood() -> list[int]:
        await publisher.start()
        statuses = []
        for i in range(n):
            clock[0] = 1_800_000_000.0 + spread * i / n
            beacon = parse_beacon(
                {
                    "site": "flood",
                    "url": "https://a.vn/",
                    "visitor": f"fake-{i}",
                    "event_id": str(uuid.uuid4()),
                }
            )
            address = f"2001:db8:0:1::{i:x}" if v6 else "203.0.113.9"
            ctx = ClientContext(address, f"Mozilla/5.0 Chrome/{i}", None, False, False)
            statuses.append((await pipeline.accept(beacon, ctx)).status)
        return statuses

    statuses = asyncio.run(flood())
    assert set(statuses) <= {202, 429}
    assert len(records) == statuses.count(202) <= burst + rate * spread + 1e-6
    assert statuses[: min(n, burst)] == [202] * min(n, burst)


def test_aggregate_state_stays_bounded_under_a_flood_of_fake_visitors() -> None:
    """Past the limiter (many addresses), every beacon a new visitor: the per-partition visitor
    state keeps at most ``max_visitors``, forgetting the longest idle first."""
    state = PartitionState(0, max_visitors=1000)
    tz = ZoneInfo("UTC")
    for i in range(20_000):
        event = Event(
            str(uuid.UUID(int=i)),
            "flood",
            "pageview",
            1_800_000_000_000 + i,
            f"{i:032x}",
            None,
            False,
            False,
            "https://a.vn/",
            "",
            "",
        )
        assert state.apply(event, tz, 0, i) is not None
        assert len(state) <= 1000
