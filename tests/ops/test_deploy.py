"""deploy/ as an operator receives it: Prometheus rules that promtool accepts and whose unit
tests pass, a Grafana dashboard and alerts that name only metrics visitorstats exposes, and
compose and Kubernetes files that use the contract's variables, ports and probes.

No container runs here: these check the files, promtool checks the PromQL.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.http import READY_CHECK_SECONDS

from .deploy_checks import (
    AGGREGATE_JOB,
    AGGREGATE_PORT,
    ALERT_RULES,
    ALERT_TESTS,
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    INGEST_JOB,
    INGEST_PORT,
    KUBERNETES,
    PROMETHEUS_CONFIG,
    SPEC_ENV_VARS,
    alert_expressions,
    alert_rules,
    dashboard_expressions,
    dashboard_panels,
    exposed_series_names,
    load_dashboard,
    load_yaml,
    metric_names,
    raw_dashboard_expressions,
    substitute_grafana_variables,
    visitorstats_metric_families,
)

pytestmark = pytest.mark.ops

SITE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: `make system-deps` installs Debian's prometheus")
    return promtool


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{shlex.join(result.args)}\n{result.stdout}{result.stderr}"


# --- the metric-name scanner the checks below rely on -----------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job=~"a|b"} == 0', {"up"}),
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="rate(b)"}[5m]))) > 2',
            {"a_bucket"},
        ),
        ("sum(rate(a_total[1m])) / sum(rate(b_total[1m])) > 0.05", {"a_total", "b_total"}),
        ("a > 0 and on (instance) deriv(b[5m]) > 0 unless c offset 5m", {"a", "b", "c"}),
        ("deriv(sum(max by (partition) (lag))[10m:1m]) > 1e3", {"lag"}),
        ("count(x) without (pid) or vector(0)", {"x"}),
        ("a * on (i) group_left (site) b", {"a", "b"}),
        ('{__name__="sneaky"}', {"__name__"}),
    ],
)
def test_metric_names_scanner(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- Prometheus -------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    _assert_ok(_run(_promtool(), "check", "rules", str(ALERT_RULES)))


def test_promtool_test_rules() -> None:
    _assert_ok(_run(_promtool(), "test", "rules", str(ALERT_TESTS)))


def test_promtool_check_config() -> None:
    """The scrape configuration, and through its rule_files the rules, load in Prometheus."""
    _assert_ok(_run(_promtool(), "check", "config", str(PROMETHEUS_CONFIG)))


def test_scrape_config_jobs_and_ports() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [Path(f).name for f in config["rule_files"]] == [ALERT_RULES.name]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    compose = load_yaml(COMPOSE)["services"]
    for job_name, service, port in [
        (INGEST_JOB, "ingest", INGEST_PORT),
        (AGGREGATE_JOB, "aggregate", AGGREGATE_PORT),
    ]:
        job = jobs[job_name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [service], f"{job_name} must discover the compose service {service}"
        assert sd["port"] == port
        assert service in compose


def test_every_alert_has_for_severity_and_summary() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{rule['alert']}: for"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alerts_cover_the_issue() -> None:
    """The conditions an operator must hear about, each by the metric it watches."""
    watched = {rule["alert"]: metric_names(rule["expr"]) for rule in alert_rules()}
    every_metric = set().union(*watched.values())
    for metric in [
        "visitorstats_snapshot_stale",
        "visitorstats_snapshot_refreshed_timestamp_seconds",
        "visitorstats_consumer_lag",
        "visitorstats_freshness_seconds_bucket",
        "visitorstats_ingest_requests_total",
        "visitorstats_spool_bytes",
        "visitorstats_spool_oldest_seconds",
        "visitorstats_clickhouse_errors_total",
        "up",
    ]:
        assert metric in every_metric, f"no alert watches {metric}"


def test_alert_unit_tests_cover_every_alert_firing_and_not_firing() -> None:
    tests = load_yaml(ALERT_TESTS)
    assert [Path(f).name for f in tests["rule_files"]] == [ALERT_RULES.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fired == set(), "alerts without a test where they fire"
    assert alerts - silent == set(), "alerts without a test where they must not fire"
    assert (fired | silent) - alerts == set(), "tests of alerts that do not exist"


def test_alert_expressions_name_only_exposed_metrics() -> None:
    exposed = exposed_series_names()
    for expr in alert_expressions():
        unknown = metric_names(expr) - exposed
        assert not unknown, f"{sorted(unknown)} in alert {expr!r} is exposed by no process"


# --- Grafana ----------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "visitorstats"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(dashboard_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r}: target without expr"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_expressions()))
    for metric in [
        "visitorstats_beacons_accepted_total",
        "visitorstats_beacons_dropped_total",
        "visitorstats_ingest_requests_total",
        "visitorstats_publish_latency_seconds_bucket",
        "visitorstats_spool_depth",
        "visitorstats_events_consumed_total",
        "visitorstats_consumer_lag",
        "visitorstats_clickhouse_write_seconds_bucket",
        "visitorstats_clickhouse_errors_total",
        "visitorstats_commit_seconds_bucket",
        "visitorstats_freshness_seconds_bucket",
        "visitorstats_online",
        "visitorstats_stream_subscribers",
        "visitorstats_snapshot_stale",
    ]:
        assert metric in used, f"no dashboard panel shows {metric}"


def test_dashboard_expressions_name_only_exposed_metrics() -> None:
    exposed = exposed_series_names()
    for expr in dashboard_expressions():
        unknown = metric_names(expr) - exposed
        assert not unknown, (
            f"{sorted(unknown)} in dashboard query {expr!r} is exposed by no process"
        )


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, expr in enumerate(expressions)
                ],
            }
        ]
    }
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    _assert_ok(_run(_promtool(), "check", "rules", str(rules_file)))


def test_grafana_variables_are_all_substituted() -> None:
    for expr in dashboard_expressions():
        assert "$" not in expr and "[[" not in expr, expr
    assert any("$__rate_interval" in e for e in raw_dashboard_expressions())
    assert substitute_grafana_variables("x[$__rate_interval]", {"__rate_interval": "5s"}) == "x[5s]"
    with pytest.raises(KeyError):
        substitute_grafana_variables("x{a=~'$nobody'}")


def test_grafana_provisioning_finds_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml(provisioning / "dashboards" / "visitorstats.yml")["providers"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts[provisioning] == "/etc/grafana/provisioning"
    assert Path(mounts[DASHBOARD]).parent == Path(provider["options"]["path"])


# --- compose ----------------------------------------------------------------------------------


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[Path, str]:
    """Bind mounts of a compose service: host path (resolved) -> container path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[(COMPOSE.parent / source).resolve()] = target
    return mounts


