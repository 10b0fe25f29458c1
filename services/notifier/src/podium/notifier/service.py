"""The notifier service: the COMMANDS and DELIVERY consumers and the transports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.object_store import ObjectStore

from podium.common.consumer import PullConsumer
from podium.common.kv import Store
from podium.common.runtime import Context
from podium.contracts import streams
from podium.contracts.events import AnyEvent, DeliveryStatus, RecipientPreference
from podium.contracts.state import (
    ConversationReplies,
    OutboxRecord,
    Suppression,
    suppression_key,
)
from podium.notifier.config import NotifierSettings
from podium.notifier.files import Files, Linker
from podium.notifier.handlers import Notifier
from podium.notifier.metrics import NotifierMetrics
from podium.notifier.transports import (
    OutboxTransport,
    SendGridTransport,
    SmtpTransport,
    Transport,
    TwilioTransport,
)

log = logging.getLogger(__name__)


def fact_key(event: AnyEvent) -> str | None:
    """Order key of a provider fact: the recipient it is about, or the command."""
    if isinstance(event, RecipientPreference):
        return suppression_key(event.channel, event.address)
    if isinstance(event, DeliveryStatus):
        return event.command_id
    return None


async def open_artifacts(js: JetStreamContext) -> ObjectStore | None:
    """The ``artifacts`` object store, or None (with a warning) where it is not
    provisioned yet: email with files then waits for it; nothing else needs it."""
    try:
        return await js.object_store(streams.ARTIFACTS)
    except BucketNotFoundError:
        log.warning(
            "the artifacts object store does not exist yet (run `podium provision`): "
            "email with files is retried until it does",
            extra={"object_store": streams.ARTIFACTS},
        )
        return None


class NotifierService:
    """Sends email, SMS and API replies, once per command."""

    name = "notifier"
    streams: Sequence[str] = (streams.COMMANDS.name, streams.DELIVERY.name)

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.consumer: PullConsumer | None = None
        #: Facts from providers (status callbacks, opt-outs), applied to what it owns.
        self.facts: PullConsumer | None = None
        self._transports: tuple[Transport, ...] = ()

    def transports(self) -> tuple[Transport, Transport, Transport]:
        """(email, sms, api) transports as configured."""
        s = self.settings
        outbox = OutboxTransport(Path(s.outbox_path), s.email_from, s.sms_from, s.email_reply_to)
        email: Transport = outbox
        if s.email_transport == "smtp":
            email = SmtpTransport(s)
        elif s.email_transport == "sendgrid":
            email = SendGridTransport(s)
        sms: Transport = TwilioTransport(s) if s.sms_transport == "twilio" else outbox
        return email, sms, outbox

    async def check(self) -> None:
        """Nothing to check before connecting: transports connect when they send."""

    def linker(self) -> Linker:
        """Download links as configured (says why none can be made)."""
        s = self.settings
        return Linker(s.public_url, s.link_secret, s.link_ttl_s)

    async def start(self, ctx: Context) -> None:
        """Bind the outbox and suppression buckets and the artifacts store, and start
        consuming commands."""
        ctx.metrics.info.labels(self.name, "none").set(1)
        email, sms, api = self._transports = self.transports()
        log.info(
            "transports",
            extra={"email": email.name, "sms": sms.name, "outbox_path": self.settings.outbox_path},
        )
        linker = self.linker()
        if linker.problem:
            log.warning(
                "download links cannot be made: set PODIUM_PUBLIC_URL and PODIUM_LINK_SECRET "
                "(the ingress's values); until then a message's text says which files it "
                "could not link",
                extra={"problem": linker.problem},
            )
        files = Files(
            ctx.js,
            await open_artifacts(ctx.js),
            linker,
            email_max_bytes=self.settings.email_attachments_max_bytes,
        )
        notifier = Notifier(
            js=ctx.js,
            outbox=await Store.open(ctx.js, streams.OUTBOX.name, OutboxRecord),
            suppressions=await Store.open(ctx.js, streams.SUPPRESSIONS.name, Suppression),
            replies=await Store.open(ctx.js, streams.REPLIES.name, ConversationReplies),
            email=email,
            sms=sms,
            api=api,
            files=files,
            metrics=NotifierMetrics(ctx.registry),
            max_deliver=streams.NOTIFIER_COMMANDS.max_deliver,
            sms_max_chars=self.settings.sms_max_chars,
            retry_base_s=self.settings.retry_base_s,
            retry_max_s=self.settings.retry_max_s,
        )
        self.consumer = PullConsumer(
            ctx.nc,
            ctx.js,
            streams.NOTIFIER_COMMANDS,
            notifier.handle,
            service=self.name,
            metrics=ctx.metrics,
            concurrency=self.settings.concurrency,
            spawn=ctx.spawn,
        )
        self.facts = PullConsumer(
            ctx.nc,
            ctx.js,
            streams.NOTIFIER_DELIVERY,
            notifier.handle_fact,
            service=self.name,
            metrics=ctx.metrics,
            concurrency=self.settings.concurrency,
            # One recipient's STOP and START, one command's statuses: in the order they
            # came, a retry holding its place (the facts' times settle the rest).
            order_key=fact_key,
            retry_in_place=True,
            spawn=ctx.spawn,
        )
        self.consumer.start()
        self.facts.start()

    async def stop(self, timeout_s: float) -> None:
        """Stop taking commands; let sends in flight finish up to ``timeout_s``."""
        # Both at once, so the shutdown takes ``timeout_s`` at most, not twice that.
        await asyncio.gather(
            *(c.stop(timeout_s) for c in (self.consumer, self.facts) if c is not None)
        )
        for transport in set(self._transports):
            await transport.close()

    def readiness(self) -> tuple[bool, str]:
        """Ready while consuming commands and facts."""
        if self.consumer is None or self.facts is None:
            return False, "starting"
        for consumer in (self.consumer, self.facts):
            if consumer.problem:
                return False, consumer.problem
        email, sms, _ = self._transports
        return True, f"email via {email.name}, SMS via {sms.name}"
