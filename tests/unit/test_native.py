"""The compiled hot path (``make native``, tools/build_native.py): what the tests and the
product run, and never a build older than the sources."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import services
from services import stale_native

BUILD = Path(__file__).resolve().parents[2] / "tools" / "build_native.py"


def test_the_beacons_hot_path_runs_compiled() -> None:
    spec = importlib.util.spec_from_file_location("build_native", BUILD)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for path in build.MODULES:
        name = path.removesuffix(".py").replace("/", ".")
        module = importlib.import_module(name)
        assert module.__file__ is not None and module.__file__.endswith(".so"), (
            f"{name} runs from its source: `make native` builds it (make test does)"
        )


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "services"
    (package / "ingest").mkdir(parents=True)
    shutil.copy(Path(services.__file__), package / "__init__.py")
    (package / "ingest" / "__init__.py").write_text("")
    (package / "ingest" / "app.py").write_text("VALUE = 1\n")
    (package / "sites.py").write_text("")
    (package / "ingest" / "app.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a library")
    return package


def test_a_build_is_stale_once_any_source_of_the_package_is_newer(tmp_path: Path) -> None:
    package = _package(tmp_path)
    built = package / "ingest" / "app.cpython-311-x86_64-linux-gnu.so"
    for source in package.rglob("*.py"):
        os.utime(source, (1_000, 1_000))
    os.utime(built, (2_000, 2_000))
    assert stale_native(package) == []
    os.utime(package / "sites.py", (3_000, 3_000))  # not compiled, but compiled against
    assert stale_native(package) == [
        "services/ingest/app.cpython-311-x86_64-linux-gnu.so is older than services/sites.py"
    ]
    built.unlink()
    assert stale_native(package) == []  # the sources alone (make pure)


def test_a_stale_build_stops_the_import_with_what_to_do(tmp_path: Path) -> None:
    package = _package(tmp_path)
    os.utime(package / "ingest" / "app.cpython-311-x86_64-linux-gnu.so", (1_000, 1_000))
    run = subprocess.run(
        [sys.executable, "-c", "import services.ingest.app"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "ImportError: compiled modules are out of date" in run.stderr
    assert "run `make native`" in run.stderr
