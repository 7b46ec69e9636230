from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.chdb_http import ChdbHttpServer
from tests.support.tansu import Tansu


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[Tansu]:
    broker = Tansu(log_path=tmp_path / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[ChdbHttpServer]:
    """A ClickHouse HTTP endpoint over chDB, for several processes sharing one database."""
    server = ChdbHttpServer(tmp_path / "clickhouse").start()
    try:
        yield server
    finally:
        server.stop()
