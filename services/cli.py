"""The ``visitorstats`` command: ``run``, ``ingest``, ``aggregate``, ``migrate``."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO

from services.settings import (
    QUIET_LOGGERS,
    CannotStart,
    Settings,
    database_of,
    log_level,
    reason,
    redact,
)
from services.sites import Registry, RegistryError
from services.version import VERSION


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visitorstats",
        description="visitorstats: the visitor counter of a portal's pages. Every setting is "
        "an environment variable (VISITORSTATS_*, see the README); a flag overrides it.",
    )
    parser.add_argument("--version", action="version", version=f"visitorstats {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        (
            "run",
            "ingest + aggregate in one process, one port (embedded ClickHouse; no broker "
            "unless VISITORSTATS_KAFKA_BOOTSTRAP is set)",
        ),
        ("ingest", "the ingest service alone (needs Kafka)"),
        ("aggregate", "the aggregate service alone (needs Kafka and ClickHouse)"),
        ("migrate", "apply the ClickHouse schema"),
    ):
        p = sub.add_parser(name, help=text)
        if name != "migrate":
            p.add_argument("--sites", type=Path, help="VISITORSTATS_SITES (./sites.toml)")
        if name != "ingest":
            p.add_argument(
                "--clickhouse-url", help="VISITORSTATS_CLICKHOUSE_URL (chdb://./data/clickhouse)"
            )
        if name != "migrate":
            p.add_argument("--host", help="VISITORSTATS_HOST (127.0.0.1)")
            port = "8081" if name == "aggregate" else "8080"
            p.add_argument("--port", type=int, help=f"VISITORSTATS_PORT ({port})")
            p.add_argument("--kafka-bootstrap", help="VISITORSTATS_KAFKA_BOOTSTRAP (unset)")
            if name != "aggregate":  # one process; more of them share the partitions
                p.add_argument("--workers", type=int, help="VISITORSTATS_WORKERS (1)")
        else:
            p.add_argument("--cluster", help="create replicated + distributed tables on it")
            p.add_argument(
                "--print", action="store_true", help="print the statements instead of applying"
            )
    return parser


def _multiprocess_metrics(settings: Settings) -> Path | None:
    """With several worker processes, ``/metrics`` must add up all of them: prometheus_client's
    multiprocess mode, in a fresh directory under the data directory (removed at exit). It must
    be set before ``services.metrics`` is first imported (here: before ``services.http``)."""
    if settings.workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    if "services.metrics" in sys.modules:  # too late: each worker shows its own numbers
        print("visitorstats: /metrics shows one worker's numbers", file=sys.stderr)
        return None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="metrics-", dir=settings.data_dir))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _run_can_fork(settings: Settings) -> bool:
    """``run`` with several processes: each takes beacons, counts its share of the partitions
    and serves the counter, so they need Kafka for the hand-off and a ClickHouse server to
    share (one process only may open an embedded chDB)."""
    if not settings.kafka_bootstrap:
        why = "needs Kafka for the hand-off"
    elif settings.clickhouse_url.startswith("chdb://"):
        why = "needs a ClickHouse server (one process only may open embedded ClickHouse)"
    else:
        return True
    print(f"visitorstats run: VISITORSTATS_WORKERS > 1 {why}; using 1 process", file=sys.stderr)
    return False


def _claim_embedded(settings: Settings) -> IO[bytes] | None:
    """Only one process may open an embedded ClickHouse (chDB) directory: take it, or exit
    saying which process has it. The lock is held while the returned file stays open."""
    url = settings.clickhouse_url
    if not url.lower().startswith("chdb://"):
        return None
    from services.aggregate.store import dsn_of

    path = Path(dsn_of(url)[len("chdb://") :])
    lock = open(path / ".visitorstats.lock", "a+b")  # noqa: SIM115 (open for the process)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().decode(errors="replace").strip() or "?"
        lock.close()
        sys.exit(
            f"visitorstats: {path} is in use by another process (pid {holder}); one process "
            "only may open embedded ClickHouse (VISITORSTATS_CLICKHOUSE_URL, or another "
            "VISITORSTATS_DATA_DIR)"
        )
    lock.truncate(0)
    lock.write(str(os.getpid()).encode())
    lock.flush()
    return lock


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # What the data directory holds (page addresses and titles beside visitors' keys, the
    # secret) is not for the machine's other users.
    os.umask(os.umask(0o027) | 0o027)
    env = dict(os.environ)
    if args.command == "aggregate" and not env.get("VISITORSTATS_PORT"):
        env["VISITORSTATS_PORT"] = "8081"
    settings = Settings.from_env(env)
    overrides = {
        "sites_path": getattr(args, "sites", None),
        "clickhouse_url": getattr(args, "clickhouse_url", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "kafka_bootstrap": getattr(args, "kafka_bootstrap", None),
        "workers": getattr(args, "workers", None),
    }
    from dataclasses import replace

    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.command == "aggregate":
        settings = replace(settings, workers=1)
    settings.check()
    log_level(env)  # (each server process sets it up; a bad one stops the start here, once)
    for name in QUIET_LOGGERS:  # (migrate too: the servers set it again in each process)
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.command == "migrate":
        from services.aggregate.migrate import (
            check_identifier,
            migrations,
            render,
            schema_migrations_ddl,
        )

        if args.cluster is not None:
            try:
                check_identifier(args.cluster, "--cluster")
            except ValueError as e:
                sys.exit(f"visitorstats migrate: {e}")

        if args.print:
            database = database_of(settings.clickhouse_url)
            try:
                print(schema_migrations_ddl(args.cluster) + ";")
                for mig in migrations():
                    for statement in render(mig, args.cluster, database):
                        print(statement.strip() + ";")
                sys.stdout.flush()
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        from services.aggregate.store import Store

        lock = _claim_embedded(settings)
        store = Store(settings.clickhouse_url)
        try:
            applied = store.migrate_sync(args.cluster)
        except CannotStart as e:
            sys.exit(f"visitorstats migrate: {e}")
        except Exception as e:
            sys.exit(
                f"visitorstats migrate: cannot apply the schema to "
                f"{redact(settings.clickhouse_url)}: {reason(e)}"
            )
        finally:
            store.close()
            if lock is not None:
                lock.close()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return

    try:
        registry = Registry.load(settings.sites_path)
    except RegistryError as e:
        sys.exit(f"visitorstats: {e}")
    if not len(registry):
        sys.exit(f"visitorstats: no site in {settings.sites_path}")
    if args.command in ("run", "ingest"):  # the visitors' keys are made there only
        settings = settings.with_secret()
        if b"REPLACE-ME" in settings.secret:
            sys.exit(
                "visitorstats: VISITORSTATS_SECRET is the example's placeholder: anyone could "
                "make the visitors' keys with it (openssl rand -hex 32 makes one)"
            )
        if len(settings.secret) < 16:
            print(
                f"visitorstats: VISITORSTATS_SECRET is {len(settings.secret)} bytes: visitor keys "
                "are only as hard to guess as it is (unset, one of 32 random bytes is made and "
                "kept)",
                file=sys.stderr,
            )
    # held while this function runs: as long as the server (and its workers) run
    lock = _claim_embedded(settings) if args.command in ("run", "aggregate") else None
    if args.command == "run" and settings.workers > 1 and not _run_can_fork(settings):
        settings = dataclasses.replace(settings, workers=1)
    metrics_dir = _multiprocess_metrics(settings) if args.command in ("ingest", "run") else None

    from services import http

    if args.command in ("run", "ingest"):
        if args.command == "run":
            from services.standalone import create_standalone_app as create_app
        else:
            from services.ingest.service import create_ingest_app as create_app
        try:
            http.serve_workers(lambda: create_app(settings, registry), settings, settings.workers)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    elif args.command == "aggregate":
        from services.aggregate.service import create_aggregate_app

        http.serve(lambda: create_aggregate_app(settings, registry), settings)


if __name__ == "__main__":
    main()
