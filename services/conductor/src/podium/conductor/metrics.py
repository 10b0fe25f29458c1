"""Conductor metrics (on top of the common set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from podium.common.metrics import PREFIX


class ConductorMetrics:
    """Every metric the conductor owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.turns = Counter(
            f"{PREFIX}_conductor_turns_total",
            "Conductor turns, by trigger and outcome",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.commands = Counter(
            f"{PREFIX}_conductor_commands_total",
            "Commands carried out, by name",
            ["command"],
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_conductor_commands_rejected_total",
            "Commands rejected by the parser",
            registry=registry,
        )
        self.escalations = Counter(
            f"{PREFIX}_conductor_escalations_total",
            "Escalations to the operator, by reason",
            ["reason", "routed"],
            registry=registry,
        )
        self.spoofed = Counter(
            f"{PREFIX}_conductor_spoofed_senders_total",
            "Emails whose From: is on the sender allowlist but did not authenticate "
            "(SPF/DKIM not aligned and passing), treated as unknown senders",
            registry=registry,
        )
        self.duplicates = Counter(
            f"{PREFIX}_conductor_duplicates_total",
            "Events already handled (redelivered or replayed), skipped without a turn",
            registry=registry,
        )
        self.rotations = Counter(
            f"{PREFIX}_conductor_session_rotations_total",
            "Conversations' agent sessions rotated (a new one seeded with the platform's "
            "summary), by what passed its bound: turns or input_tokens",
            ["reason"],
            registry=registry,
        )
        self.active_turns = Gauge(
            f"{PREFIX}_conductor_active_turns",
            "Agent turns running now",
            registry=registry,
        )
        self.partitions_owned = Gauge(
            f"{PREFIX}_conductor_partitions_owned",
            "Conductor partitions this replica holds and consumes (all replicas: 16)",
            registry=registry,
        )
