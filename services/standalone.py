"""``visitorstats run``: ingest and aggregate in one process on one port. Without a broker the
hand-off is the in-process ``LocalLog``; with ``VISITORSTATS_KAFKA_BOOTSTRAP`` set, the very
same app publishes to and consumes from Kafka. Either way the counting code is the same."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from aiohttp import web

from services import http
from services.aggregate import render
from services.aggregate.service import add_aggregate
from services.aggregate.sources import KafkaSource, LocalLog, Source
from services.aggregate.store import dsn_of
from services.ingest import app as ingest_routes
from services.ingest.publish import LocalPublisher, Publisher
from services.ingest.service import add_publisher, kafka_publisher, make_pipeline
from services.ingest.spool import Spool
from services.settings import Settings
from services.sites import Registry, normalize_origin

# The room ClickHouse reserves to write a batch, per event of it (it reserved 14.5 MiB for a
# batch of 50,000 beacons: about 300 bytes each), with some to spare.
BATCH_ROOM_PER_EVENT = 320


def create_standalone_app(settings: Settings, registry: Registry) -> web.Application:
    app = http.new_app(settings)
    source: Source
    publisher: Publisher
    if settings.kafka_bootstrap:
        source = KafkaSource(
            settings.kafka_bootstrap,
            settings.kafka_topic,
            settings.kafka_group,
            settings.kafka_dead_letter_topic,
        )
        publisher = kafka_publisher(settings)
        add_aggregate(app, settings, registry, source)
    else:
        root = settings.data_dir / "journal"
        root.mkdir(parents=True, exist_ok=True)
        shared = _same_disk(root, settings.clickhouse_url)  # with the embedded ClickHouse
        journal = Spool.claim(
            root,
            settings.spool_max_bytes,
            # the only spool of this process: its backlog is the spool's gauges and alerts
            # (what ClickHouse has not stored yet; they were 0 while it refused writes)
            metered=True,
            reserve=settings.disk_reserve_bytes,
            # ClickHouse reserves a batch's uncompressed size before it writes it (14.5 MiB
            # for 50,000 beacons): a journal that left it less could never be drained
            least=2 * settings.flush_max_events * BATCH_ROOM_PER_EVENT if shared else 0,
        )
        log = LocalLog(journal)
        source = log
        publisher = LocalPublisher(log.append, journal)
        add_aggregate(
            app,
            settings,
            registry,
            source,
            drained=lambda: log.pending() == 0,
            held=journal.hold if shared else None,
        )
    # Registered last, so it stops first: no new beacons, then the last batch is written.
    add_publisher(app, publisher)
    ingest_routes.add_routes(app, make_pipeline(settings, registry, publisher), settings)

    async def index(request: web.Request) -> web.Response:
        if not len(registry):
            return web.Response(text="visitorstats: no site in the registry")
        public_url, page_url = _public_url(request, settings)
        # The page counts itself for the first site that takes its beacons (the first site of
        # the registry may list only its portal's origins: every beacon refused, 403).
        origin = normalize_origin(public_url)
        demo = next((site for site in registry if site.origin_allowed(origin)), None)
        if demo is None:
            return web.Response(
                text=f"visitorstats: no site of the registry takes beacons from this page's "
                f"origin, {origin}: each lists its origins, without it. For this page to count "
                "itself, add it to a site's origins (or leave a site's origins empty).",
                headers={"Cache-Control": "no-store"},
            )
        return web.Response(
            text=render.render_demo_page(demo.id, page_url=page_url, public_url=public_url),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    app.router.add_get("/", index)
    return app


def _same_disk(directory: Path, clickhouse_url: str) -> bool:
    """Whether ``directory`` is on the disk of the embedded ClickHouse of ``clickhouse_url``
    (its directory, made if it is not yet, as the store makes it)."""
    if not clickhouse_url.startswith("chdb://"):
        return False
    try:
        there = dsn_of(clickhouse_url)[len("chdb://") :]
        return os.stat(directory).st_dev == os.stat(there).st_dev
    except OSError:
        return False


def _public_url(request: web.Request, settings: Settings) -> tuple[str, str]:
    """The service's address as the browser sees it, and this page's: from the request, or,
    behind a trusted proxy, from its ``X-Forwarded-Proto`` / ``X-Forwarded-Host``."""
    scheme, host = request.scheme, request.host
    try:
        peer = ipaddress.ip_address(request.remote or "")
        trusted = any(peer in net for net in settings.trusted_proxies)
    except ValueError:
        trusted = False
    if trusted:
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        fwd_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        scheme = proto if proto in ("http", "https") else scheme
        host = fwd_host or host
    base = f"{scheme}://{host}"
    return base, (base + request.rel_url.path_qs)[:2048]
