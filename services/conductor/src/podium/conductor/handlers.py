"""The conductor's turn: an event in, the agent's commands out, state saved.

Per conversation, turns are strictly serial (the consumers order messages by
conversation id, and a replica only consumes the partitions it owns). A turn:
load the conversation, skip it if this event was already handled
(redelivery), render the event in the seed's format, ask the agent, parse its
commands, check each against policy (``actions``), publish what they produce,
escalate what needs a human, then save the conversation with compare-and-set.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.agents import AgentAnswer, AgentCall
from podium.agents.protocol import operator_block, worker_block
from podium.agents.sessions import Agents
from podium.common.bus import publish, publish_soon
from podium.common.consumer import Delivery
from podium.common.errors import Conflict, Reject, Retry
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.common.repositories import Repository
from podium.conductor import commands as cmds
from podium.conductor.actions import Actions, Effects, Trigger
from podium.conductor.config import ConductorSettings
from podium.conductor.metrics import ConductorMetrics
from podium.conductor.policy import REFUSAL
from podium.conductor.prompts import (
    COMMANDS_SCHEMA,
    ROLE,
    artifact_facts,
    inbound_block,
    session_summary,
    system_block,
)
from podium.contracts import subjects
from podium.contracts.events import (
    AnyEvent,
    ApiReply,
    DeliveryFailed,
    EventIds,
    InboundMessage,
    KillTask,
    OperatorAnswer,
    OperatorClose,
    OperatorKill,
    SendEmail,
    SendSms,
    TaskFollowup,
    TaskProgress,
    TaskRequested,
    TaskResult,
    TurnRecorded,
    encode,
    event_type,
    utcnow,
)
from podium.contracts.ids import stable_id
from podium.contracts.state import (
    FINISHED,
    MAX_ARTIFACTS,
    MAX_HANDLED,
    MAX_MEDIA,
    MAX_RECENT,
    MAX_RECENT_CHARS,
    MAX_REFERENCES,
    STATE_AFTER,
    Conversation,
    Pending,
)

log = logging.getLogger(__name__)


class Conductor:
    """Handles INBOUND and RESULTS events."""

    def __init__(
        self,
        *,
        settings: ConductorSettings,
        nc: Client,
        js: JetStreamContext,
        agents: Agents,
        conversations: Store[Conversation],
        metrics: Metrics,
        own_metrics: ConductorMetrics,
        role_prompt: str = ROLE,
        repositories: dict[str, Repository] | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.agents = agents
        self.conversations = conversations
        self.metrics = metrics
        self.own = own_metrics
        self.role_prompt = role_prompt
        self.actions = Actions(settings, metrics, own_metrics, repositories or {})
        self.schema = COMMANDS_SCHEMA if settings.command_format == "structured" else None

    async def handle(self, event: AnyEvent, delivery: Delivery) -> None:
        """Entry point for every conductor consumer."""
        # Operators' events are believed only on their own subject (only the console may
        # publish there), and nothing else is taken from it.
        from_operator = delivery.subject.startswith(f"{subjects.OPERATOR_NAMESPACE}.")
        if from_operator != isinstance(event, OperatorAnswer | OperatorKill | OperatorClose):
            raise Reject(f"{event_type(event)} event on {delivery.subject}")
        match event:
            case InboundMessage():
                await self.on_inbound(event, delivery)
            case TaskResult():
                await self.on_result(event, delivery)
            case TaskProgress():
                await self.on_progress(event)
            case DeliveryFailed():
                await self.on_delivery_failed(event)
            case OperatorAnswer():
                await self.on_operator_answer(event, delivery)
            case OperatorKill() | OperatorClose():
                await self.on_operator_stop(event)
            case _:
                raise Reject(f"the conductor does not handle {event_type(event)} events")

    async def on_dead_letter(self, event: AnyEvent, reason: str) -> None:
        """A message no turn could handle (it is being dead-lettered): tell the operator.

        Published directly, not through the conversation's record, since saving
        that record may be what failed. The command id is stable, so a second
        attempt sends nothing twice. ``podium replay deadletter`` runs the turn
        again once the cause is fixed.
        """
        # The console lists the conversation among the escalations; and a result no turn
        # judged still ends its task: its state, cost and failure are counted, so it no
        # longer holds a slot or escapes the limits.
        try:
            await self.conversations.mutate(
                event.conversation_id, functools.partial(_dead_lettered, event, reason)
            )
        except Exception as err:  # noqa: BLE001 - saving the record may be what failed
            log.warning("could not mark the conversation escalated", extra={"error": repr(err)})
        operator = self.settings.operator_email
        self.own.escalations.labels("dead_letter", str(bool(operator)).lower()).inc()
        log.error(
            "escalation",
            extra={"reasons": [f"dead letter: {reason[:300]}"], "operator": bool(operator)},
        )
        if not operator:
            return
        what = event_type(event)
        match event:
            case InboundMessage():
                what = (
                    f"a {event.channel} message from {event.sender}"
                    f"{f' ({event.subject!r})' if event.subject else ''}:\n\n{event.text[:2000]}"
                )
            case TaskResult():
                what = f"task {event.task_id}'s {event.status} result: {event.summary[:500]}"
        command_id = stable_id(event.event_id, "dead-letter-escalation")
        message = SendEmail(
            event_id=command_id,
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            command_id=command_id,
            to=[operator],
            subject=f"[Podium] escalation: a message was not handled ({event.conversation_id})",
            body=(
                f"Podium could not handle a message of conversation {event.conversation_id}; "
                f"no agent turn answered it.\n\nWhy:\n- {reason[:1000]}\n\n"
                f"The message was {what}\n\n"
                "It is kept in the DEADLETTER stream: `podium replay deadletter --list` shows "
                "it, and replaying it runs the turn again once the cause is fixed.\n"
            ),
        )
        await publish(self.js, subjects.command("email", event.conversation_id), message)
        self.metrics.events_out.labels(event_type(message)).inc()

    async def on_inbound(self, event: InboundMessage, delivery: Delivery) -> None:
        """A message from a person: check who it is, absorb it, take a turn."""
        found = await self._load(event.conversation_id)
        conv, revision = found if found else (_new(event), 0)
        if event.event_id in conv.handled:
            await self._already_handled(conv, event.event_id)
            return
        if not self.actions.policy.sender_allowed(event.channel, event.sender, event.sender_auth):
            await self._refuse_sender(conv, revision, event)
            return
        block = inbound_block(event)
        _absorb(conv, event, block)
        if conv.state == "closed":
            conv.state = "open"  # someone wrote again
        await self._turn(conv, revision, event, block, delivery, trigger=event.channel)

    async def on_operator_answer(self, event: OperatorAnswer, delivery: Delivery) -> None:
        """An operator answers an escalated conversation: the agent's next turn gets it as
        an ``[OPERATOR]`` block, and the conversation is open again."""
        found = await self._load(event.conversation_id)
        if found is None:
            raise Reject(f"operator answer for unknown conversation {event.conversation_id}")
        conv, revision = found
        if event.event_id in conv.handled:
            await self._already_handled(conv, event.event_id)
            return
        conv.state = "open"
        conv.escalation = ""
        context = f"Original request:\n{conv.original_request}"
        block = operator_block(event.operator, event.text, context)
        await self._turn(conv, revision, event, block, delivery, trigger="operator")

    async def on_operator_stop(self, event: OperatorKill | OperatorClose) -> None:
        """An operator kills a task, or closes the conversation (killing its open tasks).

        No agent turn: the conductor, owner of the conversation, carries it out and tells
        the agent on its next turn.
        """
        found = await self._load(event.conversation_id)
        if found is None:
            raise Reject(f"operator action for unknown conversation {event.conversation_id}")
        conv, revision = found
        if event.event_id in conv.handled:
            await self._already_handled(conv, event.event_id)
            return
        effects = Effects()
        if isinstance(event, OperatorKill):
            targets = [event.task_id] if event.task_id in conv.tasks else []
            if not targets:
                raise Reject(f"operator kill of unknown task {event.task_id}")
            what = f"operator {event.operator} killed task {event.task_id}"
        else:
            targets = [t.task_id for t in conv.tasks.values() if t.state not in FINISHED]
            conv.state = "closed"
            conv.escalation = ""
            what = f"operator {event.operator} closed the conversation"
        for task_id in targets:
            if conv.tasks[task_id].state == "needs_input":
                # Nothing runs it now (it waits for a follow-up): over at once. The stored
                # cancel keeps a worker from taking it up again.
                conv.tasks[task_id].state = "cancelled"
                conv.tasks[task_id].updated_at = utcnow()
            base = EventIds(
                event_id=stable_id(event.event_id, "kill", task_id),
                correlation_id=event.correlation_id,
                conversation_id=conv.conversation_id,
            )
            effects.kills.append(KillTask(**base, task_id=task_id, reason=what))
        reason = f": {event.reason}" if event.reason else ""
        conv.notes = [*conv.notes, f"{what}{reason}"][-20:]
        conv.handled = [*conv.handled, event.event_id][-MAX_HANDLED:]
        conv.updated_at = utcnow()
        log.info("operator action", extra={"action": event_type(event), "tasks": targets})
        await self._commit(conv, revision, effects)

    async def on_progress(self, event: TaskProgress) -> None:
        """A worker started (or is getting on with) a task: note it, no agent turn."""

        def change(conv: Conversation | None) -> Conversation | None:
            task = conv.tasks.get(event.task_id) if conv else None
            if conv is None or task is None or task.state not in ("queued", "running"):
                return None
            task.state = "running"
            task.updated_at = utcnow()
            return conv

        await self.conversations.mutate(event.conversation_id, change)

    async def on_delivery_failed(self, event: DeliveryFailed) -> None:
        """The notifier could not deliver one of our messages: tell the agent next turn.

        No turn is run for it: a failed reply must not prompt an immediate resend
        (a suppressed or invalid recipient would fail again, in a loop). The note
        rides along with the conversation's next message or worker result.
        """
        to = ", ".join(event.to) or "?"
        note = (
            f"{event.channel} {event.command_id} to {to} was not delivered ({event.outcome}): "
            f"{event.reason[:300]}"
        )
        log.warning(
            "delivery failed",
            extra={"command_id": event.command_id, "outcome": event.outcome},
        )

        def change(conv: Conversation | None) -> Conversation | None:
            if conv is None or event.event_id in conv.handled:
                return None
            conv.notes = [*conv.notes, note][-20:]
            conv.handled = [*conv.handled, event.event_id][-MAX_HANDLED:]
            conv.updated_at = utcnow()
            return conv

        await self.conversations.mutate(event.conversation_id, change)

    async def on_result(self, event: TaskResult, delivery: Delivery) -> None:
        """A worker's report: update the task, then let the agent judge it."""
        found = await self._load(event.conversation_id)
        if found is None:
            raise Reject(f"result for unknown conversation {event.conversation_id}")
        conv, revision = found
        if event.event_id in conv.handled:
            await self._already_handled(conv, event.event_id)
            return
        task = conv.tasks.get(event.task_id)
        if task is None:
            raise Reject(f"result for unknown task {event.task_id}")
        failures_before = conv.failed_tasks
        _account(conv, event)
        if conv.state == "closed":
            # An operator closed the conversation: its tasks' last reports are kept, but
            # no agent turn runs until someone writes again.
            conv.notes = [*conv.notes, f"task {task.task_id} ended {event.status} (closed)"][-20:]
            conv.handled = [*conv.handled, event.event_id][-MAX_HANDLED:]
            conv.updated_at = utcnow()
            await self._commit(conv, revision, Effects())
            return
        context = f"Original request:\n{conv.original_request}"
        if event.status == "COMPLETE":
            rounds = self.settings.max_validation_rounds
            context += (
                f"\nValidation: round {task.rounds + 1} of {rounds + 1} for task {task.task_id}; "
                "check the details against the original request, then REPLY or TELL_WORKER."
            )
        if not event.structured:
            context += "\nNote: the worker did not end with the Status/Summary/Details report."
        block = worker_block(
            event.task_id,
            event.status,
            event.summary,
            event.details,
            context,
            facts=artifact_facts(event),
        )
        await self._turn(
            conv,
            revision,
            event,
            block,
            delivery,
            trigger="worker",
            failures_before=failures_before,
        )

    async def _refuse_sender(
        self, conv: Conversation, revision: int, event: InboundMessage
    ) -> None:
        """Someone not on the allowlist: no agent turn; one polite refusal if so configured."""
        policy = self.actions.policy
        effects = Effects()
        if policy.spoofed(event.channel, event.sender, event.sender_auth):
            # An allowlisted From: that did not authenticate: an unknown sender, and the
            # operator is told (once a conversation) that someone is using that name.
            self.metrics.blocked.labels("inbound", "sender not authenticated").inc()
            self.own.spoofed.inc()
            log.warning(
                "allowlisted sender not authenticated",
                extra={"auth": event.sender_auth, "detail": event.sender_auth_detail[:300]},
            )
            if not conv.spoof_reported:
                conv.spoof_reported = True
                effects.escalations.append(
                    f"blocked inbound: a message From: {event.sender} (on the sender allowlist) "
                    f"did not authenticate ({event.sender_auth}: {event.sender_auth_detail}); "
                    "treated as an unknown sender, possibly spoofed"
                )
        else:
            self.metrics.blocked.labels("inbound", "sender not allowed").inc()
            log.warning("sender not allowed", extra={"channel": event.channel})
        if self.settings.unknown_senders == "refuse" and not conv.refused:
            conv.refused = True
            conv.reply_to = event.sender
            conv.subject = conv.subject or event.subject
            if event.message_id and conv.channel == "email":
                conv.last_message_id = event.message_id
                conv.references = [*event.references, event.message_id][-MAX_REFERENCES:]
            base = EventIds(
                event_id=stable_id(event.event_id, "refusal"),
                correlation_id=event.correlation_id,
                conversation_id=conv.conversation_id,
            )
            self.actions.reply(conv, base, REFUSAL, effects)
        self.actions.escalate(conv, event, effects)
        conv.handled = [*conv.handled, event.event_id][-MAX_HANDLED:]
        await self._commit(conv, revision, effects)

    # --- the turn ---------------------------------------------------------

    async def _turn(
        self,
        conv: Conversation,
        revision: int,
        event: Trigger,
        block: str,
        delivery: Delivery,
        *,
        trigger: str,
        failures_before: int | None = None,
    ) -> None:
        started_at = time.time()
        prompt = system_block(conv) + block
        conv.notes = []
        if failures_before is None:
            failures_before = conv.failed_tasks
        answer, new_session = await self._ask(conv, prompt, delivery, trigger)
        conv.spend_usd += answer.cost_usd
        conv.recent = [*conv.recent, block[:MAX_RECENT_CHARS]][-MAX_RECENT:]
        effects = Effects()
        conv.session_id = answer.session_id
        log.debug("agent turn", extra={"prompt": prompt[:4000], "answer": answer.text[:4000]})
        parsed = self._commands(answer)
        if not parsed.commands and not parsed.rejected:
            conv.notes.append("your answer held no command; answer with commands only")
        for rejection in parsed.rejected:
            self.own.rejected.inc()
            conv.notes.append(f"rejected {rejection.line[:120]!r}: {rejection.reason}")
            log.warning("command rejected", extra={"reason": rejection.reason})
        self.actions.gather_attachments(conv, parsed.commands, effects)
        for index, command in enumerate(parsed.commands):
            self.actions.apply(conv, event, index, command, effects)
        self.actions.check_attached(conv, effects)
        limit = self.settings.max_failed_tasks
        if failures_before < limit <= conv.failed_tasks:
            effects.escalations.append(f"{conv.failed_tasks} tasks failed (limit {limit})")
        self.actions.escalate(conv, event, effects)
        log.info(
            "turn done",
            extra={
                "trigger": trigger,
                "outcome": answer.outcome,
                "published": [event_type(e) for _, e in effects.stored],
                "kills": len(effects.kills),
                "notes": len(conv.notes),
                "escalations": len(effects.escalations),
            },
        )
        effects.stored.append(
            (
                subjects.turn(conv.conversation_id),
                _turn_record(
                    event,
                    trigger,
                    prompt=prompt,
                    answer=answer,
                    parsed=parsed,
                    effects=effects,
                    started_at=started_at,
                    new_session=new_session,
                ),
            )
        )
        conv.handled = [*conv.handled, event.event_id][-MAX_HANDLED:]
        conv.turns += 1
        conv.updated_at = utcnow()
        await self._commit(conv, revision, effects)
        log.info(
            "turn saved",
            extra={"trigger": trigger, "started_at": started_at, "ended_at": time.time()},
        )
        # The message is acknowledged once the session's transcript is stored too, so a
        # crash before then replays the turn rather than forgetting it.
        await self.agents.settled(conv.conversation_id)

    def _commands(self, answer: AgentAnswer) -> cmds.Parsed:
        if self.schema is not None and answer.structured is not None:
            return cmds.from_structured(answer.structured)
        return cmds.parse(answer.text)

    async def _ask(
        self, conv: Conversation, prompt: str, delivery: Delivery, trigger: str
    ) -> tuple[AgentAnswer, str]:
        """Run the agent; the answer if it succeeded, and why it began a new session
        (empty if it went on with the conversation's).

        A session past ``PODIUM_ROTATE_TURNS`` turns, or whose latest turn
        took more than ``PODIUM_ROTATE_INPUT_TOKENS`` input tokens, is
        rotated: this turn starts a new one, told first what the platform's record
        says (:func:`session_summary`), so a turn's cost does not grow with the
        conversation's age. Nothing is sent for it; the requester sees no difference.

        A failure raises ``Retry``: the turn is tried again (after
        ``PODIUM_TURN_RETRY_DELAY_S`` times the attempt), and after the last attempt the
        message is dead-lettered, which escalates it to the operator
        (:meth:`on_dead_letter`) and keeps it for a replay once the cause is fixed.
        """
        call = AgentCall(
            role="conductor",
            key=conv.conversation_id,
            prompt=prompt,
            workdir=self.agents.workdir(conv.conversation_id),
            session_id=conv.session_id or None,
            system_prompt=self.role_prompt,
            timeout_s=self.settings.agent_timeout_s,
            json_schema=self.schema,
        )
        new_session = self._rotation(conv) if call.session_id else ""
        if new_session:
            call = replace(
                call, prompt=session_summary(conv, new_session) + prompt, session_id=None
            )
        self.own.active_turns.inc()
        try:
            answer = await self.agents.run(call)
            if answer.outcome == "session_lost":
                # The session cannot be resumed anywhere: start a new one that is told
                # what happened so far (logged and counted by the session keeper too).
                log.warning("conductor session lost; starting afresh with a summary")
                new_session = "session_lost"
                call = replace(
                    call, prompt=session_summary(conv, new_session) + prompt, session_id=None
                )
                answer = await self.agents.run(call)
        finally:
            self.own.active_turns.dec()
        self.own.turns.labels(trigger, answer.outcome).inc()
        if answer.ok:
            if new_session in ("turns", "input_tokens"):
                self.own.rotations.labels(new_session).inc()
                log.info(
                    "conductor session rotated",
                    extra={
                        "reason": new_session,
                        "session_turns": conv.session_turns,
                        "input_tokens": conv.session_input_tokens,
                        "old_session_id": conv.session_id,
                        "session_id": answer.session_id,
                    },
                )
                conv.rotations += 1
            conv.session_turns = 1 if new_session else conv.session_turns + 1
            conv.session_input_tokens = (
                answer.input_tokens + answer.cache_read_tokens + answer.cache_creation_tokens
            )
            return answer, new_session
        log.warning(
            "conductor turn failed",
            extra={"outcome": answer.outcome, "error": answer.error[:500]},
        )
        delay = min(self.settings.turn_retry_delay_s * delivery.attempt, 60.0)
        raise Retry(
            f"the conductor agent failed ({answer.outcome}): {answer.error[:500]}", delay_s=delay
        )

    def _rotation(self, conv: Conversation) -> str:
        """Why the conversation's session should be rotated before this turn, or ""."""
        turns, tokens = self.settings.rotate_turns, self.settings.rotate_input_tokens
        if turns and conv.session_turns >= turns:
            return "turns"
        # A session's first turn can be large by itself (a long email, a big summary):
        # rotating after it would start over on every turn.
        if tokens and conv.session_input_tokens >= tokens and conv.session_turns > 1:
            return "input_tokens"
        return ""

    async def _load(self, conversation_id: str) -> tuple[Conversation, int] | None:
        """The conversation and its revision, with any decisions a crash left unpublished
        published first.

        A replica that dies between saving a turn and publishing its decisions leaves
        them in ``pending``; the next event of the conversation may be another one than
        the one whose turn that was (a worker's result can come before the inbound
        message is redelivered), and its turn must not replace them unpublished.
        """
        found = await self.conversations.get(conversation_id)
        if found is None or not found[0].pending:
            return found
        log.warning(
            "publishing decisions a crash left unpublished", extra={"n": len(found[0].pending)}
        )
        await self._flush(found[0])
        return await self.conversations.get(conversation_id)

    async def _commit(self, conv: Conversation, revision: int, effects: Effects) -> None:
        """Save the turn with its decisions, then publish them (a transactional outbox)."""
        conv.pending = [Pending(subject=s, event=e) for s, e in effects.stored] + [
            Pending(subject=subjects.kill(k.task_id), event=k, core=True) for k in effects.kills
        ]
        revision = await self._save(conv, revision)
        await self._flush(conv, revision)

    async def _already_handled(self, conv: Conversation, event_id: str) -> None:
        """A redelivered event: its turn is saved; publish what it left unpublished."""
        log.info("already handled; skipping", extra={"event_id": event_id})
        self.own.duplicates.inc()
        if conv.pending:
            log.warning(
                "publishing decisions a crash left unpublished", extra={"n": len(conv.pending)}
            )
            await self._flush(conv)

    async def _flush(self, conv: Conversation, revision: int = 0) -> None:
        """Publish the conversation's pending decisions (idempotent ids), then clear them.

        ``revision``: the one ``conv`` was just saved at, so clearing needs no read.
        """
        if not conv.pending:
            return
        # A turn's record is only read (the console's timeline), so it is stored
        # alongside the decisions instead of before them: one round trip less a turn.
        records = [p for p in conv.pending if isinstance(p.event, TurnRecorded)]
        acks = [await publish_soon(self.js, p.subject, p.event) for p in records]
        try:
            for item in conv.pending:
                if isinstance(item.event, TurnRecorded):
                    pass
                elif item.core and isinstance(item.event, KillTask):
                    kill = item.event
                    # Stored first, for the workers to record in the task's state (theirs
                    # to write), so one that has not started the task yet skips it; then
                    # told on core NATS to whichever worker runs it now.
                    await publish(self.js, subjects.task_cancel(kill.task_id), kill)
                    await self.nc.publish(item.subject, encode(kill))
                else:
                    await publish(self.js, item.subject, item.event)
                self.metrics.events_out.labels(event_type(item.event)).inc()
            for ack in acks:
                await asyncio.wait_for(ack, PUBLISH_TIMEOUT_S)
        finally:
            for ack in acks:
                ack.cancel()  # a flush that failed is done again whole (idempotent ids)
        done = {item.event.event_id for item in conv.pending}

        def clear(current: Conversation | None) -> Conversation | None:
            if current is None or not current.pending:
                return None
            current.pending = [p for p in current.pending if p.event.event_id not in done]
            return current

        known = (conv, revision) if revision else None
        await self.conversations.mutate(conv.conversation_id, clear, known=known)

    async def _save(self, conv: Conversation, revision: int) -> int:
        """Save ``conv`` if it is still at ``revision``; the revision it is saved at."""
        try:
            if revision:
                return await self.conversations.update(conv.conversation_id, conv, revision)
            return await self.conversations.create(conv.conversation_id, conv)
        except Conflict as err:
            # Someone else moved this conversation on: run the turn again from the
            # new state (what it publishes again is de-duplicated by id).
            raise Retry("conversation changed during the turn", delay_s=0.5) from err


