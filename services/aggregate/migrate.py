"""Numbered, frozen ClickHouse migrations (``migrations/NNNN_name.sql``), applied in order and
recorded in ``schema_migrations``. A migration, once released, is never edited: add the next one.

The files are templates so that one schema serves both a single server (``MergeTree``) and a
cluster (``--cluster NAME``: ``ReplicatedMergeTree`` tables ``*_local`` on every node, and
``Distributed`` tables under the plain names, which is what the service queries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

# One consumer partition's insert goes to one shard: its deduplication token then fences it
# there (a random key would split one insert across shards, out of reach of the token).
SHARDING_KEYS = {"events": "kafka_partition", "online_now": "kafka_partition"}

# {table:NAME}, {engine:NAME}, or {engine:NAME:Replacing(VERSION_COLUMN)}
_PLACEHOLDER = re.compile(r"\{(table|engine):([a-z_]+)(?::Replacing\(([a-z_]+)\))?\}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("services.aggregate.migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(found, key=lambda mig: mig.version)


_MADE = re.compile(r"CREATE TABLE IF NOT EXISTS \{table:([a-z_]+)\}")


def tables_made() -> dict[str, int]:
    """Each table the migrations make, with the version of the migration that makes it."""
    made: dict[str, int] = {}
    for mig in migrations():
        for name in _MADE.findall(mig.sql):
            made.setdefault(name, mig.version)
    return made


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_identifier(name: str, what: str) -> str:
    """Names cannot be bound parameters in DDL: allow plain identifiers only."""
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{what} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*): {name!r}")
    return name


def render(
    migration: Migration, cluster: str | None = None, database: str = "default"
) -> list[str]:
    """The statements of one migration, for a single server or for a cluster."""
    if cluster is not None:
        check_identifier(cluster, "the cluster name")
    check_identifier(database, "the database name")
    tables = sorted(
        {name for kind, name, _ in _PLACEHOLDER.findall(migration.sql) if kind == "table"}
    )

    def sub(m: re.Match[str]) -> str:
        kind, name, version = m.group(1), m.group(2), m.group(3)
        if kind == "table":
            return f"{name}_local" if cluster else name
        family = "ReplacingMergeTree" if version else "MergeTree"
        if cluster:
            args = f"'/clickhouse/tables/{{shard}}/{database}/{name}', '{{replica}}'"
            return f"Replicated{family}({args}{', ' + version if version else ''})"
        return f"{family}({version})" if version else family

    sql = _PLACEHOLDER.sub(sub, migration.sql)
    sql = sql.replace("{on_cluster}", f"ON CLUSTER {cluster}" if cluster else "")
    sql = sql.replace(
        "{dedup_window_setting}",
        "replicated_deduplication_window" if cluster else "non_replicated_deduplication_window",
    )
    # A migration may hold several statements, each ending with ";" at the end of a line.
    statements = [s.strip() for s in re.split(r";[ \t]*$", _strip_comments(sql), flags=re.M)]
    statements = [s for s in statements if s]
    if cluster:
        for name in tables:
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER {cluster} AS {name}_local "
                f"ENGINE = Distributed({cluster}, {database}, {name}_local, "
                f"{SHARDING_KEYS.get(name, 'rand()')})"
            )
    return statements


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))


SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations {on_cluster}
(version UInt32, name String, applied_at DateTime DEFAULT now())
ENGINE = {engine} ORDER BY version
"""


def schema_migrations_ddl(cluster: str | None, database: str = "default") -> str:
    if cluster is not None:
        check_identifier(cluster, "the cluster name")
    engine = (
        f"ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{database}/schema_migrations', "
        "'{replica}')"
        if cluster
        else "MergeTree"
    )
    return SCHEMA_MIGRATIONS.format(
        on_cluster=f"ON CLUSTER {cluster}" if cluster else "", engine=engine
    ).strip()
