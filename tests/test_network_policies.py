"""The rendered NetworkPolicies admit every flow the platform needs, and nothing else.

A small evaluator of Kubernetes NetworkPolicy semantics (networking.k8s.io/v1) runs
each overlay's policies against the pods its workloads render: a flow is allowed when
the source's egress and the destination's ingress both allow it, where a pod that no
policy of a direction selects is not isolated in that direction. Peers outside the
namespace (DNS, Prometheus, KEDA, an ingress controller, the internet) are modelled
as the pods and addresses a cluster has.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.test_deploy import OVERLAYS, kustomize

NAMESPACE = "podium"


@dataclass(frozen=True)
class Pod:
    """A pod (or an address outside the cluster when ``namespace`` is empty)."""

    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    #: Container ports by name, for named ports in policies.
    ports: dict[str, int] = field(default_factory=dict)
    ip: str = "10.1.0.1"
    #: Labels of its namespace besides ``kubernetes.io/metadata.name``.
    namespace_labels: dict[str, str] = field(default_factory=dict)


def _labels_match(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector selects ``labels`` (an empty selector selects all)."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace_labels(namespace: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**(extra or {}), "kubernetes.io/metadata.name": namespace}


def _peer_matches(peer: dict[str, Any], other: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if not other.ip:
            return False
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(e) for e in block.get("except") or [])
    if not other.namespace:
        return False  # pod and namespace selectors never match outside addresses
    if "namespaceSelector" in peer:
        if not _labels_match(
            peer["namespaceSelector"], _namespace_labels(other.namespace, other.namespace_labels)
        ):
            return False
    elif other.namespace != policy_namespace:
        return False
    return _labels_match(peer.get("podSelector"), other.labels)


def _port_matches(rule_ports: list[dict[str, Any]] | None, port: int, proto: str, dst: Pod) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != proto:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = dst.ports.get(wanted)
            if wanted is None:
                continue
        end = entry.get("endPort", wanted)
        if wanted <= port <= end:
            return True
    return False


def _policy_types(spec: dict[str, Any]) -> list[str]:
    """``policyTypes``, or the API's default: Ingress, and Egress if it has egress rules."""
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


def _allowed(
    policies: list[dict[str, Any]], pod: Pod, direction: str, other: Pod, port: int, proto: str
) -> bool:
    """Whether ``pod``'s policies allow the flow in ``direction`` (Ingress or Egress)."""
    if not pod.namespace or pod.namespace != NAMESPACE:
        return True  # not governed by these policies
    selecting = [
        p
        for p in policies
        if _labels_match(p["spec"].get("podSelector"), pod.labels)
        and direction in _policy_types(p["spec"])
    ]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    dst = pod if direction == "Ingress" else other
    for policy in selecting:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(peer, other, NAMESPACE) for peer in peers):
                continue
            if _port_matches(rule.get("ports"), port, proto, dst):
                return True
    return False


def flow(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int, proto: str = "TCP") -> bool:
    """Whether ``src`` may open a connection to ``dst`` on ``port``."""
    return _allowed(policies, src, "Egress", dst, port, proto) and _allowed(
        policies, dst, "Ingress", src, port, proto
    )


def pods_of(objs: list[dict[str, Any]]) -> dict[str, Pod]:
    """One pod per workload, with its template's labels and container ports."""
    pods = {}
    for n, obj in enumerate(objs):
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        template = obj["spec"]["template"]
        ports = {
            p["name"]: p["containerPort"]
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
            if "name" in p
        }
        pods[obj["metadata"]["name"]] = Pod(
            obj["metadata"]["name"],
            NAMESPACE,
            dict(template["metadata"].get("labels") or {}),
            ports,
            ip=f"10.1.0.{n + 2}",
        )
    return pods


DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, ip="10.96.0.10")
PROMETHEUS = Pod(
    "prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, ip="10.2.0.5"
)
KEDA = Pod("keda-operator", "keda", {"app": "keda-operator"}, ip="10.3.0.7")
INGRESS_CONTROLLER = Pod("ingress-nginx", "ingress-nginx", {"app": "ingress-nginx"}, ip="10.4.0.9")
INTERNET = Pod("api.anthropic.com", "", ip="160.79.104.10")
STRANGER = Pod("other-app", "default", {"app": "other"}, ip="10.5.0.3")
#: An internal ingress controller in a namespace the operators labelled for the console.
OPERATORS_PROXY = Pod(
    "internal-nginx", "operators", {"app": "internal-nginx"}, ip="10.6.0.4",
    namespace_labels={"podium.dev/console-access": "true"},
)  # fmt: skip

SERVICES = ("ingress", "conductor", "worker", "notifier", "console")


@pytest.fixture(scope="module", params=OVERLAYS)
def cluster(request: pytest.FixtureRequest) -> tuple[list[dict[str, Any]], dict[str, Pod]]:
    objs = kustomize(request.param)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert any(p["metadata"]["name"] == "default-deny" for p in policies)
    return policies, pods_of(objs)