#: How long a turn's record may take to be stored (as :func:`publish`'s default).
PUBLISH_TIMEOUT_S = 5.0
#: How much of a turn's prompt and answer its record keeps.
TURN_TEXT_MAX = 8192


def _turn_record(
    event: Trigger,
    trigger: str,
    *,
    prompt: str,
    answer: AgentAnswer,
    parsed: cmds.Parsed,
    effects: Effects,
    started_at: float,
    new_session: str = "",
) -> TurnRecorded:
    """What the turn was given and answered, for the console's timeline."""
    done: list[str] = []
    for item in effects.stored:
        match item[1]:
            case TaskRequested() as task:
                done.append(f"SPAWN_WORKER {task.task_id}")
            case TaskFollowup() as followup:
                done.append(f"TELL_WORKER {followup.task_id}")
            case SendEmail() as email:
                to = ", ".join(email.to)
                done.append(f"SEND_EMAIL {to}" + (" (to the operator)" if email.operator else ""))
            case SendSms() as sms:
                done.append(f"SEND_SMS {sms.to}")
            case ApiReply():
                done.append("REPLY")
    done += [f"KILL_WORKER {kill.task_id}" for kill in effects.kills]
    return TurnRecorded(
        event_id=stable_id(event.event_id, "turn"),
        correlation_id=event.correlation_id,
        conversation_id=event.conversation_id,
        trigger=trigger,
        trigger_event_id=event.event_id,
        prompt=prompt[:TURN_TEXT_MAX],
        answer=answer.text[:TURN_TEXT_MAX],
        commands=done,
        refused=[f"{r.line[:200]}: {r.reason}" for r in parsed.rejected],
        escalations=[e[:500] for e in effects.escalations],
        outcome=answer.outcome,
        duration_ms=answer.duration_ms or int((time.time() - started_at) * 1000),
        input_tokens=answer.input_tokens,
        output_tokens=answer.output_tokens,
        new_session=new_session,
        cost_usd=answer.cost_usd,
        # When it ran: before what it sent, in the timeline.
        at=datetime.fromtimestamp(started_at, UTC),
    )


