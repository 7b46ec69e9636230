"""What the broker pays per produced batch: ``python -m bench.broker_batches``.

A producer sends 10,000 records/s (330 bytes each, as ingest's) to a 4-partition topic of a
fresh Tansu, in ``--flushes`` produce requests a second (one batch per partition each, as
ingest's publisher does), while a consumer with the aggregate service's fetch settings reads
them. Every 100 ms a marker record in partition 3 carries the moment it was sent; the time
until the consumer has it is the delivery lag. Printed, one JSON line for each ``--flushes``:
the markers' lag (p50, p99, max) and the broker's CPU (cores, from ``/proc``). ``--prefill``
first fills the topic, in batches of ``--prefill-batch`` records: what costs the broker is the
number of batches it holds, not the number of records (Tansu's memory storage keeps every batch
as an object and lists all of a partition's objects on each fetch). No part of visitorstats
runs: this measures the broker and aiokafka alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.deploy import CpuMeter
from tests.support.tansu import Tansu, create_topic

TOPIC = "batches"
VALUE = b'{"x":"' + b"a" * 300 + b'"}'
RATE = 10_000


def new_producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1 << 20
    )


async def produce(bootstrap: str, seconds: float, flushes: int) -> None:
    """``RATE`` records/s in ``flushes`` requests/s for ``seconds``, with markers."""
    producer = new_producer(bootstrap)
    await producer.start()
    try:
        per = max(1, RATE // flushes // 4)
        started = time.monotonic()
        flush = 0
        next_marker = started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            futures = []
            for partition in range(4):
                batch = producer.create_batch()
                for _ in range(per):
                    batch.append(key=b"k", value=VALUE, timestamp=None)
                if partition == 3 and now >= next_marker:
                    batch.append(key=b"m", value=b"%.6f" % now, timestamp=None)
                    next_marker += 0.1
                futures.append(await producer.send_batch(batch, TOPIC, partition=partition))
            await asyncio.gather(*futures)
            flush += 1
            await asyncio.sleep(max(0.0, started + flush / flushes - time.monotonic()))
    finally:
        await producer.stop()


async def prefill(bootstrap: str, records: int, per_batch: int) -> int:
    """``records`` records in batches of ``per_batch``, spread over the partitions, as fast as
    acknowledged (up to 100 batches in flight). Returns how many the broker acknowledged."""
    producer = new_producer(bootstrap)
    await producer.start()
    acknowledged = 0
    try:
        sizes = [min(per_batch, records - first) for first in range(0, records, per_batch)]
        for first in range(0, len(sizes), 100):
            futures = []
            for i in range(first, min(len(sizes), first + 100)):
                batch = producer.create_batch()
                for _ in range(sizes[i]):
                    batch.append(key=b"k", value=VALUE, timestamp=None)
                futures.append(await producer.send_batch(batch, TOPIC, partition=i % 4))
            await asyncio.gather(*futures)
            acknowledged += sum(sizes[first : first + 100])
    finally:
        await producer.stop()
    return acknowledged


async def consume(
    bootstrap: str, seconds: float, lags: list[float], assigned: asyncio.Event
) -> None:
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id="bench",
        auto_offset_reset="latest",
        enable_auto_commit=False,
        # as services/aggregate/sources.py
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_min_bytes=256 * 1024,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        assigned.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            batches = await consumer.getmany(timeout_ms=125, max_records=50_000)
            now = time.monotonic()
            lags.extend(
                now - float(r.value or b"0") for rs in batches.values() for r in rs if r.key == b"m"
            )
    finally:
        await consumer.stop()


async def run(flushes: int, seconds: float, records: int, per_batch: int) -> dict[str, float]:
    with TemporaryDirectory() as tmp:
        broker = Tansu(log_path=Path(tmp) / "tansu.log").start()
        try:
            await create_topic(broker.bootstrap, TOPIC, 4)
            prefilled = await prefill(broker.bootstrap, records, per_batch) if records else 0
            assert broker.proc is not None
            pid = broker.proc.pid
            lags: list[float] = []
            assigned = asyncio.Event()

            async def produce_once_assigned() -> float:
                """The broker's cores while the producer runs."""
                await assigned.wait()
                with CpuMeter({"broker": [pid]}) as meter:
                    await produce(broker.bootstrap, seconds, flushes)
                return meter.shares()["broker"]

            _, cores = await asyncio.gather(
                consume(broker.bootstrap, seconds + 2, lags, assigned), produce_once_assigned()
            )
        finally:
            broker.stop()
    if not lags:
        raise RuntimeError("the consumer received no marker")
    lags.sort()
    n = len(lags)
    return {
        "flushes_per_s": flushes,
        "prefilled": prefilled,
        "prefill_batch": per_batch,
        "markers": n,
        "lag_p50": round(lags[n // 2], 3),
        "lag_p99": round(lags[min(n - 1, int(n * 0.99))], 3),
        "lag_max": round(lags[-1], 3),
        "broker_cores": cores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_batches")
    parser.add_argument("--flushes", default="100,200,400,600", help="produce requests/s")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--prefill", type=int, default=0, help="records written first")
    parser.add_argument("--prefill-batch", type=int, default=250, help="records per batch")
    args = parser.parse_args()
    for flushes in (int(f) for f in args.flushes.split(",")):
        result = asyncio.run(run(flushes, args.seconds, args.prefill, args.prefill_batch))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
