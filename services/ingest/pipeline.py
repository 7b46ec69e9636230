"""What happens to a beacon once its fields are valid: an ordered list of named steps, each of
which either lets it through or drops it with a reason from a closed set (and a counted metric).

    check_site -> check_origin -> check_privacy -> check_rate -> detect_bot
               -> resolve_member -> put_visitor -> publish
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from services import metrics
from services.ingest.beacon import Beacon
from services.ingest.bots import is_bot
from services.ingest.publish import Publisher, Unavailable
from services.ingest.publish_types import OutRecord
from services.ingest.ratelimit import RateLimiter
from services.ingest.visitor import VisitorHasher, verify_member_token
from services.record import Event, encode, record_key
from services.sites import Registry

DropReason = Literal["unknown_site", "origin", "rate_limit", "dnt", "gpc", "unavailable"]

# reason -> (HTTP status, message, field)
_REFUSALS: dict[str, tuple[int, str, str | None]] = {
    "unknown_site": (403, "unknown site", "site"),
    "origin": (403, "origin not allowed for this site", "origin"),
    "rate_limit": (429, "too many beacons from this client", None),
    "unavailable": (503, "the service cannot take more beacons now", None),
}


@dataclass(slots=True, frozen=True)
class ClientContext:
    address: str
    user_agent: str
    origin: str | None  # the Origin header, or the origin of the Referer
    dnt: bool
    gpc: bool


@dataclass(slots=True, frozen=True)
class Outcome:
    status: int
    reason: str  # "accepted" or a drop reason
    message: str = ""
    field: str | None = None
    retry_after: float | None = None


ACCEPTED = Outcome(202, "accepted")


def origin_of(url: str | None) -> str | None:
    if not url:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def client_address(
    peer: str | None,
    forwarded_for: str | None,
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> str:
    """The real client: the peer, unless the peer is a trusted proxy, in which case the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    addr = peer or ""
    if forwarded_for and is_trusted(addr):
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            if not hop:
                continue
            addr = hop
            if not is_trusted(hop):
                break
    return addr


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

    def _drop(self, reason: str, retry_after: float | None = None) -> Outcome:
        metrics.BEACONS_DROPPED.labels(reason).inc()
        status, message, field = _REFUSALS[reason]
        return Outcome(status, reason, message, field, retry_after)

    async def accept(self, beacon: Beacon, client: ClientContext) -> Outcome:
        site = self.registry.get(beacon.site)
        if site is None:
            return self._drop("unknown_site")
        if site.origins and (client.origin is None or not site.origin_allowed(client.origin)):
            return self._drop("origin")
        # A reader who asked not to be tracked is answered like any other, and not counted.
        if site.honor_dnt and client.dnt:
            metrics.BEACONS_DROPPED.labels("dnt").inc()
            return Outcome(202, "dnt")
        if site.honor_gpc and client.gpc:
            metrics.BEACONS_DROPPED.labels("gpc").inc()
            return Outcome(202, "gpc")
        now = self.clock()
        wait = self.limiter.allow(site.id, client.address, now)
        if wait:
            return self._drop("rate_limit", retry_after=wait)
        bot = is_bot(client.user_agent)
        member = beacon.member
        if site.member_token_secret is not None:
            member = bool(beacon.member_token) and verify_member_token(
                beacon.member_token or "", site.id, site.member_token_secret, now
            )
        now_ms = int(now * 1000)
        if beacon.visitor:
            key = self.hasher.portal_key(site.id, beacon.visitor)
        else:
            key = self.hasher.key(site.id, client.address, client.user_agent, now_ms)
        event = Event(
            event_id=beacon.event_id or str(uuid.uuid4()),
            site=site.id,
            type=beacon.type,
            ts=now_ms,
            visitor=key.visitor,
            visitor_prev=key.visitor_prev,
            member=member and not bot,
            bot=bot,
            url=beacon.url,
            referrer=beacon.referrer,
            title=beacon.title,
        )
        record = OutRecord(record_key(site.id, key.visitor), encode(event), key.shard)
        try:
            await self.publisher.publish(record)
        except Unavailable:
            return self._drop("unavailable", retry_after=5)
        metrics.BEACONS_ACCEPTED.labels(site.id).inc()
        return ACCEPTED
