"""Prometheus metrics every service shares (consumers, publishes, agent turns).

Each service builds one ``Metrics`` object around its own ``CollectorRegistry``
(never the global default), so tests can run several services in one process.
Service-specific metrics live in the service's own ``metrics.py`` and take the
same registry.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

PREFIX = "podium"

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)


class Metrics:
    """The metrics common to every Podium service."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        # The process itself (start time, CPU, RSS, open fds) and the Python it runs:
        # prometheus_client's standard collectors, on this service's own registry.
        self.process = ProcessCollector(registry=registry)
        self.platform = PlatformCollector(registry=registry)
        self.info = Gauge(
            f"{PREFIX}_service_info",
            "Constant 1, labelled with the service and agent runtime",
            ["service", "agent"],
            registry=registry,
        )
        self.events_in = Counter(
            f"{PREFIX}_events_in_total",
            "Events taken from a consumer, by type and outcome",
            ["consumer", "type", "outcome"],
            registry=registry,
        )
        self.events_out = Counter(
            f"{PREFIX}_events_out_total",
            "Events published, by type",
            ["type"],
            registry=registry,
        )
        self.handle_seconds = Histogram(
            f"{PREFIX}_handler_seconds",
            "Time to handle one event, by consumer and type",
            ["consumer", "type"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.redeliveries = Counter(
            f"{PREFIX}_redeliveries_total",
            "Events received again after an earlier delivery",
            ["consumer"],
            registry=registry,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters_total",
            "Events terminated and recorded as dead letters",
            ["consumer", "reason"],
            registry=registry,
        )
        self.consumer_pending = Gauge(
            f"{PREFIX}_consumer_pending",
            "Messages stored but not yet delivered to a consumer (its lag), polled from "
            "JetStream by the replicas running it",
            ["stream", "consumer"],
            registry=registry,
        )
        self.consumer_ack_pending = Gauge(
            f"{PREFIX}_consumer_ack_pending",
            "Messages delivered to a consumer and not yet acknowledged",
            ["stream", "consumer"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight",
            "Events being handled now",
            ["consumer"],
            registry=registry,
        )
        self.agent_turns = Counter(
            f"{PREFIX}_agent_turns_total",
            "Agent calls, by role, runtime and outcome",
            ["role", "runtime", "outcome"],
            registry=registry,
        )
        self.agent_seconds = Histogram(
            f"{PREFIX}_agent_turn_seconds",
            "Wall-clock time of one agent call, cold (process started) or warm",
            ["role", "runtime", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.agent_cost = Counter(
            f"{PREFIX}_agent_cost_usd_total",
            "Agent spend reported by the runtime, in USD",
            ["role", "runtime"],
            registry=registry,
        )
        self.agent_tokens = Counter(
            f"{PREFIX}_agent_tokens_total",
            "Tokens reported by the agent runtime, by kind (input, output, cache_read…)",
            ["role", "kind"],
            registry=registry,
        )
        self.agent_sessions = Counter(
            f"{PREFIX}_agent_session_events_total",
            "Session events: restored, not_stored, lost, busy, lease_wait",
            ["role", "event"],
            registry=registry,
        )
        self.agent_live = Gauge(
            f"{PREFIX}_agent_live_processes",
            "Agent processes kept alive (warm sessions and spares)",
            ["role"],
            registry=registry,
        )
        self.agent_memory_budget = Gauge(
            f"{PREFIX}_agent_memory_budget_bytes",
            "Memory the service's agent processes may take (PODIUM_AGENT_MEMORY_BUDGET_MB; "
            "0 = no budget)",
            ["role"],
            registry=registry,
        )
        self.agent_memory_used = Gauge(
            f"{PREFIX}_agent_memory_used_bytes",
            "Resident memory of the agent processes' trees, measured, by state (busy: "
            "answering a turn, idle: a warm session waiting, spare: started ahead)",
            ["role", "state"],
            registry=registry,
        )
        self.agent_processes = Gauge(
            f"{PREFIX}_agent_processes",
            "Agent processes alive now, by state (busy, idle, spare)",
            ["role", "state"],
            registry=registry,
        )
        self.agent_evictions = Counter(
            f"{PREFIX}_agent_evictions_total",
            "Live agent processes let go to make room, by reason: memory (the budget), "
            "pool_full (PODIUM_AGENT_POOL_SIZE), idle (PODIUM_AGENT_IDLE_TIMEOUT_S), spare "
            "(a spare dropped for the budget)",
            ["role", "reason"],
            registry=registry,
        )
        self.blocked = Counter(
            f"{PREFIX}_policy_blocked_total",
            "Actions refused by policy, by action and reason",
            ["action", "reason"],
            registry=registry,
        )
