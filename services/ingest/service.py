"""``visitorstats ingest``: the ingest app factory (beacons in, Kafka out)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services import http, metrics
from services.ingest import app as ingest_routes
from services.ingest.pipeline import Pipeline
from services.ingest.publish import KafkaPublisher, Publisher, SpoolFirstPublisher
from services.ingest.ratelimit import RateLimiter
from services.ingest.spool import Spool
from services.ingest.visitor import VisitorHasher
from services.settings import Settings
from services.sites import Registry


def link_seconds(settings: Settings, registry: Registry) -> int:
    """How long after a salt rotation a beacon carries the key under the previous salt: long
    enough for a reader seen before it to be linked while still online (the longest window of
    a site) or in their visit (the visit timeout), whatever ``VISITORSTATS_SALT_LINK_SECONDS``
    says; at most the whole period."""
    longest = max((site.online_window_seconds for site in registry), default=0)
    wanted = max(settings.salt_link_seconds, settings.visit_timeout_seconds, longest)
    return min(wanted, settings.salt_period_seconds)


def make_pipeline(settings: Settings, registry: Registry, publisher: Publisher) -> Pipeline:
    metrics.for_sites([site.id for site in registry])
    return Pipeline(
        registry,
        publisher,
        VisitorHasher(
            settings.secret, settings.salt_period_seconds, link_seconds(settings, registry)
        ),
        RateLimiter(
            settings.rate_limit_per_second,
            settings.rate_limit_burst,
            settings.rate_limit_max_clients,
        ),
    )


def kafka_publisher(settings: Settings) -> KafkaPublisher:
    """The publisher to Kafka that ``VISITORSTATS_PUBLISH_ACK`` asks for, with its spool."""
    if not settings.kafka_bootstrap:
        raise SystemExit("VISITORSTATS_KAFKA_BOOTSTRAP is required to publish to Kafka")
    spool = Spool.claim(
        settings.spool_dir, settings.spool_max_bytes, reserve=settings.disk_reserve_bytes
    )
    metrics.DISK_ROOM.watch("spool", settings.spool_dir)
    linger = settings.publish_linger_seconds
    if settings.publish_ack == "spool":
        return SpoolFirstPublisher(
            settings.kafka_bootstrap,
            settings.kafka_topic,
            spool,
            linger_seconds=0.02 if linger is None else linger,
        )
    return KafkaPublisher(
        settings.kafka_bootstrap,
        settings.kafka_topic,
        spool,
        linger_seconds=0.002 if linger is None else linger,
    )


def add_publisher(app: web.Application, publisher: Publisher) -> None:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await publisher.start()
        yield
        await publisher.stop()

    async def ready() -> tuple[bool, str]:
        return publisher.ready()

    app.cleanup_ctx.append(lifecycle)
    http.add_ready_check(app, "publish", ready)


def create_ingest_app(
    settings: Settings, registry: Registry, publisher: Publisher | None = None
) -> web.Application:
    """The ingest app, publishing to Kafka (or to ``publisher``: the tests hand it the
    standalone ``LocalPublisher``)."""
    if publisher is None:
        if not settings.kafka_bootstrap:
            raise SystemExit("visitorstats ingest needs VISITORSTATS_KAFKA_BOOTSTRAP")
        publisher = kafka_publisher(settings)
    app = http.new_app(settings)
    http.hide_metrics(app, metrics.families(metrics.AGGREGATE))
    add_publisher(app, publisher)
    ingest_routes.add_routes(app, make_pipeline(settings, registry, publisher), settings)
    return app
