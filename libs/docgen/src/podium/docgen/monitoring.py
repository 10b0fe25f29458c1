"""Prometheus alert rules and the Grafana dashboard, defined once, rendered for each target.

``podium generate`` writes the rules as a plain Prometheus rule file
(docker-compose) and as a ``PrometheusRule`` (Kubernetes, prometheus-operator),
and the dashboard as Grafana JSON for both. Tests parse every expression with a
PromQL parser and check that each metric it names is one a service exports
(:mod:`podium.docgen.metricsdoc`).

Scrape configurations add a ``service`` label (ingress, conductor, worker,
notifier) to every target; the rules rely on it to say which service is down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from podium.contracts.streams import PARTITIONS

SERVICES = ("ingress", "conductor", "worker", "notifier")

#: Thresholds operators are expected to tune; each alert's description names its own.
LAG_THRESHOLD = 100
ERROR_RATIO = 0.05
INGRESS_5XX_RATIO = 0.02
SPEND_USD_PER_HOUR = 20
SPEND_USD_PER_DAY = 200
AGENT_FAILURE_RATIO = 0.2

#: Where the operations runbook is served: every alert's ``runbook_url`` points into it.
#: Set it to where your team publishes docs/operations.md, then run `podium generate`.
RUNBOOK_URL = "https://podium.example.com/docs/operations.md"
#: The ``release`` label kube-prometheus-stack's default selectors look for on
#: PodMonitors and PrometheusRules (its Helm release's name): see docs/operations.md.
PROMETHEUS_RELEASE = "kube-prometheus-stack"


@dataclass(frozen=True)
class Alert:
    """One Prometheus alerting rule."""

    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    #: Labels that tell rules of one name apart (``service``), added to the alert.
    labels: tuple[tuple[str, str], ...] = ()

    def rule(self) -> dict[str, Any]:
        """The rule as Prometheus reads it."""
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_ != "0m":
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity, "team": "podium", **dict(self.labels)}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": f"{RUNBOOK_URL}#{self.name.lower()}",
        }
        return rule


def _ratio(bad: str, all_: str, by: str, window: str) -> str:
    return f"sum by ({by}) (rate({bad}[{window}]))\n  / sum by ({by}) (rate({all_}[{window}]))"


ALERTS: tuple[Alert, ...] = (
    Alert(
        "PodiumConsumerLag",
        f"max by (stream, consumer) (podium_consumer_pending) > {LAG_THRESHOLD}",
        "10m",
        "warning",
        "{{ $labels.consumer }} is {{ $value }} messages behind on {{ $labels.stream }}",
        f"More than {LAG_THRESHOLD} stored messages have waited for 10 minutes. Workers "
        "scale on this lag (KEDA); for the conductor, add replicas (they share the "
        "partitions) or look for slow agent turns.",
    ),
    Alert(
        "PodiumConsumerStalled",
        "max by (consumer) (podium_consumer_pending) > 0\n"
        "unless on (consumer) sum by (consumer) (rate(podium_events_in_total[10m])) > 0",
        "10m",
        "critical",
        "{{ $labels.consumer }} has work waiting but handles nothing",
        "Messages are pending and no replica has taken one for 10 minutes: the service is "
        "down, stuck, or has lost its pull subscription.",
    ),
    Alert(
        "PodiumDeadLetters",
        "sum by (consumer, reason) (increase(podium_dead_letters_total[10m])) > 0",
        "0m",
        "warning",
        "{{ $labels.consumer }} dead-lettered {{ $value }} messages ({{ $labels.reason }})",
        "A message could never be handled and was recorded in DEADLETTER. Inspect it "
        "(`podium replay deadletter --list`) and replay it once the cause is fixed.",
    ),
    Alert(
        "PodiumHandlerErrors",
        _ratio(
            'podium_events_in_total{outcome=~"error|dead_letter|rejected"}',
            "podium_events_in_total",
            "consumer",
            "5m",
        )
        + f" > {ERROR_RATIO}",
        "10m",
        "warning",
        "{{ $labels.consumer }}: {{ $value | humanizePercentage }} of events fail",
        f"More than {ERROR_RATIO:.0%} of handled events end in an error, a rejection or a "
        "dead letter.",
    ),
    Alert(
        "PodiumIngressErrors",
        _ratio(
            'podium_ingress_requests_total{status=~"5.."}',
            "podium_ingress_requests_total",
            "route",
            "5m",
        )
        + f" > {INGRESS_5XX_RATIO}",
        "5m",
        "critical",
        "ingress {{ $labels.route }} answers 5xx to {{ $value | humanizePercentage }}",
        "Providers retry 5xx, but a lasting rate means JetStream does not store inbound "
        "messages (see PODIUM_PUBLISH_TIMEOUT_S and the NATS cluster's health).",
    ),
    Alert(
        "PodiumAgentSpendHigh",
        f"sum(increase(podium_agent_cost_usd_total[1h])) > {SPEND_USD_PER_HOUR}",
        "0m",
        "warning",
        'Agents spent ${{ $value | printf "%.2f" }} in the last hour',
        f"Agent spend passed {SPEND_USD_PER_HOUR} USD in one hour. Check for a runaway "
        "conversation (podium_agent_turns_total by role) and PODIUM_AGENT_MAX_BUDGET_USD.",
    ),
    Alert(
        "PodiumAgentSpendDaily",
        f"sum(increase(podium_agent_cost_usd_total[24h])) > {SPEND_USD_PER_DAY}",
        "0m",
        "critical",
        'Agents spent ${{ $value | printf "%.2f" }} in the last day',
        f"Agent spend passed {SPEND_USD_PER_DAY} USD in 24 hours.",
    ),
    Alert(
        "PodiumAgentFailures",
        _ratio(
            'podium_agent_turns_total{outcome!="ok"}',
            "podium_agent_turns_total",
            "role",
            "15m",
        )
        + f" > {AGENT_FAILURE_RATIO}",
        "15m",
        "warning",
        "{{ $labels.role }} agent turns fail at {{ $value | humanizePercentage }}",
        "Timeouts, budget or turn limits, lost sessions or CLI crashes (see the outcome "
        "label of podium_agent_turns_total).",
    ),
    Alert(
        "PodiumAgentMemoryShort",
        'sum by (role) (rate(podium_agent_evictions_total{reason="memory"}[15m])) * 60 > 1',
        "15m",
        "warning",
        "{{ $labels.role }} evicts {{ $value }} warm sessions a minute for memory",
        "The agents' memory budget (PODIUM_AGENT_MEMORY_BUDGET_MB) is too small for the "
        "sessions in use: evicted sessions resume cold (a CLI start-up each), and turns may "
        "wait for room. Raise the budget with the container's memory limit, or add replicas.",
    ),
    Alert(
        "PodiumNotifierSendFailures",
        "sum by (channel, transport) "
        '(increase(podium_notifier_sends_total{outcome=~"failed|ambiguous"}[15m])) > 0',
        "0m",
        "warning",
        "{{ $labels.transport }}: {{ $value }} {{ $labels.channel }} sends failed or unsure",
        "Failed sends are final and ambiguous ones are never retried blindly (no duplicate "
        "email or SMS): look at the outbox record and the provider's logs.",
    ),
    Alert(
        "PodiumWorkerSlotsSaturated",
        "sum(podium_worker_slots_busy) / sum(podium_worker_slots) > 0.9",
        "15m",
        "info",
        "Worker slots are {{ $value | humanizePercentage }} busy",
        "Tasks queue behind busy slots; KEDA should be adding workers. If it is at its "
        "maximum, raise maxReplicaCount or PODIUM_WORKER_SLOTS.",
    ),
    Alert(
        "PodiumPartitionsUnowned",
        f"sum(podium_conductor_partitions_owned) < {PARTITIONS}",
        "2m",
        "critical",
        "Only {{ $value }} of " + str(PARTITIONS) + " conductor partitions are served",
        "Messages of the other partitions wait unanswered: a conductor died and its leases "
        "have not lapsed, a replica cannot start its partitions (its /readyz says why), or "
        "no conductor runs.",
    ),
    # NATS itself, from prometheus-nats-exporter beside each node (metric names as its
    # collector/jsz.go and healthz.go define them; "gnatsd" is its default prefix).
    Alert(
        "NatsServerUnhealthy",
        "max by (server_id) (gnatsd_healthz_status) > 0",
        "2m",
        "critical",
        "NATS server {{ $labels.server_id }} fails its health check",
        "Its /healthz is not ok: JetStream is not current on it (catching up after a "
        "restart, or cut off from the cluster). Look at the node's log and at "
        "`nats server report jetstream`.",
    ),
    Alert(
        "NatsClusterRoutesMissing",
        # Relative to the best-connected node: nats-server 2.10+ pools several routes
        # per peer, so the count is not the number of peers.
        "gnatsd_varz_routes < scalar(max(gnatsd_varz_routes))",
        "5m",
        "critical",
        "A NATS node sees {{ $value }} routes, fewer than the other nodes",
        "A node lost its routes to a peer: R3 streams run on two nodes (a second loss "
        "stops them). Check the NATS pods, their network policy and DNS.",
    ),
    Alert(
        "NatsServerDown",
        'up{service="nats"} == 0',
        "2m",
        "critical",
        "A NATS node's exporter cannot be scraped",
        "The node (or its exporter) is down: R3 streams run on the other two. A second "
        "loss stops them; see `kubectl -n podium get pods -l app.kubernetes.io/name=nats`.",
    ),
    Alert(
        "NatsJetStreamStorageHigh",
        "max by (server_name) "
        "(jetstream_server_total_message_bytes / jetstream_server_max_storage) > 0.8",
        "10m",
        "warning",
        "JetStream on {{ $labels.server_name }} is {{ $value | humanizePercentage }} full",
        "When the file store is full no stream takes new messages: the ingress answers 503. "
        "Raise max_file_store and the volume, or PODIUM_STORE_BUDGET_BYTES' shares.",
    ),
    Alert(
        "NatsConsumerLag",
        "max by (stream_name, consumer_name) "
        '(jetstream_consumer_num_pending{is_consumer_leader="true"}) > '
        f"{LAG_THRESHOLD}",
        "10m",
        "warning",
        "{{ $labels.consumer_name }} is {{ $value }} messages behind (seen by NATS)",
        "The server's own count, so it fires even when no service replica runs to report "
        "podium_consumer_pending.",
    ),
    *(
        Alert(
            "PodiumServiceDown",
            f'absent(up{{service="{service}"}} == 1)',
            "5m",
            "critical",
            f"No {service} replica is up",
            f"Prometheus has scraped no live {service} for 5 minutes.",
            labels=(("service", service),),
        )
        for service in SERVICES
    ),
)


def rule_groups() -> dict[str, Any]:
    """The rule file's content (Prometheus ``groups`` format)."""
    return {"groups": [{"name": "podium", "rules": [a.rule() for a in ALERTS]}]}


