"""Ingress metrics (on top of the common set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from podium.common.metrics import LATENCY_BUCKETS, PREFIX, LoopCounter, LoopHistogram


class IngressMetrics:
    """Every metric the ingress owns (updated from its event loop only: lock-free)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = LoopCounter(
            f"{PREFIX}_ingress_requests_total",
            "HTTP requests, by route and status",
            ["route", "status"],
            registry,
        )
        self.latency = LoopHistogram(
            f"{PREFIX}_ingress_request_seconds",
            "HTTP request latency, by route",
            ["route"],
            registry,
            buckets=LATENCY_BUCKETS,
        )
        self.accepted = LoopCounter(
            f"{PREFIX}_ingress_accepted_total",
            "Inbound messages stored, by channel and duplicate",
            ["channel", "duplicate"],
            registry,
        )
        self.refused = LoopCounter(
            f"{PREFIX}_ingress_refused_total",
            "Requests refused, by route and reason",
            ["route", "reason"],
            registry,
        )
        self.statuses = LoopCounter(
            f"{PREFIX}_ingress_delivery_statuses_total",
            "Twilio status callbacks applied to the outbox, by status",
            ["status"],
            registry,
        )
        self.ignored = LoopCounter(
            f"{PREFIX}_ingress_ignored_total",
            "Inbound messages deliberately not forwarded (auto-replies, lists, bounces…)",
            ["channel", "reason"],
            registry,
        )
