"""Send each command exactly once, through the transport its channel is set to.

The outbox record (``outbox`` bucket, keyed by command id) moves
``sending`` → ``sent`` (with the provider's id), or ``retry`` (nothing left:
try again), ``failed`` (refused for good), ``ambiguous`` (it may have left;
never retried blindly). A redelivered command finds ``sent`` and is only
acknowledged; one that finds ``sending`` was interrupted mid-send by a crash,
and is recorded as ambiguous rather than risk a duplicate.
"""

from __future__ import annotations

import logging
import time

from podium.common.consumer import Delivery
from podium.common.errors import Conflict, Reject, Retry
from podium.common.events import AnyEvent, ApiReply, SendEmail, SendSms, event_type, utcnow
from podium.common.kv import Store
from podium.common.state import OutboxRecord
from podium.notifier.metrics import NotifierMetrics
from podium.notifier.transports import PermanentSendError, TransientSendError, Transport

log = logging.getLogger(__name__)


class Notifier:
    """Handles COMMANDS events."""

    def __init__(
        self,
        *,
        outbox: Store[OutboxRecord],
        email: Transport,
        sms: Transport,
        api: Transport,
        metrics: NotifierMetrics,
    ) -> None:
        self.outbox = outbox
        self.transports: dict[str, Transport] = {"email": email, "sms": sms, "api": api}
        self.metrics = metrics

    async def handle(self, event: AnyEvent, delivery: Delivery) -> None:
        """Entry point for the COMMANDS consumer."""
        match event:
            case SendEmail():
                await self.send("email", event, delivery)
            case SendSms():
                await self.send("sms", event, delivery)
            case ApiReply():
                await self.send("api", event, delivery)
            case _:
                raise Reject(f"the notifier does not handle {event_type(event)} events")

    async def send(
        self, channel: str, command: SendEmail | SendSms | ApiReply, delivery: Delivery
    ) -> None:
        """Send ``command`` unless the outbox shows it was already sent (or may have been)."""
        transport = self.transports[channel]
        key = command.command_id
        found = await self.outbox.get(key)
        if found is not None:
            record, revision = found
            if record.state == "sent":
                self.metrics.skipped.labels(channel).inc()
                log.info("already sent; not sending again", extra={"command_id": key})
                return
            if record.state in ("sending", "ambiguous"):
                await self._mark(key, record, revision, "ambiguous", record.error or "interrupted")
                raise Reject(
                    f"command {key} may already have been sent (interrupted mid-send); "
                    "not sending again"
                )
            if record.state == "failed":
                raise Reject(f"command {key} failed for good earlier: {record.error}")
            record.state, record.attempts = "sending", record.attempts + 1
            record.updated_at = utcnow()
            try:
                revision = await self.outbox.update(key, record, revision)
            except Conflict as err:
                raise Retry("outbox record changed concurrently", delay_s=0.5) from err
        else:
            record = OutboxRecord(command_id=key, state="sending", transport=transport.name)
            try:
                revision = await self.outbox.create(key, record)
            except Conflict as err:
                raise Retry("outbox record created concurrently", delay_s=0.5) from err
        started = time.perf_counter()
        try:
            provider_id = await transport.send(command)
        except TransientSendError as err:
            self.metrics.sends.labels(channel, transport.name, "retry").inc()
            await self._mark(key, record, revision, "retry", str(err))
            raise Retry(f"transient send failure: {err}", delay_s=5.0) from err
        except PermanentSendError as err:
            self.metrics.sends.labels(channel, transport.name, "failed").inc()
            await self._mark(key, record, revision, "failed", str(err))
            raise Reject(f"send refused for good: {err}") from err
        except Exception as err:
            self.metrics.sends.labels(channel, transport.name, "ambiguous").inc()
            await self._mark(key, record, revision, "ambiguous", repr(err))
            raise Reject(
                f"send outcome unknown (not retried to avoid a duplicate): {err!r}"
            ) from err
        finally:
            self.metrics.send_seconds.labels(transport.name).observe(time.perf_counter() - started)
        self.metrics.sends.labels(channel, transport.name, "sent").inc()
        record.provider_id = provider_id
        await self._mark(key, record, revision, "sent", "")
        log.info(
            "sent",
            extra={"channel": channel, "transport": transport.name, "command_id": key},
        )

    async def _mark(
        self, key: str, record: OutboxRecord, revision: int, state: str, error: str
    ) -> None:
        record.state = state  # type: ignore[assignment]
        record.error = error[:1000]
        record.updated_at = utcnow()
        try:
            await self.outbox.update(key, record, revision)
        except Conflict:
            log.warning("outbox record moved while sending", extra={"command_id": key})
