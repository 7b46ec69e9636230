"""What happens to a beacon once its fields are valid: an ordered list of named steps, each of
which either lets it through or drops it with a reason from a closed set (and a counted metric).

    check_site -> check_origin -> check_privacy -> check_rate -> detect_bot
               -> resolve_member -> put_visitor -> publish
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from services import metrics
from services.ingest.beacon import Beacon
from services.ingest.bots import is_bot
from services.ingest.publish import Publisher, Unavailable, publish
from services.ingest.publish_types import OutRecord
from services.ingest.ratelimit import RateLimiter
from services.ingest.visitor import VisitorHasher, verify_member_token
from services.memo import memo
from services.record import encode_fields, record_key
from services.sites import Registry

DropReason = Literal["unknown_site", "origin", "rate_limit", "dnt", "gpc", "unavailable"]

# reason -> (HTTP status, message, field)
_REFUSALS: dict[str, tuple[int, str, str | None]] = {
    "unknown_site": (403, "unknown site", "site"),
    "origin": (403, "origin not allowed for this site", "origin"),
    "rate_limit": (429, "too many beacons from this client", None),
    "unavailable": (503, "the service cannot take more beacons now", None),
}


class ClientContext(NamedTuple):
    """(A named tuple: one is made per beacon.)"""

    address: str
    user_agent: str
    origin: str | None  # the Origin header, or the origin of the Referer
    dnt: bool
    gpc: bool
    rate_limited: bool = True  # False for a trusted proxy's own requests (no X-Forwarded-For)


@dataclass(slots=True, frozen=True)
class Outcome:
    status: int
    reason: str  # "accepted" or a drop reason
    message: str = ""
    field: str | None = None
    retry_after: float | None = None


# accepted and published: counted by the publisher (``OutRecord.counters``), not again
ACCEPTED = Outcome(202, "accepted")


class EventIds:
    """Server-side event ids: version-4 UUID strings made of a random prefix drawn once per
    process (74 random bits, a new one after a fork) and a 48-bit counter in the last group
    (XORed into random bits). Unique within a process for 2**48 ids, and across processes as
    likely as random UUIDs; a tenth of the cost of ``str(uuid.uuid4())`` (no system call)."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        n = secrets.randbits(128)
        n = (n & ~(0xF << 76)) | (0x4 << 76)  # version 4
        n = (n & ~(0x3 << 62)) | (0x2 << 62)  # variant RFC 4122
        h = f"{n:032x}"
        self._prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-"
        self._low = n & 0xFFFFFFFFFFFF
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{(next(self._count) ^ self._low) & 0xFFFFFFFFFFFF:012x}"


new_event_id = EventIds()


def origin_of(url: str | None) -> str | None:
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


_LONGEST_ADDRESS = 100  # an IPv6 address with a zone, in brackets, with a port, and spaces


def parse_ip(text: str) -> IPAddress | None:
    """An address as written in a peer name or an ``X-Forwarded-For`` hop (``1.2.3.4``,
    ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]:443``), IPv4-mapped IPv6 as IPv4;
    ``None`` for anything else. Cached: the same few addresses come again and again (a hop
    longer than any address is none, and not kept)."""
    return None if len(text) > _LONGEST_ADDRESS else _parse_ip(text)


@lru_cache(maxsize=65536)
def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(peer: str | None, forwarded_for: str | None, trusted: Networks) -> str:
    """The real client, in canonical form: the peer, unless the peer is a trusted proxy, in
    which case the right-most ``X-Forwarded-For`` hop that is not itself a trusted proxy.

    ``forwarded_for`` is every ``X-Forwarded-For`` header of the request joined with commas
    (a proxy may append its own header line rather than extend the client's). Hops left of
    the first untrusted one were written by the client and are never looked at; a hop that is
    not an address stops the walk at the last trusted hop."""
    ip = parse_ip(peer) if peer else None
    if ip is None:
        return peer or ""
    if forwarded_for and any(ip in net for net in trusted):
        for hop in reversed(forwarded_for.split(",")):
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                if hop.strip():
                    break
                continue
            ip = hop_ip
            if not any(ip in net for net in trusted):
                break
    return str(ip)


def is_trusted(peer: str | None, trusted: Networks) -> bool:
    ip = parse_ip(peer) if peer else None
    return ip is not None and any(ip in net for net in trusted)


