"""Settings, read once from the environment (``VISITORSTATS_*``) with the spec's defaults.

A CLI flag may override a field (see ``services.cli``); nothing else reads the environment.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_TRUSTED_PROXIES = "127.0.0.1/8,::1"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


# The least a spool may hold (a few beacons' records), a request line or header line may be
# (a browser's beacon request), and the header lines a request may have (a browser sends ~15).
MIN_SPOOL_BYTES = 64 * 1024
MIN_HEADER_BYTES = 1024
MIN_HEADERS = 32
_POSITIVE = 1e-9  # "more than 0" for the numbers of seconds


def _at_least(least: float) -> str:
    return "more than 0" if least == _POSITIVE else f"at least {least:g}"


# Loggers of the clients that speak, as warnings, of each retry while a server is away (a
# ClickHouse server: 4 lines a second): the services say it themselves, backed off.
QUIET_LOGGERS = ("urllib3", "clickhouse_connect")


def _int_or_none(env: Mapping[str, str], name: str) -> int | None:
    """An integer setting whose default depends on more than the environment: None if unset."""
    raw = env.get(name)
    return None if raw is None or raw == "" else _int(env, name, 0)


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}").fullmatch


def _embedded_url(data_dir: Path) -> str:
    """The embedded ClickHouse in ``data_dir`` (an absolute one stays absolute: an outside audit
    found ``/mnt/data`` made ``chdb://.//mnt/data/clickhouse``, under the working directory)."""
    return f"chdb://{'' if data_dir.is_absolute() else './'}{data_dir / 'clickhouse'}"


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    """A text setting; set but empty is unset, as for the numbers."""
    return env.get(name) or default


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SystemExit(f"{name} must be a finite number, got {raw!r}")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env: Mapping[str, str]) -> str:
    """``VISITORSTATS_LOG_LEVEL``: one of ``LOG_LEVELS`` in any case; unset or empty, INFO."""
    raw = _str(env, "VISITORSTATS_LOG_LEVEL", "INFO")
    if raw.upper() not in LOG_LEVELS:
        raise SystemExit(
            f"VISITORSTATS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {raw!r}"
        )
    return raw.upper()


def _float_or_none(env: Mapping[str, str], name: str) -> float | None:
    if env.get(name) in (None, ""):
        return None
    return _float(env, name, 0.0)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when unset)."""
    raw = env.get(name)
    if raw is None or raw == "":
        return choices[0]
    if raw.strip().lower() not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw.strip().lower()


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SystemExit(f"{name} must be one of 1, true, yes, on, 0, false, no, off; got {raw!r}")


def parse_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Networks, comma-separated; ``none`` is none (no proxy is trusted), and nothing else may
    name none (blanks alone are a mistake, not a choice)."""
    if raw.strip().lower() == "none":
        return ()
    nets = []
    for part in raw.split(","):
        part = part.strip()
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise SystemExit(f"VISITORSTATS_TRUSTED_PROXIES: bad network {part!r}") from None
    if not nets:
        raise SystemExit(
            f"VISITORSTATS_TRUSTED_PROXIES names no network ({raw!r}); 'none' trusts no proxy"
        )
    return tuple(nets)


MAX_WORKERS = 64


class CannotStart(Exception):
    """A start that cannot succeed until the operator acts; the message says what, and where."""


