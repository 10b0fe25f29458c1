"""Notifier metrics (on top of the common set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from podium.common.metrics import LATENCY_BUCKETS, PREFIX


class NotifierMetrics:
    """Every metric the notifier owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sends = Counter(
            f"{PREFIX}_notifier_sends_total",
            "Send attempts, by channel, transport and outcome",
            ["channel", "transport", "outcome"],
            registry=registry,
        )
        self.send_seconds = Histogram(
            f"{PREFIX}_notifier_send_seconds",
            "Time of one send, by transport",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.suppressed = Counter(
            f"{PREFIX}_notifier_suppressed_total",
            "Recipients left out because they are on the suppression list",
            ["channel"],
            registry=registry,
        )
        self.reported = Counter(
            f"{PREFIX}_notifier_delivery_failures_total",
            "Delivery failures reported to the conductor, by channel and outcome",
            ["channel", "outcome"],
            registry=registry,
        )
        self.skipped = Counter(
            f"{PREFIX}_notifier_duplicates_total",
            "Commands not sent again because the outbox shows them sent",
            ["channel"],
            registry=registry,
        )
        self.statuses = Counter(
            f"{PREFIX}_notifier_delivery_statuses_total",
            "Provider status callbacks, by status and what became of them "
            "(applied, stale: an older status, unknown-command, ignored: unknown status)",
            ["status", "outcome"],
            registry=registry,
        )
        self.preferences = Counter(
            f"{PREFIX}_notifier_preferences_total",
            "Opt-outs (opted_out=true) and opt-ins applied to the suppression list",
            ["channel", "opted_out"],
            registry=registry,
        )
        self.files = Counter(
            f"{PREFIX}_notifier_files_total",
            "Artifacts in messages sent, by channel and how they went (attached: a MIME "
            "part, linked: a download link, unlinked: it needed a link and none could be "
            "made, missing: not in the artifacts store)",
            ["channel", "outcome"],
            registry=registry,
        )
        self.read_model_errors = Counter(
            f"{PREFIX}_notifier_read_model_errors_total",
            "Updates of the replies read model that failed (the outbox is unaffected)",
            registry=registry,
        )
