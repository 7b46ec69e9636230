from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tansu import Tansu


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[Tansu]:
    broker = Tansu(log_path=tmp_path / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.stop()
