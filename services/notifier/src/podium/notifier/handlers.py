"""Send each command exactly once, through the transport its channel is set to.

The outbox record (``outbox`` bucket, keyed by command id) moves
``pending`` → ``sending`` → ``sent`` (with the provider's id), or ``retry``
(nothing left: try again), ``failed`` (refused for good, or the recipient is
suppressed), ``ambiguous`` (it may have left; never retried blindly). A
redelivered command finds ``sent`` and is only acknowledged; one that finds
``sending`` was interrupted mid-send by a crash, and is recorded as ambiguous
rather than risk a duplicate.

A long SMS goes out in parts; the record keeps each part's provider id as it
is sent, so a retry after a transient failure resumes with the next part
instead of sending the first ones again.

Whatever ends a command without sending it (a permanent refusal, a suppressed
recipient, an ambiguous outcome, retries exhausted) is reported to the
conductor as a :class:`DeliveryFailed` event on RESULTS, then the command is
terminated and dead-lettered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
from nats.js import JetStreamContext

from podium.common import subjects
from podium.common.backoff import backoff
from podium.common.bus import publish
from podium.common.consumer import Delivery
from podium.common.errors import Conflict, Reject, Retry
from podium.common.events import (
    AnyEvent,
    ApiReply,
    DeliveryFailed,
    DeliveryOutcome,
    SendEmail,
    SendSms,
    event_type,
    utcnow,
)
from podium.common.ids import stable_id
from podium.common.kv import Store
from podium.common.state import OutboxRecord, OutboxState, Suppression, suppression_key
from podium.notifier.metrics import NotifierMetrics
from podium.notifier.transports import (
    PermanentSendError,
    TransientSendError,
    Transport,
    split_sms,
)

log = logging.getLogger(__name__)

Command = SendEmail | SendSms | ApiReply


class Notifier:
    """Handles COMMANDS events."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        outbox: Store[OutboxRecord],
        suppressions: Store[Suppression],
        email: Transport,
        sms: Transport,
        api: Transport,
        metrics: NotifierMetrics,
        max_deliver: int,
        sms_max_chars: int = 1600,
        retry_base_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self.js = js
        self.outbox = outbox
        self.suppressions = suppressions
        self.transports: dict[str, Transport] = {"email": email, "sms": sms, "api": api}
        self.metrics = metrics
        self.max_deliver = max_deliver
        self.sms_max_chars = sms_max_chars
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s

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

    async def send(self, channel: str, command: Command, delivery: Delivery) -> None:
        """Send ``command`` unless the outbox shows it was already sent (or may have been)."""
        transport = self.transports[channel]
        key = command.command_id
        claimed = await self._claim(channel, command, transport)
        if claimed is None:
            return
        # Someone may have opted out since the command was written (or since the last try).
        command = await self._without_suppressed(channel, command)
        # Each write knows the revision the last one left (no read before it).
        known = await self._set(key, "sending", attempts=claimed[0].attempts, known=claimed)
        record = known[0]
        parts = _parts(command, self.sms_max_chars)
        started = time.perf_counter()
        try:
            for index in range(len(record.provider_ids), len(parts)):
                provider_id = await transport.send(parts[index])
                # The provider took it: from here on the record must say so. Its update
                # is retried until it is stored, never taken for an unknown send (a
                # NATS leader election must not turn a sent reply into "ambiguous").
                # The last part's update also marks the command sent.
                known = await self._until_stored(
                    key,
                    functools.partial(
                        self._progress,
                        key,
                        provider_id,
                        known=known,
                        last=index == len(parts) - 1,
                    ),
                )
        except TransientSendError as err:
            self.metrics.sends.labels(channel, transport.name, "retry").inc()
            if delivery.num_delivered >= self.max_deliver:
                await self._set(key, "failed", error=f"gave up: {err}", outcome="exhausted")
                await self._report(command, "exhausted", str(err), transport=transport.name)
                raise Reject(f"gave up after {delivery.num_delivered} attempts: {err}") from err
            await self._set(key, "retry", error=str(err))
            delay = max(err.retry_after_s, self._backoff(delivery.num_delivered))
            raise Retry(f"transient send failure: {err}", delay_s=delay) from err
        except PermanentSendError as err:
            self.metrics.sends.labels(channel, transport.name, "failed").inc()
            outcome: DeliveryOutcome = "suppressed" if err.opted_out else "rejected"
            await self._set(key, "failed", error=str(err), outcome=outcome)
            for address in err.suppress:
                await self._suppress(channel, address, err.why or "rejected", command)
            await self._report(command, outcome, str(err), code=err.code, transport=transport.name)
            raise Reject(f"send refused for good: {err}") from err
        except (Retry, Reject, Conflict):
            raise
        except Exception as err:
            self.metrics.sends.labels(channel, transport.name, "ambiguous").inc()
            await self._set(key, "ambiguous", error=repr(err), outcome="ambiguous")
            await self._report(command, "ambiguous", repr(err), transport=transport.name)
            raise Reject(
                f"send outcome unknown (not retried to avoid a duplicate): {err!r}"
            ) from err
        finally:
            self.metrics.send_seconds.labels(transport.name).observe(time.perf_counter() - started)
        self.metrics.sends.labels(channel, transport.name, "sent").inc()
        if known[0].state != "sent":
            # Every part had been recorded before (a resumed send): only the state is left.
            await self._until_stored(key, functools.partial(self._set, key, "sent", error=""))
        log.info(
            "sent",
            extra={
                "channel": channel,
                "transport": transport.name,
                "command_id": key,
                "parts": len(parts),
            },
        )

    # --- the outbox record ----------------------------------------------------

    async def _until_stored(
        self, key: str, write: Callable[[], Awaitable[tuple[OutboxRecord, int]]]
    ) -> tuple[OutboxRecord, int]:
        """Store what the provider already accepted: try until the bucket takes it.

        The message stays held meanwhile (the consumer heartbeats it). A shutdown that
        interrupts this leaves the record ``sending`` with the parts recorded so far: the
        next delivery knows only those (see ``_claim``), so a part the provider took but
        whose record never got stored is then reported ``ambiguous``, never sent again.
        """
        tries = 0
        while True:
            try:
                return await write()
            except Reject:
                raise
            except Exception as err:  # noqa: BLE001 - a bus failure: the send itself is done
                tries += 1
                delay = backoff(tries, base=0.2, cap=5.0)
                log.warning(
                    "outbox record not stored after the send; trying again",
                    extra={"command_id": key, "error": repr(err), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)

    async def _claim(
        self, channel: str, command: Command, transport: Transport
    ) -> tuple[OutboxRecord, int] | None:
        """The record to send under and its revision: a new ``pending`` one, or one left
        to retry; None when the command was sent already.

        Raises ``Reject`` (after reporting) when the command failed earlier or
        was interrupted mid-send.
        """
        key = command.command_id
        found = await self.outbox.get(key)
        if found is None:
            record = OutboxRecord(
                command_id=key,
                state="pending",
                transport=transport.name,
                attempts=0,
                channel=channel,
                conversation_id=command.conversation_id,
                correlation_id=command.correlation_id,
                to=_recipients(command),
            )
            try:
                return record, await self.outbox.create(key, record)
            except Conflict as err:
                raise Retry("outbox record created concurrently", delay_s=0.5) from err
        record = found[0]
        if record.state == "sent":
            self.metrics.skipped.labels(channel).inc()
            log.info("already sent; not sending again", extra={"command_id": key})
            return None
        parts = len(_parts(command, self.sms_max_chars))
        if record.state == "sending" and len(record.provider_ids) >= parts:
            # Every part was accepted and recorded; only the final state was not stored.
            await self._until_stored(key, functools.partial(self._set, key, "sent", error=""))
            self.metrics.skipped.labels(channel).inc()
            log.info("sent before; its record now says so", extra={"command_id": key})
            return None
        if record.state in ("sending", "ambiguous"):
            if record.state == "sending":
                await self._set(key, "ambiguous", error=record.error or "interrupted mid-send")
            if not record.reported:
                await self._report(
                    command,
                    "ambiguous",
                    record.error or "interrupted mid-send",
                    transport=transport.name,
                )
            raise Reject(
                f"command {key} may already have been sent (interrupted mid-send); "
                "not sending again"
            )
        if record.state == "failed":
            if not record.reported:
                # The report of an earlier delivery did not get out: send it now.
                outcome: DeliveryOutcome = _OUTCOMES.get(record.outcome, "rejected")
                await self._report(command, outcome, record.error, transport=transport.name)
            raise Reject(f"command {key} failed for good earlier: {record.error}")
        # pending or retry: parts already sent stay sent, the loop resumes after them.
        return found

    async def _set(
        self,
        key: str,
        state: OutboxState,
        *,
        error: str | None = None,
        attempts: int | None = None,
        outcome: str = "",
        known: tuple[OutboxRecord, int] | None = None,
    ) -> tuple[OutboxRecord, int]:
        """Move the record to ``state`` (compare-and-set, keeping fields others wrote,
        like a status callback's delivery status). ``known``: the record and revision the
        caller's last write left, so that no read comes first."""

        def change(current: OutboxRecord | None) -> OutboxRecord | None:
            if current is None:
                return None
            current.state = state
            if error is not None:
                current.error = error[:1000]
            if outcome:
                current.outcome = outcome
            if state == "sending":
                current.attempts = (attempts or 0) + 1
            if current.provider_ids and not current.provider_id:
                current.provider_id = current.provider_ids[0]
            current.updated_at = utcnow()
            return current

        return await self._mutate(key, change, known)

    async def _progress(
        self,
        key: str,
        provider_id: str,
        *,
        known: tuple[OutboxRecord, int] | None = None,
        last: bool = False,
    ) -> tuple[OutboxRecord, int]:
        """Record one part as sent (before the next part goes); the last marks it sent."""

        def change(current: OutboxRecord | None) -> OutboxRecord | None:
            if current is None:
                return None
            # Idempotent: a write whose acknowledgement was lost (and is tried again) may
            # have been stored already.
            if provider_id not in current.provider_ids:
                current.provider_ids = [*current.provider_ids, provider_id]
            current.provider_id = current.provider_ids[0]
            if last:
                current.state = "sent"
                current.error = ""
            current.updated_at = utcnow()
            return current

        return await self._mutate(key, change, known)

    async def _mutate(
        self,
        key: str,
        change: Callable[[OutboxRecord | None], OutboxRecord | None],
        known: tuple[OutboxRecord, int] | None = None,
    ) -> tuple[OutboxRecord, int]:
        for _ in range(20):
            found, known = known or await self.outbox.get(key), None
            if found is None:
                raise Reject(f"outbox record {key} vanished")
            new = change(msgspec.structs.replace(found[0]))
            if new is None:
                return found
            try:
                return new, await self.outbox.update(key, new, found[1])
            except Conflict:
                continue
        raise Retry(f"outbox record {key} keeps changing", delay_s=0.5)

    # --- suppression list -----------------------------------------------------

    async def _without_suppressed(self, channel: str, command: Command) -> Command:
        """``command`` without suppressed recipients; fails it when none is left."""
        if isinstance(command, ApiReply):
            return command
        recipients = _recipients(command)
        blocked = [a for a in recipients if await self._is_suppressed(channel, a)]
        if not blocked:
            return command
        self.metrics.suppressed.labels(channel).inc(len(blocked))
        log.info(
            "suppressed recipients left out",
            extra={"command_id": command.command_id, "count": len(blocked)},
        )
        left = [a for a in recipients if a not in blocked]
        if isinstance(command, SendEmail) and left:
            return msgspec.structs.replace(command, to=left)
        await self._set(
            command.command_id,
            "failed",
            error="recipient suppressed (opted out)",
            outcome="suppressed",
        )
        await self._report(
            command, "suppressed", "the recipient is on the suppression list (opted out)"
        )
        raise Reject(f"command {command.command_id}: every recipient is suppressed")

    async def _is_suppressed(self, channel: str, address: str) -> bool:
        found = await self.suppressions.get(suppression_key(channel, address))
        return found is not None and found[0].suppressed

    async def _suppress(self, channel: str, address: str, why: str, command: Command) -> None:
        if channel not in ("email", "sms"):
            return

        def change(current: Suppression | None) -> Suppression | None:
            if current is not None and current.suppressed:
                return None
            return Suppression(
                channel="sms" if channel == "sms" else "email",
                address=address,
                suppressed=True,
                reason=why,
                source_id=command.command_id,
                seen=current.seen if current else [],
            )

        await self.suppressions.mutate(suppression_key(channel, address), change)
        log.warning("recipient suppressed", extra={"channel": channel, "reason": why})

    # --- telling the conductor ------------------------------------------------

    async def _report(
        self,
        command: Command,
        outcome: DeliveryOutcome,
        reason: str,
        *,
        code: str = "",
        transport: str = "",
    ) -> None:
        """Publish a DeliveryFailed for ``command`` (stable id: said once), then note it.

        A failure to publish raises ``Retry``: the record stays failed or
        ambiguous, and the redelivered command reports again.
        """
        channel: Literal["email", "sms", "api"] = "api"
        if isinstance(command, SendEmail):
            channel = "email"
        elif isinstance(command, SendSms):
            channel = "sms"
        event_id = stable_id("delivery", command.command_id, outcome)
        report = DeliveryFailed(
            event_id=event_id,
            correlation_id=command.correlation_id,
            conversation_id=command.conversation_id,
            command_id=command.command_id,
            channel=channel,
            to=_recipients(command),
            outcome=outcome,
            reason=reason[:1000],
            provider_code=code,
            transport=transport,
        )
        try:
            await publish(
                self.js,
                subjects.delivery_report(command.conversation_id, command.command_id),
                report,
            )
        except Exception as err:
            log.warning("could not report delivery failure", extra={"error": repr(err)})
            raise Retry("could not report the delivery failure yet", delay_s=5.0) from err
        self.metrics.reported.labels(channel, outcome).inc()

        def change(current: OutboxRecord | None) -> OutboxRecord | None:
            if current is None or current.reported:
                return None
            current.reported = True
            current.outcome = outcome
            return current

        await self._mutate(command.command_id, change)

    def _backoff(self, deliveries: int) -> float:
        return backoff(deliveries, base=self.retry_base_s, cap=self.retry_max_s)


_OUTCOMES: dict[str, DeliveryOutcome] = {
    "rejected": "rejected",
    "suppressed": "suppressed",
    "ambiguous": "ambiguous",
    "exhausted": "exhausted",
}


def _recipients(command: Command) -> list[str]:
    match command:
        case SendEmail():
            return list(command.to)
        case SendSms():
            return [command.to]
        case ApiReply():
            return [command.client]


def _parts(command: Command, limit: int) -> list[Command]:
    if isinstance(command, SendSms):
        texts = split_sms(command.body, limit)
        if len(texts) > 1:
            return [msgspec.structs.replace(command, body=text) for text in texts]
    return [command]
