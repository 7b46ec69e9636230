"""The aggregate service's consume path alone, as a process a test can kill:

    python -m tests.integration.consumer_proc BOOTSTRAP TOPIC CLICKHOUSE_URL FLUSH_SECONDS

``Consumer`` over a ``KafkaSource`` and an ``Aggregator`` writing through ``Store``, exactly as
``visitorstats aggregate`` wires them, without the HTTP side. It prints one line per change:
``pending N`` (rows counted, not yet written) and ``written N`` (writes so far)."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.aggregate.consume import Aggregator, Consumer
from services.aggregate.sources import KafkaSource
from services.aggregate.store import Store
from services.settings import Settings
from services.sites import Registry

SITES = """
[sites.hcm]
timezone = "Asia/Ho_Chi_Minh"
"""


async def main(bootstrap: str, topic: str, url: str, flush: float) -> None:
    settings = Settings(flush_interval_seconds=flush)
    store = Store(url)
    await store.migrate()
    written = 0

    def flushed(ts: list[int]) -> None:
        nonlocal written
        written += 1
        print(f"written {written}", flush=True)

    aggregator = Aggregator(store, Registry.parse(SITES), settings, topic, on_flushed=flushed)
    source = KafkaSource(bootstrap, topic, "consumer-proc", topic + "-dlq")
    consumer = Consumer(source, aggregator, settings)
    await consumer.start()

    async def report() -> None:
        # on a change, and after every write (with a write in the background, the rows
        # counted next may replace the written ones between two looks)
        last = (-1, -1)
        while True:
            now = (aggregator.pending_rows, written)
            if now != last:
                print(f"pending {now[0]}", flush=True)
                last = now
            await asyncio.sleep(0.02)

    reporter = asyncio.create_task(report())
    try:
        await consumer.run()
    finally:
        reporter.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
