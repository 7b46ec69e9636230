"""The site registry (``sites.toml``): which sites may send beacons, and how they are counted."""

from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.memo import memo

SITE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# How often beacon.js says a visible page is still read, unless its tag's data-heartbeat says
# otherwise: a site's online window should hold two of them.
BEACON_HEARTBEAT_SECONDS = 60

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """The registry file is invalid; the message names the site and the field."""


@dataclass(frozen=True)
class Site:
    id: str
    name: str
    origins: frozenset[str]
    timezone: str
    baseline_visits: int = 0
    baseline_pageviews: int = 0
    online_window_seconds: int = 300
    honor_dnt: bool = False
    honor_gpc: bool = False
    # When set, `member: true` counts only with a valid signed member token (HMAC-SHA256).
    member_token_secret: bytes | None = None

    # The zone of ``timezone``, made once (the aggregate asks for it once per event).
    tz: ZoneInfo = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tz", ZoneInfo(self.timezone))

    def origin_allowed(self, origin: str) -> bool:
        """``origin`` as ``normalize_origin`` leaves it."""
        return not self.origins or origin in self.origins


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


# Cached: every browser beacon carries an Origin, and a portal's pages have a few of them.
@memo(4096)
def normalize_origin(origin: str) -> str:
    """An origin as the registry's and a request's are compared: lower case, without a trailing
    slash or its scheme's default port (``https://a.vn:443`` is ``https://a.vn``)."""
    origin = origin.rstrip("/").lower()
    port = _DEFAULT_PORTS.get(origin.partition("://")[0])
    if port is not None and origin.endswith(port):
        origin = origin[: -len(port)]
    return origin


# The keys a site's table may have (the fields of ``Site`` but its id and zone object): anything
# else is a typo, and a misspelt baseline would be lost.
KEYS = frozenset(f.name for f in dataclasses.fields(Site) if f.init) - {"id"}
_ORIGIN = re.compile(r"https?://[^/?#@\s]+")


def _origin_problem(origin: str) -> str | None:
    """Why ``origin`` cannot be an origin (``scheme://host[:port]``, as a browser's ``Origin``
    header has it), or None."""
    if not _ORIGIN.fullmatch(origin.rstrip("/")):
        return "an origin is http(s)://host[:port], without a path"
    try:
        port = urlsplit(origin).port
    except ValueError:
        return "its port is not a number from 1 to 65535"
    if port == 0:
        return "its port is not a number from 1 to 65535"
    return None


def _site(site_id: str, raw: Mapping[str, Any]) -> Site:
    def field(name: str, kind: type, default: Any) -> Any:
        value = raw.get(name, default)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise RegistryError(f"sites.{site_id}.{name}: expected {kind.__name__}")
        return value

    if not SITE_ID.fullmatch(site_id):
        raise RegistryError(f"sites.{site_id}: a site id is [a-z0-9][a-z0-9-]{{0,63}}")
    if not isinstance(raw, Mapping):
        raise RegistryError(f"sites.{site_id}: expected a table")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise RegistryError(
            f"sites.{site_id}.{unknown[0]}: unknown key (known: {', '.join(sorted(KEYS))})"
        )
    origins = field("origins", list, [])
    for o in origins:
        if not isinstance(o, str):
            raise RegistryError(f"sites.{site_id}.origins: expected strings")
        problem = _origin_problem(o)
        if problem:
            raise RegistryError(f"sites.{site_id}.origins: {o!r}: {problem}")
    tz = field("timezone", str, "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise RegistryError(f"sites.{site_id}.timezone: unknown time zone {tz!r}") from None
    window = field("online_window_seconds", int, 300)
    if not 10 <= window <= 86400:
        raise RegistryError(f"sites.{site_id}.online_window_seconds: between 10 and 86400")
    secret = raw.get("member_token_secret")
    if secret is not None and not isinstance(secret, str):
        raise RegistryError(f"sites.{site_id}.member_token_secret: expected a string")
    baseline_visits = field("baseline_visits", int, 0)
    baseline_pageviews = field("baseline_pageviews", int, 0)
    if baseline_visits < 0 or baseline_pageviews < 0:
        raise RegistryError(f"sites.{site_id}: baselines cannot be negative")
    return Site(
        id=site_id,
        name=field("name", str, site_id),
        origins=frozenset(normalize_origin(o) for o in origins),
        timezone=tz,
        baseline_visits=baseline_visits,
        baseline_pageviews=baseline_pageviews,
        online_window_seconds=window,
        honor_dnt=field("honor_dnt", bool, False),
        honor_gpc=field("honor_gpc", bool, False),
        member_token_secret=secret.encode() if secret else None,
    )


@dataclass(frozen=True)
class Registry:
    sites: Mapping[str, Site]

    def get(self, site_id: str) -> Site | None:
        return self.sites.get(site_id)

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    @classmethod
    def parse(cls, text: str, name: str = "sites.toml") -> Registry:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RegistryError(f"{name}: {e}") from None
        raw_sites = data.get("sites", {})
        if not isinstance(raw_sites, dict):
            raise RegistryError(f"{name}: [sites] must be a table")
        others = sorted(set(data) - {"sites"})
        if others:
            raise RegistryError(f"{name}: unknown key {others[0]!r} (a site is a [sites.ID] table)")
        try:
            registry = cls({sid: _site(sid, raw) for sid, raw in raw_sites.items()})
        except RegistryError as e:
            raise RegistryError(f"{name}: {e}") from None
        untimed = [sid for sid, raw in raw_sites.items() if "timezone" not in raw]
        if untimed:  # one line, however many (a registry of 2,000 sites said 2,000)
            shown, have, their = _some([f"sites.{sid}" for sid in untimed])
            log.warning(
                "%s %s no timezone: %s days, weeks and months are UTC's (timezone = "
                '"Asia/Ho_Chi_Minh" for Việt Nam)',
                shown,
                have,
                their,
            )
        _say_short_windows(registry)
        return registry

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RegistryError(f"site registry not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"cannot read the site registry {path}: {e}") from None
        return cls.parse(text, str(path))


def _say_short_windows(registry: Registry) -> None:
    """One line for the sites whose online window does not hold two default heartbeats: their
    readers drop offline between heartbeats unless their pages set ``data-heartbeat`` (the
    beacon cannot learn the window: its POSTs are ``no-cors``, their answers opaque)."""
    short = [s for s in registry if s.online_window_seconds < 2 * BEACON_HEARTBEAT_SECONDS]
    if not short:
        return
    shown, have, their = _some([f"sites.{s.id} ({s.online_window_seconds} s)" for s in short])
    log.warning(
        "%s %s an online_window_seconds under twice beacon.js's default heartbeat (%d s): a "
        "reader with a visible page drops offline between its heartbeats; set data-heartbeat "
        "on %s pages to at most half the window",
        shown,
        have,
        BEACON_HEARTBEAT_SECONDS,
        their,
    )


def _some(named: list[str]) -> tuple[str, str, str]:
    """``named`` (one or more) for one log line: the first five and how many more, and the
    verb and the possessive that agree with them."""
    more = f" and {len(named) - 5} more" if len(named) > 5 else ""
    many = len(named) > 1
    return ", ".join(named[:5]) + more, "have" if many else "has", "their" if many else "its"