def test_every_flow_the_platform_needs_is_admitted(
    cluster: tuple[list[dict[str, Any]], dict[str, Pod]],
) -> None:
    policies, pods = cluster
    nats = pods["nats"]
    needed: list[tuple[Pod, Pod, int, str]] = []
    for name in (*SERVICES, "podium-provision"):
        needed += [
            (pods[name], nats, 4222, "TCP"),
            (pods[name], DNS, 53, "UDP"),
            (pods[name], DNS, 53, "TCP"),
        ]
    needed += [(nats, nats, 6222, "TCP"), (nats, DNS, 53, "UDP")]
    needed += [(PROMETHEUS, pods[name], 9090, "TCP") for name in SERVICES]
    needed += [
        (KEDA, nats, 8222, "TCP"),
        (PROMETHEUS, nats, 8222, "TCP"),
        (PROMETHEUS, nats, 7777, "TCP"),
        (INGRESS_CONTROLLER, pods["ingress"], 8080, "TCP"),
        (INTERNET, pods["ingress"], 8080, "TCP"),
        (pods["conductor"], INTERNET, 443, "TCP"),
        (pods["worker"], INTERNET, 443, "TCP"),
        (pods["notifier"], INTERNET, 443, "TCP"),
        (pods["notifier"], INTERNET, 587, "TCP"),
        # MMS media from Twilio.
        (pods["ingress"], INTERNET, 443, "TCP"),
        # Operators reach the console through their internal ingress controller.
        (OPERATORS_PROXY, pods["console"], 8090, "TCP"),
    ]
    refused = [
        f"{src.name} -> {dst.name}:{port}/{proto}"
        for src, dst, port, proto in needed
        if not flow(policies, src, dst, port, proto)
    ]
    assert refused == []


def test_flows_the_platform_does_not_need_are_refused(
    cluster: tuple[list[dict[str, Any]], dict[str, Pod]],
) -> None:
    policies, pods = cluster
    nats = pods["nats"]
    unneeded = [
        (pods["worker"], pods["ingress"], 8080),
        (pods["worker"], pods["notifier"], 9090),
        (pods["conductor"], pods["worker"], 9090),
        (pods["notifier"], nats, 8222),
        (pods["worker"], nats, 7777),
        (KEDA, nats, 7777),
        (pods["worker"], nats, 6222),
        (pods["ingress"], INTERNET, 80),
        (pods["ingress"], pods["worker"], 9090),
        (pods["conductor"], INTERNET, 22),
        (pods["ingress"], INTERNET, 22),
        (pods["worker"], INTERNET, 25),
        # The worker: NATS and HTTPS (the model API) only; no ssh, no other port out.
        (pods["worker"], INTERNET, 22),
        (pods["worker"], INTERNET, 80),
        (pods["worker"], STRANGER, 443),
        (pods["conductor"], pods["conductor"], 9090),
        (INTERNET, nats, 4222),
        (STRANGER, nats, 4222),
        (STRANGER, pods["worker"], 9090),
        (INGRESS_CONTROLLER, pods["ingress"], 9090),
        (pods["podium-provision"], INTERNET, 443),
        # The console: never from the public side, and it reaches nothing but NATS.
        (INTERNET, pods["console"], 8090),
        (INGRESS_CONTROLLER, pods["console"], 8090),
        (STRANGER, pods["console"], 8090),
        (pods["ingress"], pods["console"], 8090),
        (pods["console"], INTERNET, 443),
        (pods["console"], pods["conductor"], 9090),
        (pods["console"], nats, 8222),
    ]
    admitted = [
        f"{src.name} -> {dst.name}:{port}"
        for src, dst, port in unneeded
        if flow(policies, src, dst, port)
    ]
    assert admitted == []


def test_the_evaluator_follows_the_api_semantics() -> None:
    web = Pod("web", NAMESPACE, {"app": "web"}, {"http": 8080})
    db = Pod("db", NAMESPACE, {"app": "db"})
    deny_all = {"spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
    # Not isolated: everything flows.
    assert flow([], web, db, 5432)
    # Isolated both ways: nothing flows.
    assert not flow([deny_all], web, db, 5432)
    allow_db = {
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
        }
    }
    allow_web_out = {
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 5432}]}],
        }
    }
    assert not flow([deny_all, allow_db], web, db, 5432)  # web's egress is still denied
    assert flow([deny_all, allow_db, allow_web_out], web, db, 5432)
    assert not flow([deny_all, allow_db, allow_web_out], web, db, 5433)
    assert not flow([deny_all, allow_db, allow_web_out], db, web, 5432)
    # A named port is the destination's.
    named = {
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": "http"}]}],
        }
    }
    assert flow([named], db, web, 8080)
    assert not flow([named], db, web, 8081)
    # A namespace selector alone admits every pod of those namespaces.
    from_monitoring = {
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": _namespace_labels("monitoring")}}]}
            ],
        }
    }
    assert flow([from_monitoring], PROMETHEUS, web, 1)
    assert not flow([from_monitoring], STRANGER, web, 1)
