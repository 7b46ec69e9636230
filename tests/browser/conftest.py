from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.portal import ARTIFACTS, Browsers, Portal
from tests.support.procs import Service, write_sites


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A fresh ``visitorstats run`` (standalone: embedded chDB, no broker) for each test."""
    workdir = tmp_path / "service"
    workdir.mkdir()
    write_sites(workdir)
    svc = Service("run", workdir).start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def portal(service: Service) -> Iterator[Portal]:
    """The test portal (another origin than the service) and a proxy in front of the service."""
    p = Portal(service.url).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[Browsers]:
    b = Browsers(tmp_path / "chromium")
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