def _new(event: InboundMessage) -> Conversation:
    return Conversation(
        conversation_id=event.conversation_id,
        channel=event.channel,
        client=event.client,
        thread_id=event.thread_id,
    )


def _absorb(conv: Conversation, event: InboundMessage, block: str) -> None:
    """Fold an inbound message into the conversation: who, where, threading."""
    sender = event.sender
    if conv.channel in ("email", "sms") and sender not in conv.participants:
        conv.participants.append(sender)
    conv.reply_to = sender
    if event.recipients and not conv.our_address:
        conv.our_address = event.recipients[0]
    if event.subject and not conv.subject:
        conv.subject = event.subject
    if event.message_id and conv.channel == "email":
        refs = [*event.references]
        if event.message_id not in refs:
            refs.append(event.message_id)
        conv.references = refs[-MAX_REFERENCES:]
        conv.last_message_id = event.message_id
    if not conv.original_request:
        conv.original_request = block
    if event.media:
        conv.media = [*conv.media, *event.media][-MAX_MEDIA:]


def _account(conv: Conversation, event: TaskResult) -> None:
    """Fold a worker's result into its task and the conversation's totals (once)."""
    task = conv.tasks.get(event.task_id)
    if task is None:
        return
    task.state = STATE_AFTER[event.status]
    task.summary = event.summary[:500]
    task.question = (
        f"{event.summary}\n{event.details}".strip()[:MAX_RECENT_CHARS]
        if task.state == "needs_input"
        else ""
    )
    task.updated_at = utcnow()
    if event.event_id not in conv.accounted:
        task.cost_usd += event.cost_usd
    if event.artifacts:
        # The newest version of each file is the one ATTACH sends.
        artifacts = {**conv.artifacts, **{a.ref: a for a in event.artifacts}}
        conv.artifacts = dict(list(artifacts.items())[-MAX_ARTIFACTS:])
    if event.event_id in conv.accounted:
        return
    conv.spend_usd += event.cost_usd
    if event.status == "FAILED":
        conv.failed_tasks += 1
    conv.accounted = [*conv.accounted, event.event_id][-MAX_HANDLED:]


def _dead_lettered(event: AnyEvent, reason: str, conv: Conversation | None) -> Conversation | None:
    """A conversation one of whose messages no turn could handle: escalated (and a result's
    task accounted)."""
    if conv is None:
        return None
    if isinstance(event, TaskResult) and event.task_id in conv.tasks:
        _account(conv, event)  # counts its cost and failure once
    conv.state = "escalated"
    conv.escalation = f"a message was not handled: {reason}"[:2000]
    conv.updated_at = utcnow()
    return conv
