"""Ingress metrics (on top of the common set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from podium.common.metrics import LATENCY_BUCKETS, PREFIX


class IngressMetrics:
    """Every metric the ingress owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            f"{PREFIX}_ingress_requests_total",
            "HTTP requests, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_ingress_request_seconds",
            "HTTP request latency, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.accepted = Counter(
            f"{PREFIX}_ingress_accepted_total",
            "Inbound messages stored, by channel and duplicate",
            ["channel", "duplicate"],
            registry=registry,
        )
        self.refused = Counter(
            f"{PREFIX}_ingress_refused_total",
            "Requests refused, by route and reason",
            ["route", "reason"],
            registry=registry,
        )
        self.statuses = Counter(
            f"{PREFIX}_ingress_delivery_statuses_total",
            "Twilio status callbacks stored for the notifier, by status",
            ["status"],
            registry=registry,
        )
        self.ignored = Counter(
            f"{PREFIX}_ingress_ignored_total",
            "Inbound messages deliberately not forwarded (auto-replies, lists, bounces…)",
            ["channel", "reason"],
            registry=registry,
        )
        self.files = Counter(
            f"{PREFIX}_ingress_file_links_total",
            "Download-link requests (GET /v1/files/…), by outcome: served, or why refused "
            "(invalid, expired, missing, disabled, unavailable)",
            ["outcome"],
            registry=registry,
        )
        self.file_bytes = Counter(
            f"{PREFIX}_ingress_file_link_bytes_total",
            "Bytes of artifacts served through download links",
            registry=registry,
        )
        self.sender_auth = Counter(
            f"{PREFIX}_ingress_email_sender_auth_total",
            "Inbound emails by how their From: authenticated (SPF/DKIM aligned): pass, fail, "
            "none (no verdicts posted)",
            ["result"],
            registry=registry,
        )
        self.mms_media = Counter(
            f"{PREFIX}_ingress_mms_media_total",
            "MMS media items, by outcome: stored, or why kept as a URL only (not-configured, "
            "host, type, too-large, too-many, failed, store-full)",
            ["outcome"],
            registry=registry,
        )
