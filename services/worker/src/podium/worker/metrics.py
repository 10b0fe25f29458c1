"""Worker metrics (on top of the common set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from podium.common.metrics import PREFIX


class WorkerMetrics:
    """Every metric the worker owns."""

    def __init__(self, registry: CollectorRegistry, slots: int) -> None:
        self.slots = Gauge(
            f"{PREFIX}_worker_slots",
            "Task slots of this worker",
            registry=registry,
        )
        self.slots.set(slots)
        self.busy = Gauge(
            f"{PREFIX}_worker_slots_busy",
            "Task slots running an agent now",
            registry=registry,
        )
        self.tasks = Counter(
            f"{PREFIX}_worker_task_turns_total",
            "Task turns finished, by kind and status",
            ["kind", "status"],
            registry=registry,
        )
        self.kills = Counter(
            f"{PREFIX}_worker_kills_total",
            "Tasks killed, by reason",
            ["reason"],
            registry=registry,
        )
        self.sandboxed = Gauge(
            f"{PREFIX}_worker_sandboxed",
            "1 when this worker's agents run in its sandbox, 0 when they do not",
            registry=registry,
        )
        self.egress = Counter(
            f"{PREFIX}_worker_egress_total",
            "Connections out of the agents' sandboxes: to the model API (api) or a tunnel "
            "(connect), allowed, refused or failed",
            ["kind", "outcome"],
            registry=registry,
        )
