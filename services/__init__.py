"""visitorstats: the ingest and aggregate services behind a portal's visitor counter."""

from __future__ import annotations

from pathlib import Path


def stale_native(package: Path) -> list[str]:
    """The extension modules under ``package`` (``make native``, tools/build_native.py) built
    before the newest source of the package changed: Python would import them instead of their
    sources as they now are, and they were compiled against the other modules as they were."""
    built = list(package.rglob("*.so"))
    if not built:
        return []
    newest = max(package.rglob("*.py"), key=lambda p: p.stat().st_mtime)
    changed = newest.stat().st_mtime
    return [
        f"{so.relative_to(package.parent)} is older than {newest.relative_to(package.parent)}"
        for so in built
        if so.stat().st_mtime < changed
    ]


_stale = stale_native(Path(__file__).parent)
if _stale:
    raise ImportError(
        "compiled modules are out of date (" + "; ".join(_stale) + "): "
        "run `make native` to build them again, or `make pure` to run the sources"
    )
