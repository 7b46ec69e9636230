"""The processes a benchmark runs against: the broker (Tansu), ``visitorstats ingest`` with
``VISITORSTATS_WORKERS`` processes, ``visitorstats aggregate`` (embedded chDB), and the
baseline server; all on 127.0.0.1, each started and stopped by the harness."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.wrkrun import BENCH_SITES
from tests.support.procs import ROOT, Service, write_sites
from tests.support.tansu import Tansu, end_offsets, free_port

PROBE_SITE = "probe"
TOPIC = "pageviews"
PARTITIONS = 4


def raise_open_files() -> int:
    """Raise this process's (and so its children's) open-file limit to the hard limit: ten
    thousand stream subscribers need as many sockets on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def sites_toml() -> str:
    blocks = [
        f'[sites.{s}]\nname = "Benchmark {s}"\ntimezone = "Asia/Ho_Chi_Minh"\n'
        "online_window_seconds = 300\n"
        for s in BENCH_SITES
    ]
    blocks.append(f'[sites.{PROBE_SITE}]\nname = "Freshness probe"\ntimezone = "UTC"\n')
    return "\n".join(blocks)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({proc.returncode})")
        try:
            if http_get(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


class Baseline:
    """``python -m bench.baseline`` with ``workers`` processes."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.workers = workers
        self.port = free_port()
        self.log_path = workdir / f"baseline-{workers}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Baseline:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.baseline",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_http(f"{self.url}/healthz", proc=self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return children_or_self(self.proc.pid)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CpuMeter:
    """CPU seconds used by named processes (and by the harness's finished children: wrk)
    between ``__enter__`` and ``__exit__``; ``shares`` gives each as cores busy on average."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}
        self.seconds = 0.0

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> dict[str, float]:
        sample = {name: sum(self._cpu(p) for p in pids) for name, pids in self.pids.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["wrk"] = children.ru_utime + children.ru_stime
        return sample

    def __enter__(self) -> CpuMeter:
        self._start = self._sample()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        self.seconds = time.monotonic() - self._t0
        self.used = {k: end[k] - self._start.get(k, 0.0) for k in end}

    def shares(self) -> dict[str, float]:
        return {k: round(v / self.seconds, 2) for k, v in self.used.items() if self.seconds}


def machine_busy() -> float:
    """Cores busy over the last second, all processes of the machine (others' too)."""

    def total() -> tuple[float, float]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(x) for x in fields]
        idle = values[3] + values[4]
        return sum(values), idle

    a_total, a_idle = total()
    time.sleep(1.0)
    b_total, b_idle = total()
    cores = os.cpu_count() or 1
    return round(cores * (1 - (b_idle - a_idle) / max(1, b_total - a_total)), 2)


def worker_pids(service: Service) -> list[int]:
    """The processes that serve requests: the workers under the parent, else the parent."""
    assert service.proc is not None
    return children_or_self(service.proc.pid)


def children_or_self(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()] or [pid]


class Deployment:
    """Tansu + ``visitorstats ingest`` (``workers`` processes) + ``visitorstats aggregate``."""

    def __init__(self, workdir: Path, workers: int = 2, publish_ack: str = "spool") -> None:
        self.workdir = workdir
        self.workers = workers
        self.publish_ack = publish_ack  # ingest's VISITORSTATS_PUBLISH_ACK
        workdir.mkdir(parents=True, exist_ok=True)
        write_sites(workdir, sites_toml())
        self.broker = Tansu(log_path=workdir / "tansu.log")
        self.ingest: Service | None = None
        self.aggregate: Service | None = None

    def _env(self, data: str) -> dict[str, str]:
        return {
            "VISITORSTATS_KAFKA_BOOTSTRAP": self.broker.bootstrap,
            "VISITORSTATS_KAFKA_TOPIC": TOPIC,
            "VISITORSTATS_DATA_DIR": str(self.workdir / data),
            "VISITORSTATS_LOG_LEVEL": "WARNING",
            # the load comes from a handful of addresses: no per-client budget
            "VISITORSTATS_RATE_LIMIT_PER_SECOND": "0",
            "VISITORSTATS_MAX_CONNECTIONS": "100000",
            "PYTHONUNBUFFERED": "1",
        }

    def start_broker(self) -> None:
        self.broker.start()
        self.broker.create_topic(TOPIC, PARTITIONS)

    def start_ingest(self) -> Service:
        env = {
            **self._env("ingest-data"),
            "VISITORSTATS_WORKERS": str(self.workers),
            "VISITORSTATS_PUBLISH_ACK": self.publish_ack,
        }
        self.ingest = Service("ingest", self.workdir, env).start()
        return self.ingest

    def start_aggregate(self) -> Service:
        env = {
            **self._env("aggregate-data"),
            "VISITORSTATS_CLICKHOUSE_URL": f"chdb://{self.workdir / 'clickhouse'}",
        }
        self.aggregate = Service("aggregate", self.workdir, env).start(timeout=120)
        return self.aggregate

    def end_offsets(self) -> int:
        return sum(asyncio.run(true_end_offsets(self.broker.bootstrap, TOPIC)).values())

    def settled_offsets(self, expected: int, timeout: float = 30) -> int:
        """The sum of the topic's end offsets once it equals ``expected`` or stops moving."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while True:
            total = self.end_offsets()
            if total == expected:
                return total
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since > 3 or time.monotonic() > deadline:
                return total
            time.sleep(0.2)

    def counter(self, site: str) -> dict[str, Any]:
        assert self.aggregate is not None
        status, body = http_get(f"{self.aggregate.url}/v1/sites/{site}/counter")
        if status != 200:
            raise RuntimeError(f"counter of {site}: {status} {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def pageviews_counted(self) -> int:
        return sum(int(self.counter(s)["pageviews"]["total"]) for s in BENCH_SITES)

    def wait_pageviews(self, expected: int, timeout: float = 300) -> tuple[int, float]:
        """Wait until the counters show ``expected`` page views over the bench sites (or stop
        moving for 20 s); return what they show and how long it took."""
        started = time.monotonic()
        last, since = -1, started
        while True:
            try:
                got = self.pageviews_counted()
            except (OSError, RuntimeError):
                got = -1
            now = time.monotonic()
            if got == expected:
                return got, now - started
            if got != last:
                last, since = got, now
            elif now - since > 20 or now - started > timeout:
                return got, now - started
            time.sleep(0.2)

    def stop(self) -> None:
        for service in (self.ingest, self.aggregate):
            if service is not None:
                try:
                    service.stop()
                except Exception:
                    service.kill()
        self.broker.stop()


async def true_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Per partition, the offset after its last record. Tansu (memory storage) answers
    ListOffsets with an end that can stop short inside the partition's last record batch, so
    the tail of each partition is read from there to find the real end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    listed = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in listed]
        consumer.assign(tps)
        ends = dict(listed)
        for tp in tps:
            consumer.seek(tp, max(0, listed[tp.partition] - 1))
        idle = 0
        while idle < 2:
            batches = await consumer.getmany(timeout_ms=300, max_records=100_000)
            if not batches:
                idle += 1
                continue
            idle = 0
            for tp, records in batches.items():
                if records:
                    ends[tp.partition] = max(ends[tp.partition], records[-1].offset + 1)
        return ends
    finally:
        await consumer.stop()
