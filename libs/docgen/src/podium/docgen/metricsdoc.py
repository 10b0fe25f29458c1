"""The metric set of every service, read from the ``Metrics`` objects themselves.

``docs/metrics.md`` is generated from this (``podium generate``), and the
alert rules and dashboard are checked against it, so none of them can name a
metric that no service exports.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from podium.common.metrics import Metrics


@dataclass(frozen=True)
class MetricDoc:
    """One metric family as Prometheus scrapes it."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names a scrape shows for this family."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


def _families(*owners: object) -> list[MetricDoc]:
    found = []
    for owner in owners:
        for collector in vars(owner).values():
            if isinstance(collector, MetricWrapperBase):
                labels = tuple(getattr(collector, "_labelnames", ()))
            else:
                continue
            (family,) = collector.describe()
            name = family.name + ("_total" if family.type == "counter" else "")
            found.append(MetricDoc(name, family.type, labels, family.documentation))
    return found


def common_metrics() -> list[MetricDoc]:
    """Metrics of the shared runtime (every service registers them)."""
    return _families(Metrics(CollectorRegistry(), "doc"))


def service_metrics() -> dict[str, list[MetricDoc]]:
    """Each service's own metrics, by service."""
    from podium.conductor.metrics import ConductorMetrics  # noqa: PLC0415
    from podium.console.metrics import ConsoleMetrics  # noqa: PLC0415
    from podium.ingress.metrics import IngressMetrics  # noqa: PLC0415
    from podium.notifier.metrics import NotifierMetrics  # noqa: PLC0415
    from podium.worker.metrics import WorkerMetrics  # noqa: PLC0415

    return {
        "ingress": _families(IngressMetrics(CollectorRegistry())),
        "conductor": _families(ConductorMetrics(CollectorRegistry())),
        "worker": _families(WorkerMetrics(CollectorRegistry(), 1)),
        "notifier": _families(NotifierMetrics(CollectorRegistry())),
        "console": _families(ConsoleMetrics(CollectorRegistry())),
    }


def all_series() -> set[str]:
    """Every sample name any service can export."""
    docs = common_metrics() + [m for ms in service_metrics().values() for m in ms]
    return {s for m in docs for s in m.series}


HEADER = """\
# Metrics

Every service serves Prometheus metrics at `/metrics` on its health port
(`PODIUM_HEALTH_PORT`, 9090), beside `/healthz` and `/readyz`. Names start with
`podium_`; each service owns one registry, so the same family from several
replicas differs only by the scrape's `pod`/`instance` labels. Besides these, every
service exports prometheus_client's standard `process_*` families (start time, CPU
seconds, resident and virtual memory, open and maximum file descriptors) and
`python_info`, and `podium_service_info{service,agent}` says what runs there (`agent`
is `none` for the ingress and the notifier).

This file is generated from the services' `Metrics` classes by `podium generate`;
a test fails when it is out of date, and another fails when an alert rule or a
dashboard panel names a metric that is not listed here.

Where to look for the figures the operations runbook asks for:

| question | metric |
|---|---|
| events in / out, by type | `podium_events_in_total{consumer,type,outcome}`, `podium_events_out_total{type}` (ingress: `podium_ingress_accepted_total{channel,duplicate}`) |
| handler latency | `podium_handler_seconds{consumer,type}` (histogram) |
| redeliveries, dead letters | `podium_redeliveries_total{consumer}`, `podium_dead_letters_total{consumer,reason}` |
| consumer lag | `podium_consumer_pending{stream,consumer}`, `podium_consumer_ack_pending{stream,consumer}` |
| agent turns, cost, tokens | `podium_agent_turns_total{role,runtime,outcome}`, `podium_agent_cost_usd_total{role,runtime}`, `podium_agent_tokens_total{role,kind}` |
| worker slots busy | `podium_worker_slots_busy` / `podium_worker_slots` |
| notifier sends | `podium_notifier_sends_total{channel,transport,outcome}` |

Alert rules: `deploy/prometheus/alerts.yml` (docker-compose) and
`deploy/k8s/base/monitoring/prometheusrule.yaml` (Kubernetes), generated from
one definition; the Grafana dashboard is `deploy/grafana/dashboards/podium.json`.
"""  # noqa: E501


def _table(metrics: list[MetricDoc]) -> str:
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in sorted(metrics, key=lambda m: m.name):
        labels = ", ".join(f"`{label}`" for label in m.labels) or "—"
        lines.append(f"| `{m.name}` | {m.kind} | {labels} | {m.help} |")
    return "\n".join(lines)


def render() -> str:
    """``docs/metrics.md``."""
    common = common_metrics()
    bus = [m for m in common if not m.name.startswith("podium_agent_")]
    agent = [m for m in common if m.name.startswith("podium_agent_")]
    parts = [
        HEADER,
        "## Every service (the shared runtime)\n\n"
        "The consumer loop, publishing and policy. `consumer` is the durable "
        "consumer's name (`conductor-inbound-p3`, `worker-tasks`, …); "
        "`outcome` is `ok`, `retry`, `error`, `rejected` or `dead_letter`.\n\n" + _table(bus),
        "## Agents (conductor and worker)\n\n"
        "Exported by the services that run agents; `role` is `conductor` or "
        "`worker`, `runtime` is `claude` or `offline`.\n\n" + _table(agent),
    ]
    for service, metrics in service_metrics().items():
        parts.append(f"## {service}\n\n" + _table(metrics))
    return "\n\n".join(parts) + "\n"