def _our_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services.items()
        if "build" in service or str(service.get("image", "")).startswith("visitorstats")
    }


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)  # type: ignore[no-any-return]


def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {name: str(service.get("image", "")) for name, service in services.items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert "controller" in _env(services["kafka"])["KAFKA_PROCESS_ROLES"], "KRaft mode"
    assert not any("zookeeper" in image for image in images.values())
    assert images["clickhouse"].startswith("clickhouse/clickhouse-server:")
    assert images["prometheus"].startswith("prom/prometheus:")
    assert images["grafana"].startswith("grafana/grafana:")
    ours = _our_services(services)
    commands = {name: service["command"] for name, service in ours.items()}
    assert commands == {"migrate": ["migrate"], "ingest": ["ingest"], "aggregate": ["aggregate"]}
    assert services["ingest"]["deploy"]["replicas"] == 2
    assert services["aggregate"]["deploy"]["replicas"] == 2
    assert _mounts(services["prometheus"])[PROMETHEUS_CONFIG.parent] == "/etc/prometheus"


def test_compose_services_use_the_contract_variables(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in _our_services(services).items():
        env = _env(service)
        unknown = set(env) - SPEC_ENV_VARS
        assert not unknown, f"{name} sets variables the contract does not know: {unknown}"
        assert env["VISITORSTATS_CLICKHOUSE_URL"].startswith("http://"), name
        sites = env["VISITORSTATS_SITES"]
        assert sites in _mounts(service).values(), f"{name}: {sites} is not mounted"
    ingest, aggregate = _env(services["ingest"]), _env(services["aggregate"])
    for env, port in [(ingest, INGEST_PORT), (aggregate, AGGREGATE_PORT)]:
        assert env["VISITORSTATS_PORT"] == str(port)
        assert env["VISITORSTATS_HOST"] == "0.0.0.0"
        assert env["VISITORSTATS_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert ingest["VISITORSTATS_WORKERS"].isdigit()
    assert ingest["VISITORSTATS_TRUSTED_PROXIES"]
    # The hashing key comes from the operator's environment (.env), never from this file.
    assert re.fullmatch(r"\$\{VISITORSTATS_SECRET:\?[^}]+\}", ingest["VISITORSTATS_SECRET"])


def test_compose_ports_and_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, port in [("ingest", INGEST_PORT), ("aggregate", AGGREGATE_PORT)]:
        service = services[name]
        assert [str(p) for p in service["expose"]] == [str(port)]
        test = service["healthcheck"]["test"]
        command = test if isinstance(test, str) else " ".join(test)
        assert f"127.0.0.1:{port}/healthz" in command, f"{name} healthcheck: {command}"
    proxies = _env(services["ingest"])["VISITORSTATS_TRUSTED_PROXIES"]
    lb_address = services["lb"]["networks"]["default"]["ipv4_address"]
    assert proxies == f"{lb_address}/32", "ingest trusts exactly the load balancer"
    nginx = (COMPOSE.parent / "nginx.conf").read_text(encoding="utf-8")
    assert f"http://ingest:{INGEST_PORT}" in nginx
    assert f"http://aggregate:{AGGREGATE_PORT}" in nginx


def test_compose_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = condition["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", dependency
            else:
                assert condition == "service_started", f"{name} -> {dependency}: {condition}"
    assert services["migrate"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    aggregate = services["aggregate"]["depends_on"]
    assert aggregate["migrate"]["condition"] == "service_completed_successfully"
    assert services["ingest"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source in _mounts(service):
            assert source.exists(), f"{name} mounts missing {source}"
    build = compose["services"]["ingest"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_dockerfile() -> None:
    instructions: list[tuple[str, str]] = []
    for line in DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    stages = [instructions[i][1] for i in starts]
    assert stages == ["python:3.11-slim AS native", "python:3.11-slim"]
    native, image = instructions[starts[0] : starts[1]], instructions[starts[1] :]
    # the first stage compiles the hot path as `make native` does; the image takes the result
    assert ("COPY", "tools/build_native.py ./tools/") in native
    assert any(k == "RUN" and "python tools/build_native.py" in v for k, v in native)
    assert ("COPY", "--from=native /native /native") in image
    (install,) = [v for k, v in image if k == "RUN" and "pip install ." in v]
    assert "-exec touch" in install  # newer than the sources, or `import services` refuses them
    assert 'm.__file__.endswith(".so")' in install  # the build fails if they do not load
    (entrypoint,) = [json.loads(v) for k, v in image if k == "ENTRYPOINT"]
    assert entrypoint == ["visitorstats"]
    (exposed,) = [v.split() for k, v in image if k == "EXPOSE"]
    assert exposed == [str(INGEST_PORT), str(AGGREGATE_PORT)]
    assert any(k == "USER" and v != "root" for k, v in image), "runs as root"
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    assert "!tools/build_native.py" in ignored.splitlines()  # in the build context
    assert "**/*.so" in ignored.splitlines()  # a local build never reaches the image


def _check_sites_toml(text: str) -> None:
    sites = tomllib.loads(text)["sites"]
    assert sites
    for site_id, site in sites.items():
        assert SITE_ID.fullmatch(site_id), site_id
        zoneinfo.ZoneInfo(site["timezone"])
        assert isinstance(site.get("origins", []), list)
        assert site["online_window_seconds"] > 0


def test_compose_sites_toml() -> None:
    _check_sites_toml((COMPOSE.parent / "sites.toml").read_text(encoding="utf-8"))


# --- Kubernetes -------------------------------------------------------------------------------


def _manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                yield path, doc


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, doc in _manifests():
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def _deployment(k8s: dict[str, list[dict[str, Any]]], command: str) -> dict[str, Any]:
    (deployment,) = [
        d
        for d in k8s["Deployment"]
        if d["spec"]["template"]["spec"]["containers"][0]["args"][0] == command
    ]
    return deployment


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_every_manifest_parses_and_is_applied(k8s: dict[str, list[dict[str, Any]]]) -> None:
    for path, doc in _manifests():
        assert doc["apiVersion"] and doc["kind"], path
        assert doc["metadata"]["name"], path
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    # The Secret is created by the operator (secret.example.yaml says how), never applied
    # with placeholder values.
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}
    assert kustomization["namespace"] == "visitorstats"
    for kind in [
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Job",
    ]:
        assert kind in k8s, f"no {kind} in deploy/kubernetes"


@pytest.mark.parametrize(
    ("command", "port"), [("ingest", INGEST_PORT), ("aggregate", AGGREGATE_PORT)]
)
def test_deployment_probes_ports_and_resources(
    k8s: dict[str, list[dict[str, Any]]], command: str, port: int
) -> None:
    deployment = _deployment(k8s, command)
    assert deployment["apiVersion"] == "apps/v1"
    pod = deployment["spec"]["template"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [port]

    def probe_port(probe: dict[str, Any]) -> int:
        target = probe["httpGet"]["port"]
        return ports[target] if isinstance(target, str) else int(target)

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probe_port(container["livenessProbe"]) == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probe_port(container["readinessProbe"]) == port
    # /readyz answers (503, naming a check that hangs) before the probe gives up
    assert container["readinessProbe"]["timeoutSeconds"] > READY_CHECK_SECONDS
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert env["VISITORSTATS_PORT"]["value"] == str(port)
    assert env["VISITORSTATS_HOST"]["value"] == "0.0.0.0"
    assert "VISITORSTATS_KAFKA_BOOTSTRAP" in env
    annotations = pod["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(port)


def test_kubernetes_env_names_and_references(k8s: dict[str, list[dict[str, Any]]]) -> None:
    secrets = {s["metadata"]["name"]: s["stringData"] for s in k8s["Secret"]}
    config_maps = {c["metadata"]["name"]: c["data"] for c in k8s["ConfigMap"]}
    for secret in secrets.values():
        assert set(secret) <= SPEC_ENV_VARS
    workloads = k8s["Deployment"] + k8s["Job"]
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            unknown = set(env) - SPEC_ENV_VARS
            assert not unknown, f"{name} sets variables the contract does not know: {unknown}"
            assert "envFrom" not in container, f"{name}: name each variable"
            for variable, entry in env.items():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], f"{name}: {variable}"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            sites = Path(env["VISITORSTATS_SITES"]["value"])
            volume = volumes[mounts[str(sites.parent)]]
            assert sites.name in config_maps[volume["configMap"]["name"]], name
    ingest_env = {
        e["name"]
        for e in _deployment(k8s, "ingest")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert {"VISITORSTATS_SECRET", "VISITORSTATS_TRUSTED_PROXIES"} <= ingest_env
    aggregate_env = {
        e["name"]
        for e in _deployment(k8s, "aggregate")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "VISITORSTATS_CLICKHOUSE_URL" in aggregate_env
    assert "http://" in secrets["visitorstats"]["VISITORSTATS_CLICKHOUSE_URL"]


def test_kubernetes_sites_toml(k8s: dict[str, list[dict[str, Any]]]) -> None:
    (config_map,) = k8s["ConfigMap"]
    _check_sites_toml(config_map["data"]["sites.toml"])


def test_services_select_their_deployment(k8s: dict[str, list[dict[str, Any]]]) -> None:
    deployments = k8s["Deployment"]
    assert len(k8s["Service"]) == len(deployments)
    for service in k8s["Service"]:
        selected = [
            d
            for d in deployments
            if _selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        container = selected[0]["spec"]["template"]["spec"]["containers"][0]
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (target in names) if isinstance(target, str) else target in names.values()


def test_a_disruption_budget_per_deployment(k8s: dict[str, list[dict[str, Any]]]) -> None:
    budgets = k8s["PodDisruptionBudget"]
    for deployment in k8s["Deployment"]:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selecting = [b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(selecting) == 1, deployment["metadata"]["name"]
        (budget,) = selecting
        assert budget["apiVersion"] == "policy/v1"
        assert ("minAvailable" in budget["spec"]) != ("maxUnavailable" in budget["spec"])
    for budget in budgets:
        selected = [
            d
            for d in k8s["Deployment"]
            if _selects(
                budget["spec"]["selector"]["matchLabels"],
                d["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert len(selected) == 1, f"{budget['metadata']['name']} spans several Deployments"


def test_ingest_autoscales_on_cpu(k8s: dict[str, list[dict[str, Any]]]) -> None:
    (hpa,) = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ingest = _deployment(k8s, "ingest")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        ingest["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    requests = ingest["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert "cpu" in requests, "CPU utilization is measured against the request"


def test_migrate_job_creates_the_cluster_schema(k8s: dict[str, list[dict[str, Any]]]) -> None:
    (job,) = k8s["Job"]
    assert job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}
    (container,) = pod["containers"]
    assert container.get("command", []) + container["args"] == [
        "migrate",
        "--cluster",
        "visitorstats",
    ]


def test_metric_families_are_declared() -> None:
    """The module the checks read metric names from declares the metrics this deploy/ uses."""
    families = visitorstats_metric_families()
    assert families["visitorstats_freshness_seconds"] == "histogram"
    assert families["visitorstats_ingest_requests"] == "counter"
    assert families["visitorstats_consumer_lag"] == "gauge"
