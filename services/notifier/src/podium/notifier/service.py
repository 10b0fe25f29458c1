"""The notifier service: the COMMANDS consumer and its transports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from podium.common import streams
from podium.common.consumer import PullConsumer
from podium.common.kv import Store
from podium.common.runtime import Context
from podium.common.state import OutboxRecord
from podium.notifier.config import NotifierSettings
from podium.notifier.handlers import Notifier
from podium.notifier.metrics import NotifierMetrics
from podium.notifier.transports import OutboxTransport, SmtpTransport, Transport

log = logging.getLogger(__name__)


class NotifierService:
    """Sends email, SMS and API replies, once per command."""

    name = "notifier"
    streams: Sequence[str] = (streams.COMMANDS.name,)

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.consumer: PullConsumer | None = None

    def transports(self) -> tuple[Transport, Transport, Transport]:
        """(email, sms, api) transports as configured."""
        s = self.settings
        outbox = OutboxTransport(Path(s.outbox_path), s.email_from, s.sms_from)
        email: Transport = SmtpTransport(s) if s.email_transport == "smtp" else outbox
        return email, outbox, outbox

    async def start(self, ctx: Context) -> None:
        """Bind the outbox bucket and start consuming commands."""
        email, sms, api = self.transports()
        log.info(
            "transports",
            extra={"email": email.name, "sms": sms.name, "outbox_path": self.settings.outbox_path},
        )
        notifier = Notifier(
            outbox=await Store.open(ctx.js, streams.OUTBOX.name, OutboxRecord),
            email=email,
            sms=sms,
            api=api,
            metrics=NotifierMetrics(ctx.registry),
        )
        self.consumer = PullConsumer(
            ctx.js,
            streams.NOTIFIER_COMMANDS,
            notifier.handle,
            service=self.name,
            metrics=ctx.metrics,
            concurrency=self.settings.concurrency,
        )
        self.consumer.start()

    async def stop(self, timeout_s: float) -> None:
        """Stop taking commands; let sends in flight finish up to ``timeout_s``."""
        if self.consumer is not None:
            await self.consumer.stop(timeout_s)

    def ready(self) -> bool:
        """Ready once consuming."""
        return self.consumer is not None
