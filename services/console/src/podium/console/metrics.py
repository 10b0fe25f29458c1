"""Console metrics (on top of the common set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from podium.common.metrics import PREFIX


class ConsoleMetrics:
    """Every metric the console owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.signins = Counter(
            f"{PREFIX}_console_signins_total",
            "Sign-in attempts, by outcome (ok, refused: a token that is not one of ours)",
            ["outcome"],
            registry=registry,
        )
        self.actions = Counter(
            f"{PREFIX}_console_actions_total",
            "Operators' actions, by action and outcome (ok, refused: no right to act, a "
            "missing CSRF token or an unknown token; failed: not done)",
            ["action", "outcome"],
            registry=registry,
        )
        self.escalated = Gauge(
            f"{PREFIX}_console_escalated_conversations",
            "Conversations waiting for an operator's answer",
            registry=registry,
        )
        self.live = Gauge(
            f"{PREFIX}_console_live_pages",
            "Pages following live changes (server-sent event streams open)",
            registry=registry,
        )
