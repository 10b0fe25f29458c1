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

A command's files (``attachments``) are fetched and linked before the record
says ``sending`` (see ``podium.notifier.files``): a fetch that fails, or a
crash during one, leaves nothing sent and the command free to go again.

Whatever ends a command without sending it (a permanent refusal, a suppressed
recipient, an ambiguous outcome, retries exhausted) is reported to the
conductor as a :class:`DeliveryFailed` event on RESULTS, then the command is
terminated and dead-lettered.

The notifier is the only writer of the outbox, the suppression list and the
``replies`` read model, and the only publisher of ``DeliveryFailed``. What
providers say afterwards (status callbacks, STOP and START) the ingress stores
as facts on DELIVERY (:class:`DeliveryStatus`, :class:`RecipientPreference`);
the notifier applies them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, NoReturn

import msgspec
from nats.js import JetStreamContext

from podium.common.backoff import backoff
from podium.common.bus import publish
from podium.common.consumer import Delivery
from podium.common.errors import Conflict, Reject, Retry
from podium.common.kv import Store
from podium.contracts import subjects
from podium.contracts.events import (
    AnyEvent,
    ApiReply,
    DeliveryFailed,
    DeliveryOutcome,
    DeliveryStatus,
    RecipientPreference,
    SendEmail,
    SendSms,
    event_type,
    utcnow,
)
from podium.contracts.ids import stable_id
from podium.contracts.state import (
    DELIVERY_FAILED,
    DELIVERY_RANK,
    MAX_OUTBOUND,
    ConversationReplies,
    OutboxRecord,
    OutboxState,
    ReplyView,
    Suppression,
    delivery_of,
    suppression_key,
)
from podium.notifier.files import Files
from podium.notifier.metrics import NotifierMetrics
from podium.notifier.transports import (
    Command,
    OutgoingFile,
    PermanentSendError,
    TransientSendError,
    Transport,
    split_sms,
)

log = logging.getLogger(__name__)


