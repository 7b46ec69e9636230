"""``make native``: the modules every beacon goes through (ingest and aggregate), compiled
to C by mypyc from the same type-checked sources (``mypy --strict``). Python imports an
extension module before the source beside it, so once built they are what runs;
``services/__init__.py`` refuses to import a build older than any source of the package.
Measured: ~25 % less CPU per beacon (``python -m bench.lane``) and more beacons/s end to end
(``make bench``); see BENCHMARKS.md.

The shared library is ``services/_native__mypyc*.so`` (inside the package, so it is found
wherever the package is). ``make pure`` removes every built file."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each is typed strictly and used as plain functions, classes and named tuples: nothing
# subclasses them from interpreted code or patches them at run time. Left out:
# ``services/record.py``: compiled, the aggregate decoded and counted slower (fresh
# ``bench.inproc aggregate``: 81-93k against 115k events/s), for 0.4 µs a beacon at ingest.
# (Twelfth session: compiled, the class body of its msgspec struct evaluates the annotations
# where the field ``type`` shadows the builtin, so every record missed the fast path: 4.4 µs
# a record. With the struct made by ``msgspec.defstruct`` the compiled decoder is still
# slower than the interpreted one, 1.75-1.85 against 1.57 µs: compiled code reads the
# struct's fields through the generic attribute look-up.) The aggregate's counting and its
# loop over a fetch (counting.py, countrun.py) gain: 4.0 -> 2.8 µs an event counted.
MODULES = [
    "services/fastlane.py",
    "services/memo.py",
    "services/ingest/app.py",
    "services/ingest/beacon.py",
    "services/ingest/pipeline.py",
    "services/ingest/publish_types.py",
    "services/ingest/ratelimit.py",
    "services/ingest/visitor.py",
    "services/aggregate/counting.py",
    "services/aggregate/countrun.py",
]


def main() -> None:
    from mypyc.build import mypycify
    from setuptools import setup

    os.chdir(ROOT)
    for old in (ROOT / "services").rglob("*.so"):  # a module no longer listed runs its source
        old.unlink()
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
    main()
