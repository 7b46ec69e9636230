"""What the deploy/ checks share: paths, the contract's names, and the PromQL of deploy/.

``dashboard_expressions()`` is the entry point for tests that run the Grafana dashboard against
a live Prometheus: it returns every panel and variable query of the dashboard with the Grafana
variables replaced by values Prometheus accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "visitorstats.json"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "compose" / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"

# The configuration variables of the product contract (SPEC.md, "Configuration").
SPEC_ENV_VARS = frozenset(
    {
        "VISITORSTATS_HOST",
        "VISITORSTATS_PORT",
        "VISITORSTATS_KAFKA_BOOTSTRAP",
        "VISITORSTATS_KAFKA_TOPIC",
        "VISITORSTATS_CLICKHOUSE_URL",
        "VISITORSTATS_SITES",
        "VISITORSTATS_SECRET",
        "VISITORSTATS_WORKERS",
        "VISITORSTATS_TRUSTED_PROXIES",
    }
)
INGEST_PORT = 8080
AGGREGATE_PORT = 8081
INGEST_JOB = "visitorstats-ingest"
AGGREGATE_JOB = "visitorstats-aggregate"

# Series that Prometheus itself makes for every target.
PROMETHEUS_SYNTHETIC_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# What each metric type exposes, by suffix of the family name (OpenMetrics / prometheus_client).
_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}

# --- Grafana ----------------------------------------------------------------------------------

# Values for the Grafana variables the dashboard uses, fit for Prometheus's query API.
DEFAULT_GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "site": ".*",
}
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def dashboard_panels(dashboard: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (a collapsed row holds its own)."""
    for panel in (dashboard or load_dashboard()).get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def raw_dashboard_expressions(dashboard: dict[str, Any] | None = None) -> list[str]:
    """The PromQL of every panel target and query variable, Grafana variables left in."""
    dashboard = dashboard or load_dashboard()
    expressions = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query.get("query", "") if isinstance(query, dict) else query
        expressions.append(label_values_to_promql(query))
    return expressions


def label_values_to_promql(query: str) -> str:
    """Grafana's ``label_values(expr, label)`` asks for a label's values: as PromQL, the
    series of ``expr`` (or of any metric, for ``label_values(label)``)."""
    match = re.fullmatch(r"\s*label_values\((?:(.+),)?\s*(\w+)\s*\)\s*", query)
    if match is None:
        return query
    return match.group(1).strip() if match.group(1) else f'{{{match.group(2)}=~".+"}}'


def substitute_grafana_variables(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace ``$name``, ``${name}``, ``${name:format}`` and ``[[name]]``; an unknown
    variable is an error, not a silent hole in the query."""
    values = {**DEFAULT_GRAFANA_VARIABLES, **(variables or {})}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"Grafana variable ${name} has no value for Prometheus in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(value, expr)


def dashboard_expressions(variables: dict[str, str] | None = None) -> list[str]:
    """Every PromQL expression of deploy/grafana/visitorstats.json, ready for Prometheus's
    ``/api/v1/query``: Grafana variables replaced (``$__rate_interval`` by ``1m`` and
    ``$site`` by ``.*`` unless ``variables`` says otherwise)."""
    return [substitute_grafana_variables(e, variables) for e in raw_dashboard_expressions()]


# --- Prometheus rules -------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]]


def alert_expressions() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


# --- metric names in PromQL -------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    A light scanner, not a parser: strings, label matchers, ranges and grouping clauses are
    removed, then every identifier not called as a function is a metric name. Selectors by
    ``{__name__=...}`` are reported as ``__name__`` so that a check cannot overlook them.
    """
    names = set()
    if "__name__" in expr:
        names.add("__name__")
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name, called = match.group(1), match.group(2)
        if not called and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def visitorstats_metric_families() -> dict[str, str]:
    """Name -> type of every metric declared in services/metrics.py."""
    from prometheus_client.metrics import MetricWrapperBase

    import services.metrics

    families = {}
    for obj in vars(services.metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                families[family.name] = family.type
    return families


def exposed_series_names() -> frozenset[str]:
    """Every series name a visitorstats process can expose: its own metrics (imported from
    services.metrics into the default registry) and the default process/platform collectors,
    plus what Prometheus adds to each target."""
    import prometheus_client

    import services.metrics  # noqa: F401  (registers every metric of visitorstats)

    names = set(PROMETHEUS_SYNTHETIC_SERIES)
    for family in prometheus_client.REGISTRY.collect():
        for suffix in _SERIES_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return frozenset(names)