def redact(url: str) -> str:
    """``url`` without the password of its user part, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def reason(e: BaseException) -> str:
    """An exception's first line, with its type: enough for an operator to act on."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def clickhouse_url_problem(url: str) -> str | None:
    """What is wrong with a ``VISITORSTATS_CLICKHOUSE_URL``, or None: ``chdb://PATH``, or
    ``http(s)://[user[:password]@]host[:port][/database]``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "chdb":
        return None
    if scheme not in ("http", "https"):
        return "must be chdb://PATH or http(s)://user:password@host:port/database"
    try:
        parts.port  # noqa: B018  (raises for a port that is not a number in range)
    except ValueError:
        return "has a port that is not a number from 1 to 65535"
    if not parts.hostname:
        return "names no host"
    if parts.path.strip("/").count("/"):
        return "has more than a database name as its path"
    return None


def database_of(url: str) -> str:
    """The ClickHouse database a ``VISITORSTATS_CLICKHOUSE_URL`` names (``default`` if none)."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "chdb":
        return "default"
    return unquote(parts.path.strip("/")) or "default"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    kafka_bootstrap: str | None = None
    kafka_topic: str = "pageviews"
    kafka_dead_letter_topic: str = "pageviews-dlq"
    kafka_group: str = "visitorstats-aggregate"
    clickhouse_url: str = "chdb://./data/clickhouse"
    sites_path: Path = Path("sites.toml")
    data_dir: Path = Path("data")
    secret: bytes = b""
    workers: int = 1
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=lambda: parse_networks(DEFAULT_TRUSTED_PROXIES)
    )
    access_log: bool = False
    # Salt rotation period for the visitor hash; one day in production, shorter in tests.
    salt_period_seconds: int = 86400
    # After a rotation, beacons also carry the previous period's key for this long, so that the
    # aggregate service can link a visitor who is active across the rotation (and no longer).
    salt_link_seconds: int = 3600
    # ingest -> broker: a beacon is answered once it is in the on-disk spool ("spool", see
    # SpoolFirstPublisher) or once the broker acknowledged its record ("broker")
    publish_ack: str = "spool"
    # ingest -> broker batching (None: 0.02 s with publish_ack "spool", 0.002 s with "broker")
    publish_linger_seconds: float | None = None
    publish_batch_bytes: int = 512 * 1024
    spool_dir: Path = Path("data/spool")
    spool_max_bytes: int = 256 * 1024 * 1024
    # room the spool and the journal leave free on their disk (None: 256 MiB, at most a tenth)
    disk_reserve_bytes: int | None = None
    # aggregate batching: a batch closes on count or on age, whichever comes first
    flush_max_events: int = 50_000
    flush_interval_seconds: float = 0.25
    counter_interval_seconds: float = 0.5
    # seconds between keep-alive comments on an idle counter stream
    stream_keepalive_seconds: float = 15.0
    visit_timeout_seconds: int = 1800
    # duplicates of an event_id are recognised within this horizon
    dedup_horizon_seconds: int = 3600
    # per-client (address) beacon budget per site: sustained rate and burst
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 200
    max_visitors_per_partition: int = 2_000_000
    # slow or abusive HTTP clients
    # (services/http.py states what each does; README "Security and privacy" why these values)
    client_max_size: int = 8 * 1024
    read_timeout_seconds: float = 10.0  # request head, request body, idle keep-alive
    max_connections: int = 10_000  # per process; ~5 KB idle, ~9 KB per open counter stream
    max_header_bytes: int = 8190  # the request line, and each header line
    max_headers: int = 100
    rate_limit_max_clients: int = 100_000  # token buckets kept (LRU), ~200 bytes each

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        e = os.environ if env is None else env
        data_dir = Path(_str(e, "VISITORSTATS_DATA_DIR", "data"))
        topic = _str(e, "VISITORSTATS_KAFKA_TOPIC", "pageviews")
        s = cls(
            host=_str(e, "VISITORSTATS_HOST", "127.0.0.1"),
            port=_int(e, "VISITORSTATS_PORT", 8080),
            kafka_bootstrap=e.get("VISITORSTATS_KAFKA_BOOTSTRAP") or None,
            kafka_topic=topic,
            kafka_dead_letter_topic=_str(e, "VISITORSTATS_KAFKA_DLQ_TOPIC", topic + "-dlq"),
            kafka_group=_str(e, "VISITORSTATS_KAFKA_GROUP", "visitorstats-aggregate"),
            clickhouse_url=_str(e, "VISITORSTATS_CLICKHOUSE_URL", _embedded_url(data_dir)),
            sites_path=Path(_str(e, "VISITORSTATS_SITES", "./sites.toml")),
            data_dir=data_dir,
            secret=e.get("VISITORSTATS_SECRET", "").encode(),
            workers=_int(e, "VISITORSTATS_WORKERS", 1),
            trusted_proxies=parse_networks(
                _str(e, "VISITORSTATS_TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES)
            ),
            access_log=_bool(e, "VISITORSTATS_ACCESS_LOG", False),
            salt_period_seconds=_int(e, "VISITORSTATS_SALT_PERIOD_SECONDS", 86400),
            salt_link_seconds=_int(e, "VISITORSTATS_SALT_LINK_SECONDS", 3600),
            publish_ack=_choice(e, "VISITORSTATS_PUBLISH_ACK", ("spool", "broker")),
            publish_linger_seconds=_float_or_none(e, "VISITORSTATS_PUBLISH_LINGER_SECONDS"),
            spool_dir=Path(_str(e, "VISITORSTATS_SPOOL_DIR", str(data_dir / "spool"))),
            spool_max_bytes=_int(e, "VISITORSTATS_SPOOL_MAX_BYTES", 256 * 1024 * 1024),
            disk_reserve_bytes=_int_or_none(e, "VISITORSTATS_DISK_RESERVE_BYTES"),
            flush_max_events=_int(e, "VISITORSTATS_FLUSH_MAX_EVENTS", 50_000),
            flush_interval_seconds=_float(e, "VISITORSTATS_FLUSH_INTERVAL_SECONDS", 0.25),
            counter_interval_seconds=_float(e, "VISITORSTATS_COUNTER_INTERVAL_SECONDS", 0.5),
            stream_keepalive_seconds=_float(e, "VISITORSTATS_STREAM_KEEPALIVE_SECONDS", 15.0),
            dedup_horizon_seconds=_int(e, "VISITORSTATS_DEDUP_HORIZON_SECONDS", 3600),
            rate_limit_per_second=_float(e, "VISITORSTATS_RATE_LIMIT_PER_SECOND", 50.0),
            rate_limit_burst=_int(e, "VISITORSTATS_RATE_LIMIT_BURST", 200),
            max_visitors_per_partition=_int(e, "VISITORSTATS_MAX_VISITORS", 2_000_000),
            read_timeout_seconds=_float(e, "VISITORSTATS_READ_TIMEOUT_SECONDS", 10.0),
            max_connections=_int(e, "VISITORSTATS_MAX_CONNECTIONS", 10_000),
            max_header_bytes=_int(e, "VISITORSTATS_MAX_HEADER_BYTES", 8190),
            max_headers=_int(e, "VISITORSTATS_MAX_HEADERS", 100),
            rate_limit_max_clients=_int(e, "VISITORSTATS_RATE_LIMIT_MAX_CLIENTS", 100_000),
        )
        return replace(s, **overrides) if overrides else s

    def check(self) -> None:
        """Raise ``SystemExit`` with a message naming the variable when a value cannot work."""
        if not 1 <= self.port <= 65535:
            raise SystemExit(f"VISITORSTATS_PORT must be from 1 to 65535, got {self.port}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise SystemExit(
                f"VISITORSTATS_WORKERS must be from 1 to {MAX_WORKERS}, got {self.workers}"
            )
        problem = clickhouse_url_problem(self.clickhouse_url)
        if problem:
            raise SystemExit(
                f"VISITORSTATS_CLICKHOUSE_URL {problem}, got {redact(self.clickhouse_url)!r}"
            )
        if not self.host.strip():
            raise SystemExit("VISITORSTATS_HOST must name an address to listen on")
        for name, value, least in self._ranges():
            if value is not None and value < least:
                raise SystemExit(f"VISITORSTATS_{name} must be {_at_least(least)}, got {value}")
        if self.rate_limit_per_second > 0 and self.rate_limit_burst < 1:
            raise SystemExit(
                "VISITORSTATS_RATE_LIMIT_BURST must be at least 1 while "
                f"VISITORSTATS_RATE_LIMIT_PER_SECOND is on, got {self.rate_limit_burst} "
                "(a rate of 0 turns the limit off)"
            )
        for name, topic in (
            ("VISITORSTATS_KAFKA_TOPIC", self.kafka_topic),
            ("VISITORSTATS_KAFKA_DLQ_TOPIC", self.kafka_dead_letter_topic),
        ):
            if not _TOPIC(topic):
                raise SystemExit(
                    f"{name} must be a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -), "
                    f"got {topic!r}"
                )

    def _ranges(self) -> list[tuple[str, float | None, float]]:
        """(variable, value, the least that works) of each number with a floor: below it a
        service starts but refuses every beacon, or divides by zero, or miscounts."""
        return [
            ("SALT_PERIOD_SECONDS", self.salt_period_seconds, 1),
            ("SALT_LINK_SECONDS", self.salt_link_seconds, 0),
            ("PUBLISH_LINGER_SECONDS", self.publish_linger_seconds, 0),
            ("SPOOL_MAX_BYTES", self.spool_max_bytes, MIN_SPOOL_BYTES),
            ("DISK_RESERVE_BYTES", self.disk_reserve_bytes, 0),
            ("FLUSH_MAX_EVENTS", self.flush_max_events, 1),
            ("FLUSH_INTERVAL_SECONDS", self.flush_interval_seconds, _POSITIVE),
            ("COUNTER_INTERVAL_SECONDS", self.counter_interval_seconds, _POSITIVE),
            ("STREAM_KEEPALIVE_SECONDS", self.stream_keepalive_seconds, _POSITIVE),
            ("DEDUP_HORIZON_SECONDS", self.dedup_horizon_seconds, 0),
            ("RATE_LIMIT_PER_SECOND", self.rate_limit_per_second, 0),
            ("MAX_VISITORS", self.max_visitors_per_partition, 1),
            ("READ_TIMEOUT_SECONDS", self.read_timeout_seconds, _POSITIVE),
            ("MAX_CONNECTIONS", self.max_connections, 1),
            ("MAX_HEADER_BYTES", self.max_header_bytes, MIN_HEADER_BYTES),
            ("MAX_HEADERS", self.max_headers, MIN_HEADERS),
            ("RATE_LIMIT_MAX_CLIENTS", self.rate_limit_max_clients, 1),
        ]

    def with_secret(self) -> Settings:
        """Return settings whose ``secret`` is set: from the environment, or generated once and
        kept under the data directory (so restarts keep counting the same visitors), written
        to disk durably (fsync) before it is used. A kept secret found empty (emptied, or cut
        by a power loss before this wrote durably), or missing while the data directory holds
        earlier data, is made anew, and said: visitors met before count as new ones once."""
        if self.secret:
            return self
        path = self.data_dir / "secret"
        try:
            kept = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            kept = None
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(
                f"visitorstats: cannot read the visitor hashing secret {path}: {e}"
            ) from None
        if kept:
            return replace(self, secret=kept.encode())
        if kept is not None:
            why = f"{path} is empty"
        elif _holds_data(self.data_dir):
            why = f"{path} is missing while {self.data_dir} holds earlier data"
        else:
            why = ""
        if why:
            print(
                f"visitorstats: {why}: a new visitor hashing secret is made; visitors met before "
                "count as new visitors once (set VISITORSTATS_SECRET or restore the file to keep "
                "the old one)",
                file=sys.stderr,
            )
        secret = secrets.token_hex(32)
        _write_durably(path, secret)
        return replace(self, secret=secret.encode())


def _holds_data(directory: Path) -> bool:
    """Whether ``directory`` holds what an earlier run left (not a fresh data directory)."""
    try:
        return any(
            p.name not in ("secret", "secret.tmp") and not p.name.startswith("metrics-")
            for p in directory.iterdir()
        )
    except OSError:
        return False


def _write_durably(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all, on disk before this returns: a temporary
    file written and synced, renamed over ``path``, and the directory synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