def prometheus_rule() -> dict[str, Any]:
    """The rules as a prometheus-operator ``PrometheusRule``."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "podium",
            "labels": {"app.kubernetes.io/name": "podium", "release": PROMETHEUS_RELEASE},
        },
        "spec": rule_groups(),
    }


def _yaml(data: dict[str, Any], header: str) -> str:
    import yaml  # noqa: PLC0415 - only the generator needs it

    class _Literal(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Literal.add_representer(str, _str)
    body: str = yaml.dump(data, Dumper=_Literal, sort_keys=False, width=100, allow_unicode=True)
    return header + body


GENERATED = "# Generated by `podium generate` from podium/docgen/monitoring.py: do not edit.\n"


def render_rules() -> str:
    """``deploy/prometheus/alerts.yml``."""
    return _yaml(rule_groups(), GENERATED)


def render_prometheus_rule() -> str:
    """``deploy/k8s/base/monitoring/prometheusrule.yaml``."""
    return _yaml(prometheus_rule(), GENERATED)


# --- the dashboard -------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One time-series panel: a title, queries (expr, legend) and a unit."""

    title: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "short"
    description: str = ""


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Flow",
        (
            Panel(
                "Inbound messages stored, by channel",
                (
                    (
                        "sum by (channel) (rate(podium_ingress_accepted_total"
                        '{duplicate="false"}[$__rate_interval]))',
                        "{{channel}}",
                    ),
                ),
                "reqps",
            ),
            Panel(
                "Events in, by type and outcome",
                (
                    (
                        "sum by (type, outcome) (rate(podium_events_in_total[$__rate_interval]))",
                        "{{type}} {{outcome}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Events out, by type",
                (("sum by (type) (rate(podium_events_out_total[$__rate_interval]))", "{{type}}"),),
                "ops",
            ),
            Panel(
                "Ingress requests, by route and status",
                (
                    (
                        "sum by (route, status) "
                        "(rate(podium_ingress_requests_total[$__rate_interval]))",
                        "{{route}} {{status}}",
                    ),
                ),
                "reqps",
            ),
        ),
    ),
    (
        "Consumers",
        (
            Panel(
                "Consumer lag (pending messages)",
                (("max by (consumer) (podium_consumer_pending)", "{{consumer}}"),),
            ),
            Panel(
                "Unacknowledged messages",
                (("max by (consumer) (podium_consumer_ack_pending)", "{{consumer}}"),),
            ),
            Panel(
                "Handler latency p50 / p99",
                (
                    (
                        "histogram_quantile(0.5, sum by (le, consumer) "
                        "(rate(podium_handler_seconds_bucket[$__rate_interval])))",
                        "p50 {{consumer}}",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le, consumer) "
                        "(rate(podium_handler_seconds_bucket[$__rate_interval])))",
                        "p99 {{consumer}}",
                    ),
                ),
                "s",
            ),
            Panel(
                "Redeliveries and dead letters",
                (
                    (
                        "sum by (consumer) (rate(podium_redeliveries_total[$__rate_interval]))",
                        "redelivered {{consumer}}",
                    ),
                    (
                        "sum by (consumer, reason) "
                        "(increase(podium_dead_letters_total[$__rate_interval]))",
                        "dead letter {{consumer}} {{reason}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Agents",
        (
            Panel(
                "Agent turns, by role and outcome",
                (
                    (
                        "sum by (role, outcome) (rate(podium_agent_turns_total[$__rate_interval]))",
                        "{{role}} {{outcome}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Agent spend (USD per hour)",
                (
                    (
                        "sum by (role) (increase(podium_agent_cost_usd_total[1h]))",
                        "{{role}}",
                    ),
                ),
                "currencyUSD",
            ),
            Panel(
                "Agent turn time p90, cold and warm",
                (
                    (
                        "histogram_quantile(0.9, sum by (le, role, mode) "
                        "(rate(podium_agent_turn_seconds_bucket[$__rate_interval])))",
                        "{{role}} {{mode}}",
                    ),
                ),
                "s",
            ),
            Panel(
                "Worker slots busy",
                (
                    ("sum(podium_worker_slots_busy)", "busy"),
                    ("sum(podium_worker_slots)", "slots"),
                ),
            ),
            Panel(
                "Agent memory, by role: used (measured) and budget",
                (
                    ("sum by (role) (podium_agent_memory_used_bytes)", "{{role}} used"),
                    ("sum by (role) (podium_agent_memory_budget_bytes)", "{{role}} budget"),
                ),
                "bytes",
            ),
            Panel(
                "Agent processes let go, by role and reason",
                (
                    (
                        "sum by (role, reason) "
                        "(rate(podium_agent_evictions_total[$__rate_interval]))",
                        "{{role}} {{reason}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Conductor sessions rotated",
                (
                    (
                        "sum by (reason) "
                        "(rate(podium_conductor_session_rotations_total[$__rate_interval]))",
                        "{{reason}}",
                    ),
                ),
                "ops",
            ),
        ),
    ),
    (
        "Delivery",
        (
            Panel(
                "Notifier sends, by transport and outcome",
                (
                    (
                        "sum by (transport, outcome) "
                        "(rate(podium_notifier_sends_total[$__rate_interval]))",
                        "{{transport}} {{outcome}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Duplicates not sent again (replays, redeliveries)",
                (
                    (
                        "sum by (channel) (rate(podium_notifier_duplicates_total"
                        "[$__rate_interval]))",
                        "{{channel}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Send time p95, by transport",
                (
                    (
                        "histogram_quantile(0.95, sum by (le, transport) "
                        "(rate(podium_notifier_send_seconds_bucket[$__rate_interval])))",
                        "{{transport}}",
                    ),
                ),
                "s",
            ),
            Panel(
                "Conductor escalations",
                (
                    (
                        "sum by (reason) "
                        "(increase(podium_conductor_escalations_total[$__rate_interval]))",
                        "{{reason}}",
                    ),
                ),
            ),
        ),
    ),
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (JSON model, schemaVersion 39)."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        for i, panel in enumerate(row):
            panels.append(
                {
                    "id": next_id,
                    "type": "timeseries",
                    "title": panel.title,
                    "description": panel.description,
                    "datasource": DATASOURCE,
                    "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {
                            "refId": chr(ord("A") + n),
                            "datasource": DATASOURCE,
                            "expr": expr,
                            "legendFormat": legend,
                        }
                        for n, (expr, legend) in enumerate(panel.queries)
                    ],
                }
            )
            next_id += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "podium-overview",
        "title": "Podium",
        "description": "Generated by `podium generate` (podium/docgen/monitoring.py).",
        "tags": ["podium"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render_dashboard() -> str:
    """The dashboard file."""
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions() -> list[str]:
    """Every PromQL expression in the rules and the dashboard (for tests)."""
    exprs = [a.expr for a in ALERTS]
    exprs += [expr for _, row in ROWS for panel in row for expr, _ in panel.queries]
    return exprs
