from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support.chdb_http import ChdbHttpServer
from tests.support.tansu import Tansu

# No test is timed: how long an example takes on a shared machine says nothing of the code (a
# property test once failed its 200 ms deadline here while the other core ran a browser).
settings.register_profile("untimed", deadline=None)
settings.load_profile("untimed")


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