@memo(65536)
def rate_key(address: str) -> str:
    """Whose budget a beacon is charged to: the IPv4 address, or the /64 of an IPv6 address
    (one subscriber's allocation: a client rotating addresses inside it gains nothing)."""
    if ":" not in address:
        return address
    ip = parse_ip(address)
    if not isinstance(ip, ipaddress.IPv6Address):
        return address
    return f"{int(ip) >> 64:x}::/64"


class Pipeline:
    def __init__(
        self,
        registry: Registry,
        publisher: Publisher,
        hasher: VisitorHasher,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.publisher = publisher
        self.hasher = hasher
        self.limiter = limiter
        self.clock = clock
        # metric children bound once (labels() per beacon costs more than the inc()):
        # (site, endpoint) -> what a published record counts for
        self._counters: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._dropped = {
            reason: metrics.BEACONS_DROPPED.labels(reason)
            for reason in ("unknown_site", "origin", "rate_limit", "dnt", "gpc", "unavailable")
        }

    def _drop(self, reason: str, retry_after: float | None = None) -> Outcome:
        self._dropped[reason].inc()
        status, message, field = _REFUSALS[reason]
        return Outcome(status, reason, message, field, retry_after)

    async def accept(
        self, beacon: Beacon, client: ClientContext, endpoint: str = "collect"
    ) -> Outcome:
        """Decide, publish, and answer once the record is safe (or refused)."""
        decided = self.decide(beacon, client, endpoint)
        if isinstance(decided, Outcome):
            return decided
        return await self.publish_and_settle(decided)

    async def publish_and_settle(self, record: OutRecord) -> Outcome:
        """Publish a decided record; its outcome once it is safe (or refused)."""
        try:
            await publish(self.publisher, record)
        except Unavailable as e:
            return self.settle(e)
        return self.settle(None)

    def decide(self, beacon: Beacon, client: ClientContext, endpoint: str) -> Outcome | OutRecord:
        """Every step but the publication: a refusal (or a quiet drop), or the record to
        publish (which counts itself as accepted, by site and ``endpoint``, once safe)."""
        site = self.registry.get(beacon.site)
        if site is None:
            return self._drop("unknown_site")
        if site.origins and (client.origin is None or not site.origin_allowed(client.origin)):
            return self._drop("origin")
        # A reader who asked not to be tracked is answered like any other, and not counted.
        if site.honor_dnt and client.dnt:
            self._dropped["dnt"].inc()
            return Outcome(202, "dnt")
        if site.honor_gpc and client.gpc:
            self._dropped["gpc"].inc()
            return Outcome(202, "gpc")
        now = self.clock()
        wait = (
            self.limiter.allow(site.id, rate_key(client.address), now)
            if client.rate_limited
            else 0.0
        )
        if wait:
            return self._drop("rate_limit", retry_after=wait)
        bot = is_bot(client.user_agent)
        member = beacon.member
        if member and site.member_token_secret is not None:
            # the reader says it is logged in, and the portal's token vouches for it (a token
            # left on the page of a reader who logged out is no member)
            member = bool(beacon.member_token) and verify_member_token(
                beacon.member_token or "", site.id, site.member_token_secret, now
            )
        now_us = int(now * 1_000_000)
        now_ms = now_us // 1000
        if beacon.visitor:
            visitor, visitor_prev, shard = self.hasher.portal_key(site.id, beacon.visitor)
        else:
            visitor, visitor_prev, shard = self.hasher.key(
                site.id, client.address, client.user_agent, now_ms
            )
        value = encode_fields(
            event_id=beacon.event_id or new_event_id(),
            site=site.id,
            type=beacon.type,
            ts=now_ms,
            visitor=visitor,
            visitor_prev=visitor_prev,
            member=member and not bot,
            bot=bot,
            url=beacon.url,
            referrer=beacon.referrer,
            title=beacon.title,
            micros=now_us - now_ms * 1000,
            tz=site.timezone,
        )
        counters = self._counters.get((site.id, endpoint))
        if counters is None:
            counters = self._counters[(site.id, endpoint)] = (
                metrics.BEACONS_ACCEPTED.labels(site.id),
                metrics.INGEST_REQUESTS.labels(endpoint, "accepted"),
            )
        return OutRecord(record_key(site.id, visitor), value, shard, counters)

    def settle(self, exc: BaseException | None) -> Outcome:
        """The outcome of a publication: done (counted by the publisher), or refused."""
        if exc is None:
            return ACCEPTED
        if isinstance(exc, Unavailable):
            return self._drop("unavailable", retry_after=5)
        raise exc
