"""The version of visitorstats that runs: the installed package's (``pyproject.toml``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("visitorstats")
except PackageNotFoundError:  # a source tree run without installing it
    VERSION = "unknown"