class Notifier:
    """Handles COMMANDS events."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        outbox: Store[OutboxRecord],
        suppressions: Store[Suppression],
        replies: Store[ConversationReplies],
        email: Transport,
        sms: Transport,
        api: Transport,
        files: Files,
        metrics: NotifierMetrics,
        max_deliver: int,
        sms_max_chars: int = 1600,
        retry_base_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self.js = js
        self.outbox = outbox
        self.suppressions = suppressions
        self.replies = replies
        self.transports: dict[str, Transport] = {"email": email, "sms": sms, "api": api}
        self.files = files
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

    async def handle_fact(self, event: AnyEvent, delivery: Delivery) -> None:
        """Entry point for the DELIVERY consumer: what providers reported, as stored."""
        match event:
            case DeliveryStatus():
                await self.status(event)
            case RecipientPreference():
                await self.preference(event)
            case _:
                raise Reject(f"the notifier does not handle {event_type(event)} facts")

    async def send(self, channel: str, command: Command, delivery: Delivery) -> None:
        """Send ``command`` unless the outbox shows it was already sent (or may have been)."""
        transport = self.transports[channel]
        key = command.command_id
        claimed = await self._claim(channel, command, transport)
        if claimed is None:
            return
        # Someone may have opted out since the command was written (or since the last try).
        command = await self._without_suppressed(channel, command)
        # Its files before "sending": a failed fetch has sent nothing, safe to retry.
        try:
            outgoing, files = await self.files.prepare(command)
        except TransientSendError as err:
            await self._transient(channel, transport, command, delivery, err)
        # Each write knows the revision the last one left (no read before it). A claim that
        # was never marked "sending" (its write lost, a crash) is simply tried again.
        known = await self._set(key, "sending", attempts=claimed[0].attempts, known=claimed)
        record = known[0]
        parts = _parts(outgoing, self.sms_max_chars)
        started = time.perf_counter()
        try:
            for index in range(len(record.provider_ids), len(parts)):
                provider_id = await transport.send(parts[index], files)
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
            await self._transient(channel, transport, command, delivery, err)
        except PermanentSendError as err:
            self.metrics.sends.labels(channel, transport.name, "failed").inc()
            outcome: DeliveryOutcome = "suppressed" if err.opted_out else "rejected"
            await self._set(key, "failed", error=str(err), outcome=outcome)
            for address in err.suppress:
                await self._suppress(
                    channel, address, err.why or "rejected", source_id=command.command_id
                )
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
        self._count_files(channel, files)
        if known[0].state != "sent":
            # Every part had been recorded before (a resumed send): only the state is left.
            await self._until_stored(key, functools.partial(self._set, key, "sent", error=""))
        await self._show(command, "sent", provider_status=known[0].delivery)
        log.info(
            "sent",
            extra={
                "channel": channel,
                "transport": transport.name,
                "command_id": key,
                "parts": len(parts),
            },
        )

    async def _transient(
        self,
        channel: str,
        transport: Transport,
        command: Command,
        delivery: Delivery,
        err: TransientSendError,
    ) -> NoReturn:
        """Nothing left: try again later (``Retry``), or give up after ``max_deliver``."""
        key = command.command_id
        self.metrics.sends.labels(channel, transport.name, "retry").inc()
        if delivery.num_delivered >= self.max_deliver:
            await self._set(key, "failed", error=f"gave up: {err}", outcome="exhausted")
            await self._report(command, "exhausted", str(err), transport=transport.name)
            raise Reject(f"gave up after {delivery.num_delivered} attempts: {err}") from err
        await self._set(key, "retry", error=str(err))
        delay = max(err.retry_after_s, self._backoff(delivery.num_delivered))
        raise Retry(f"transient send failure: {err}", delay_s=delay) from err

    def _count_files(self, channel: str, files: tuple[OutgoingFile, ...]) -> None:
        for file in files:
            self.metrics.files.labels(channel, file.outcome).inc()
        if any(file.outcome in ("unlinked", "missing") for file in files):
            log.info(
                "sent without some of its files (its text names them)",
                extra={
                    "channel": channel,
                    "files": [f"{f.artifact.ref}: {f.outcome}" for f in files],
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
        # Created without a read first: a command is new far more often than redelivered.
        with contextlib.suppress(Conflict):
            return record, await self.outbox.create(key, record)
        found = await self.outbox.get(key)
        if found is None:
            raise Retry("outbox record changed while it was claimed", delay_s=0.5)
        record = found[0]
        if record.state == "sent":
            self.metrics.skipped.labels(channel).inc()
            log.info("already sent; not sending again", extra={"command_id": key})
            # The read model may have missed it (a crash right after the send).
            await self._show(command, "sent", provider_status=record.delivery)
            return None
        # Counted in the text as it goes (an SMS's links are part of it).
        parts = len(_parts(self.files.text(command), self.sms_max_chars))
        if record.state == "sending" and len(record.provider_ids) >= parts:
            # Every part was accepted and recorded; only the final state was not stored.
            await self._until_stored(key, functools.partial(self._set, key, "sent", error=""))
            await self._show(command, "sent", provider_status=record.delivery)
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
            else:
                await self._show(command, "ambiguous")
            raise Reject(
                f"command {key} may already have been sent (interrupted mid-send); "
                "not sending again"
            )
        if record.state == "failed":
            if not record.reported:
                # The report of an earlier delivery did not get out: send it now.
                outcome: DeliveryOutcome = _OUTCOMES.get(record.outcome, "rejected")
                await self._report(command, outcome, record.error, transport=transport.name)
            else:
                await self._show(command, "failed", provider_status=record.delivery)
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

    async def _suppress(
        self, channel: str, address: str, why: str, *, source_id: str, our_address: str = ""
    ) -> None:
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
                our_address=our_address,
                source_id=source_id,
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
        record = await self._publish_failure(
            command_id=command.command_id,
            conversation_id=command.conversation_id,
            correlation_id=command.correlation_id,
            channel=_channel(command),
            to=_recipients(command),
            outcome=outcome,
            reason=reason,
            code=code,
            transport=transport,
        )
        await self._show(command, record.state)

    async def _publish_failure(
        self,
        *,
        command_id: str,
        conversation_id: str,
        correlation_id: str,
        channel: Literal["email", "sms", "api"],
        to: list[str],
        outcome: DeliveryOutcome,
        reason: str,
        code: str,
        transport: str,
    ) -> OutboxRecord:
        report = DeliveryFailed(
            event_id=stable_id("delivery", command_id, outcome),
            correlation_id=correlation_id or command_id,
            conversation_id=conversation_id,
            command_id=command_id,
            channel=channel,
            to=to,
            outcome=outcome,
            reason=reason[:1000],
            provider_code=code,
            transport=transport,
        )
        try:
            await publish(self.js, subjects.delivery_report(conversation_id, command_id), report)
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

        return (await self._mutate(command_id, change))[0]

    # --- the API's read model ---------------------------------------------------

    async def _show(self, command: Command, state: str, *, provider_status: str = "") -> None:
        """Keep the conversation's ``replies`` read model in step with the outbox.

        A read model: the outbox stays the record that decides what is sent. A
        failure to update it is logged and counted (``read_model_errors``) and the
        message is retried (``Retry``): the redelivered command finds the outbox
        record final, sends nothing, and shows it again.
        """
        if (isinstance(command, SendEmail) and command.operator) or not command.conversation_id:
            return
        body, files = self.files.view(command)
        view = ReplyView(
            command_id=command.command_id,
            kind=_channel(command),
            to=_recipients(command),
            subject=command.subject if isinstance(command, SendEmail) else "",
            body=body,
            files=files,
            delivery=state,
            provider_status=provider_status,
            at=command.at,
        )
        await self._update_view(command.conversation_id, view)

    async def _update_view(
        self, conversation: str, view: ReplyView | None, *, command_id: str = "", **fields: str
    ) -> None:
        """Add ``view``, or set ``fields`` of the reply ``command_id`` (if shown)."""

        def change(current: ConversationReplies | None) -> ConversationReplies | None:
            replies = list(current.replies) if current else []
            wanted = view.command_id if view is not None else command_id
            at = next((i for i, r in enumerate(replies) if r.command_id == wanted), None)
            if at is None:
                if view is None:
                    return None
                replies.append(view)
            else:
                old = replies[at]
                new = (
                    msgspec.structs.replace(
                        old,
                        delivery=view.delivery,
                        provider_status=view.provider_status or old.provider_status,
                    )
                    if view is not None
                    else msgspec.structs.replace(old, **fields)
                )
                if new == old:
                    return None
                replies[at] = new
            return ConversationReplies(
                conversation_id=conversation, replies=replies[-MAX_OUTBOUND:], updated_at=utcnow()
            )

        try:
            await self.replies.mutate(conversation, change)
        except Exception as err:
            self.metrics.read_model_errors.inc()
            log.warning(
                "could not update the replies read model",
                extra={"conversation_id": conversation, "error": repr(err)},
            )
            raise Retry("the replies read model could not be updated", delay_s=1.0) from err

    # --- facts from providers -------------------------------------------------

    async def status(self, event: DeliveryStatus) -> None:
        """A status callback: how far the provider got with one part of a command.

        Statuses only move forward (callbacks arrive out of order and are retried).
        A failure is reported to the conductor once; Twilio's 21610 (the recipient
        opted out with Twilio) also suppresses the number. An ``ambiguous`` send
        that the provider turns out to have taken becomes ``sent``.
        """
        command_id, sid = event.command_id, event.provider_id
        status = event.status.lower()
        if status not in DELIVERY_RANK:
            self.metrics.statuses.labels("unknown", "ignored").inc()
            return
        found = await self.outbox.get(command_id)
        if found is None:
            self.metrics.statuses.labels(status, "unknown-command").inc()
            log.info("status for an unknown command", extra={"command_id": command_id})
            return

        def change(current: OutboxRecord | None) -> OutboxRecord | None:
            if current is None or (
                current.provider_ids and sid not in current.provider_ids and current.state == "sent"
            ):
                return None
            previous = current.parts.get(sid, "")
            if DELIVERY_RANK[status] <= DELIVERY_RANK.get(previous, 0):
                return None
            current.parts = {**current.parts, sid: status}
            current.delivery = delivery_of(current.parts)
            if status in DELIVERY_FAILED:
                current.delivery_error = f"{status} {event.error_code}".strip()
            if current.state == "ambiguous" and status not in DELIVERY_FAILED:
                # The provider has it after all: the send that timed out did go out.
                current.state = "sent"
                current.provider_id = current.provider_id or sid
                current.provider_ids = current.provider_ids or [sid]
            current.updated_at = utcnow()
            return current

        record, _ = await self._mutate(command_id, change, found)
        applied = record.parts.get(sid) == status and found[0].parts.get(sid) != status
        self.metrics.statuses.labels(status, "applied" if applied else "stale").inc()
        if record.conversation_id:
            await self._update_view(
                record.conversation_id,
                None,
                command_id=command_id,
                delivery=record.state,
                provider_status=record.delivery,
            )
        if status not in DELIVERY_FAILED or not record.conversation_id:
            return
        if event.error_code == "21610" and event.to:
            await self._suppress(
                "sms",
                event.to,
                "provider-opt-out",
                source_id=command_id,
                our_address=event.our_address,
            )
        provider = "Twilio" if record.transport == "twilio" else record.transport
        await self._publish_failure(
            command_id=command_id,
            conversation_id=record.conversation_id,
            correlation_id=record.correlation_id,
            channel=event.channel,
            to=record.to,
            outcome="undelivered",
            reason=f"{provider} reported the message {status}"
            + (f" (error {event.error_code})" if event.error_code else ""),
            code=event.error_code,
            transport=record.transport,
        )

    async def preference(self, event: RecipientPreference) -> None:
        """STOP or START: keep the suppression list (a retried STOP cannot undo a START)."""
        sid = event.source_id

        def change(current: Suppression | None) -> Suppression | None:
            if current is not None and sid in current.seen:
                return None
            if current is not None and current.said_at is not None and event.at <= current.said_at:
                return None  # a newer STOP or START was applied already
            # A START with no record yet is kept too: its time must outrank a STOP that
            # was said before it but arrives after it.
            return Suppression(
                channel=event.channel,
                address=event.address,
                suppressed=event.opted_out,
                reason="opt-out",
                keyword=event.keyword,
                our_address=event.our_address,
                source_id=sid,
                seen=[*(current.seen if current else []), sid][-20:],
                said_at=event.at,
            )

        await self.suppressions.mutate(suppression_key(event.channel, event.address), change)
        self.metrics.preferences.labels(event.channel, str(event.opted_out).lower()).inc()
        log.info(
            "recipient preference applied",
            extra={"channel": event.channel, "opted_out": event.opted_out},
        )

    def _backoff(self, deliveries: int) -> float:
        return backoff(deliveries, base=self.retry_base_s, cap=self.retry_max_s)


_OUTCOMES: dict[str, DeliveryOutcome] = {
    "rejected": "rejected",
    "suppressed": "suppressed",
    "ambiguous": "ambiguous",
    "exhausted": "exhausted",
}


def _channel(command: Command) -> Literal["email", "sms", "api"]:
    match command:
        case SendEmail():
            return "email"
        case SendSms():
            return "sms"
        case ApiReply():
            return "api"


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
