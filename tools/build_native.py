"""``make native``: the modules every beacon goes through, compiled to C by mypyc from the same
type-checked sources (``mypy --strict``). Python imports an extension module before the source
beside it, so once built they are what runs; ``services/__init__.py`` refuses to start with
one older than its source. Measured: ~20 % less CPU per beacon (``python -m bench.lane``) and
~8 % more beacons/s end to end (``make bench``); see BENCHMARKS.md.

The shared library is ``services/_native__mypyc*.so`` (inside the package, so it is found
wherever the package is). ``make pure`` removes every built file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each is typed strictly and used as plain functions, classes and named tuples: nothing
# subclasses them from interpreted code or patches them at run time. (``services.memo`` is
# left out: its tests look into the closures of the functions it wraps.)
MODULES = [
    "services/fastlane.py",
    "services/record.py",
    "services/ingest/app.py",
    "services/ingest/beacon.py",
    "services/ingest/pipeline.py",
    "services/ingest/visitor.py",
]


def main() -> None:
    from mypyc.build import mypycify
    from setuptools import setup

    os.chdir(ROOT)
    setup(
        name="visitorstats-native",
        ext_modules=mypycify(MODULES, group_name="services._native", target_dir="build/mypyc"),
        script_args=["-q", "build_ext", "--inplace", "--build-temp", "build/mypyc/temp"],
    )
    # build_ext copies an unchanged extension with its old time stamp: every one is marked
    # as built now, from the sources as they are (services/__init__.py compares the times)
    for built in (ROOT / "services").rglob("*.so"):
        os.utime(built)


if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:  # for the Makefile
        print(" ".join(MODULES))
    else:
        main()
