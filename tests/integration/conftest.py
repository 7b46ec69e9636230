from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.aggregate.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An embedded ClickHouse (chDB) store in a fresh directory, migrated."""
    s = Store(f"chdb://{tmp_path}/clickhouse")
    await s.migrate()
    try:
        yield s
    finally:
        s.close()
