"""Prometheus metrics every service shares (consumers, publishes, agent turns).

Each service builds one ``Metrics`` object around its own ``CollectorRegistry``
(never the global default), so tests can run several services in one process.
Service-specific metrics live in the service's own ``metrics.py`` and take the
same registry.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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
            "Agent processes kept alive (warm sessions)",
            ["role"],
            registry=registry,
        )
        self.blocked = Counter(
            f"{PREFIX}_policy_blocked_total",
            "Actions refused by policy, by action and reason",
            ["action", "reason"],
            registry=registry,
        )


# --- Loop-local metrics ----------------------------------------------------------
#
# prometheus_client's Counter and Histogram take a lock on every update and find a
# histogram's bucket with a Python loop: on the ingress that was several per cent of
# the CPU of a webhook (docs/performance.md). Metrics updated only from the event
# loop's thread — and scraped from it too (the side port's /metrics handler) — need
# no lock. These expose exactly what prometheus_client's would: the same names,
# samples (``_total``/``_created``, ``_bucket``/``_count``/``_sum``) and labels.


Child = TypeVar("Child")


class LoopFamily(Collector, Generic[Child]):
    """A metric family whose children are updated without a lock (see above)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)

    def labels(self, *values: str) -> Child:
        """The child for these label values (created at first use).

        Not for every update: callers on a hot path keep the child they got.
        """
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _new_child(self) -> Child:
        raise NotImplementedError

    def _empty(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        """The family without samples (lets the registry check for name clashes)."""
        yield self._empty()


class LoopCounterChild:
    """One labelled counter: a float and when it was created."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class LoopCounter(LoopFamily[LoopCounterChild]):
    """A labelled counter updated from the event loop's thread only (no lock)."""

    def _new_child(self) -> LoopCounterChild:
        return LoopCounterChild()

    def _empty(self) -> CounterMetricFamily:
        # Like prometheus_client, the family is named without "_total".
        name = self.name.removesuffix("_total")
        return CounterMetricFamily(name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        """The family as prometheus_client's Counter would expose it."""
        family = self._empty()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        yield family


class LoopHistogramChild:
    """One labelled histogram: a count per bucket and the sum."""

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count one observation (a bucket's bound is inclusive, ``le``)."""
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount


class LoopHistogram(LoopFamily[LoopHistogramChild]):
    """A labelled histogram updated from the event loop's thread only (no lock)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> LoopHistogramChild:
        return LoopHistogramChild(self.bounds)

    def _empty(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        """The family as prometheus_client's Histogram would expose it."""
        family = self._empty()
        names = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(names, child.counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric(values, buckets, child.total)
            labels = dict(zip(self.labelnames, values, strict=True))
            family.samples.append(Sample(self.name + "_created", labels, child.created))
        yield family
