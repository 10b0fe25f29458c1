"""The conductor's turn: an event in, the agent's commands out, state saved.

Per conversation, turns are strictly serial (the consumer orders messages by
conversation id). A turn: load the conversation, skip it if this event was
already handled (redelivery), render the event in the seed's format, ask the
agent, parse its commands, check each against policy, publish what they
produce (with ids derived from the event, so a repeat publishes nothing new),
then save the conversation with compare-and-set.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.common import subjects
from podium.common.agents import AgentAnswer, AgentCall
from podium.common.agents.sessions import Agents
from podium.common.bus import publish
from podium.common.consumer import Delivery
from podium.common.errors import Conflict, Reject, Retry
from podium.common.events import (
    AnyEvent,
    ApiReply,
    DeliveryFailed,
    Event,
    EventIds,
    InboundMessage,
    KillTask,
    SendEmail,
    SendSms,
    TaskFollowup,
    TaskProgress,
    TaskRequested,
    TaskResult,
    encode,
    event_type,
    utcnow,
)
from podium.common.ids import short_id, stable_id
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.common.protocol import worker_block
from podium.common.state import (
    FINISHED,
    MAX_HANDLED,
    MAX_OUTBOUND,
    MAX_REFERENCES,
    Conversation,
    Outbound,
    TaskInfo,
    TaskRecord,
    TaskState,
)
from podium.conductor import commands as cmds
from podium.conductor.config import ConductorSettings
from podium.conductor.metrics import ConductorMetrics
from podium.conductor.prompts import ROLE, inbound_block, lost_session_summary, notes_block

log = logging.getLogger(__name__)

_STATUS_STATE: dict[str, TaskState] = {
    "COMPLETE": "complete",
    "FAILED": "failed",
    "NEEDS_INPUT": "needs_input",
    "CANCELLED": "cancelled",
}


@dataclass
class Effects:
    """What one turn publishes."""

    stored: list[tuple[str, Event]] = field(default_factory=list)
    kills: list[KillTask] = field(default_factory=list)


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
        tasks: Store[TaskRecord],
        metrics: Metrics,
        own_metrics: ConductorMetrics,
        max_deliver: int,
        role_prompt: str = ROLE,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.agents = agents
        self.conversations = conversations
        self.tasks = tasks
        self.metrics = metrics
        self.own = own_metrics
        self.max_deliver = max_deliver
        self.role_prompt = role_prompt

    async def handle(self, event: AnyEvent, delivery: Delivery) -> None:
        """Entry point for both consumers."""
        match event:
            case InboundMessage():
                await self.on_inbound(event, delivery)
            case TaskResult():
                await self.on_result(event, delivery)
            case TaskProgress():
                await self.on_progress(event)
            case DeliveryFailed():
                await self.on_delivery_failed(event)
            case _:
                raise Reject(f"the conductor does not handle {event_type(event)} events")

    async def on_inbound(self, event: InboundMessage, delivery: Delivery) -> None:
        """A message from a person: absorb it into the conversation, then take a turn."""
        found = await self.conversations.get(event.conversation_id)
        conv, revision = found if found else (self._new(event), 0)
        if event.event_id in conv.handled:
            log.info("already handled; skipping", extra={"event_id": event.event_id})
            return
        block = inbound_block(event)
        _absorb(conv, event, block)
        await self._turn(conv, revision, event, block, delivery, trigger=event.channel)

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
        found = await self.conversations.get(event.conversation_id)
        if found is None:
            raise Reject(f"result for unknown conversation {event.conversation_id}")
        conv, revision = found
        if event.event_id in conv.handled:
            log.info("already handled; skipping", extra={"event_id": event.event_id})
            return
        task = conv.tasks.get(event.task_id)
        if task is None:
            raise Reject(f"result for unknown task {event.task_id}")
        task.state = _STATUS_STATE[event.status]
        task.summary = event.summary[:500]
        task.updated_at = utcnow()
        context = f"Original request:\n{conv.original_request}"
        if event.status == "COMPLETE":
            context += (
                f"\nValidation round {task.rounds + 1} of "
                f"{self.settings.max_validation_rounds + 1} for task {task.task_id}."
            )
        if not event.structured:
            context += "\nNote: the worker did not end with the Status/Summary/Details report."
        block = worker_block(event.task_id, event.status, event.summary, event.details, context)
        await self._turn(conv, revision, event, block, delivery, trigger="worker")

    # --- the turn ---------------------------------------------------------

    async def _turn(
        self,
        conv: Conversation,
        revision: int,
        event: InboundMessage | TaskResult,
        block: str,
        delivery: Delivery,
        *,
        trigger: str,
    ) -> None:
        prompt = notes_block(conv.notes) + block
        conv.notes = []
        answer = await self._ask(conv, prompt, delivery, trigger)
        effects = Effects()
        if not answer.ok:
            self._escalate(
                conv,
                event,
                effects,
                index=-1,
                reason=f"the conductor agent failed ({answer.outcome}): {answer.error[:300]}",
            )
        else:
            conv.session_id = answer.session_id
            log.debug("agent turn", extra={"prompt": prompt[:4000], "answer": answer.text[:4000]})
            parsed = cmds.parse(answer.text)
            if not parsed.commands and not parsed.rejected:
                conv.notes.append("your answer held no command; answer with commands only")
            for rejection in parsed.rejected:
                self.own.rejected.inc()
                conv.notes.append(f"rejected {rejection.line[:120]!r}: {rejection.reason}")
                log.warning("command rejected", extra={"reason": rejection.reason})
            for index, command in enumerate(parsed.commands):
                self._apply(conv, event, index, command, effects)
        await self._publish(effects)
        log.info(
            "turn done",
            extra={
                "trigger": trigger,
                "outcome": answer.outcome,
                "published": [event_type(e) for _, e in effects.stored],
                "kills": len(effects.kills),
                "notes": len(conv.notes),
            },
        )
        conv.handled = [*conv.handled, event.event_id][-MAX_HANDLED:]
        conv.turns += 1
        conv.updated_at = utcnow()
        await self._save(conv, revision)
        # The message is acknowledged once the session's transcript is stored too, so a
        # crash before then replays the turn rather than forgetting it.
        await self.agents.settled(conv.conversation_id)

    async def _ask(
        self, conv: Conversation, prompt: str, delivery: Delivery, trigger: str
    ) -> AgentAnswer:
        """Run the agent; a failure is retried (``Retry``) until the last delivery."""
        call = AgentCall(
            role="conductor",
            key=conv.conversation_id,
            prompt=prompt,
            workdir=self.agents.workdir(conv.conversation_id),
            session_id=conv.session_id or None,
            system_prompt=self.role_prompt,
            timeout_s=self.settings.agent_timeout_s,
        )
        self.own.active_turns.inc()
        try:
            answer = await self.agents.run(call)
            if answer.outcome == "session_lost":
                # The session cannot be resumed anywhere: start a new one that is told
                # what happened so far (logged and counted by the session keeper too).
                log.warning("conductor session lost; starting afresh with a summary")
                call = replace(call, prompt=lost_session_summary(conv) + prompt, session_id=None)
                answer = await self.agents.run(call)
        finally:
            self.own.active_turns.dec()
        self.own.turns.labels(trigger, answer.outcome).inc()
        if answer.ok:
            return answer
        log.warning(
            "conductor turn failed",
            extra={"outcome": answer.outcome, "error": answer.error[:500]},
        )
        if delivery.num_delivered < self.max_deliver:
            raise Retry(f"agent {answer.outcome}", delay_s=min(5.0 * delivery.num_delivered, 60))
        return answer

    async def _publish(self, effects: Effects) -> None:
        for subject, event in effects.stored:
            await publish(self.js, subject, event)
            self.metrics.events_out.labels(event_type(event)).inc()
        for kill in effects.kills:
            # Recorded first, so a worker that has not started the task yet skips it;
            # then told on core NATS to whichever worker runs it now.
            await self.tasks.mutate(kill.task_id, functools.partial(_cancel, kill))
            await self.nc.publish(subjects.kill(kill.task_id), encode(kill))
            self.metrics.events_out.labels(event_type(kill)).inc()

    async def _save(self, conv: Conversation, revision: int) -> None:
        try:
            if revision:
                await self.conversations.update(conv.conversation_id, conv, revision)
            else:
                await self.conversations.create(conv.conversation_id, conv)
        except Conflict as err:
            # Someone else moved this conversation on: run the turn again from the
            # new state (what it publishes again is de-duplicated by id).
            raise Retry("conversation changed during the turn", delay_s=0.5) from err

    def _new(self, event: InboundMessage) -> Conversation:
        return Conversation(
            conversation_id=event.conversation_id,
            channel=event.channel,
            client=event.client,
            thread_id=event.thread_id,
        )

    # --- commands ---------------------------------------------------------

    def _apply(
        self,
        conv: Conversation,
        event: InboundMessage | TaskResult,
        index: int,
        command: cmds.Command,
        effects: Effects,
    ) -> None:
        """Turn one command into effects, or a note when policy refuses it."""
        name = type(command).__name__
        effect_id = stable_id(event.event_id, "effect", str(index))
        base = EventIds(
            event_id=effect_id,
            correlation_id=event.correlation_id,
            conversation_id=conv.conversation_id,
        )
        match command:
            case cmds.SpawnWorker(task=task):
                open_tasks = [t for t in conv.tasks.values() if t.state not in FINISHED]
                if len(open_tasks) >= self.settings.max_workers_per_conversation:
                    self._block(
                        conv,
                        "SPAWN_WORKER",
                        "too many open tasks",
                        f"{len(open_tasks)} tasks are still open",
                    )
                    return
                task_id = short_id(event.event_id, "task", str(index))
                conv.tasks[task_id] = TaskInfo(task_id=task_id, instructions=task[:4000])
                effects.stored.append(
                    (
                        subjects.task(task_id),
                        TaskRequested(
                            **base,
                            task_id=task_id,
                            instructions=task,
                            original_request=conv.original_request,
                            timeout_s=self.settings.task_timeout_s,
                        ),
                    )
                )
            case cmds.TellWorker(task_id=task_id, message=message):
                info = conv.tasks.get(task_id)
                if info is None:
                    self._block(conv, "TELL_WORKER", "unknown task", f"no task {task_id}")
                    return
                if info.state == "complete":
                    if info.rounds >= self.settings.max_validation_rounds:
                        self._block(
                            conv,
                            "TELL_WORKER",
                            "validation rounds exhausted",
                            f"task {task_id} was sent back {info.rounds} times",
                        )
                        self._escalate(
                            conv,
                            event,
                            effects,
                            index=index,
                            reason=f"task {task_id}: validation rounds exhausted",
                        )
                        return
                    info.rounds += 1
                info.state = "running"
                info.updated_at = utcnow()
                effects.stored.append(
                    (
                        subjects.task_followup(task_id),
                        TaskFollowup(
                            **base,
                            task_id=task_id,
                            message=message,
                            timeout_s=self.settings.task_timeout_s,
                        ),
                    )
                )
            case cmds.KillWorker(task_id=task_id):
                info = conv.tasks.get(task_id)
                if info is None:
                    self._block(conv, "KILL_WORKER", "unknown task", f"no task {task_id}")
                    return
                effects.kills.append(KillTask(**base, task_id=task_id, reason="KILL_WORKER"))
            case cmds.Reply(text=text):
                self._reply(conv, base, text, effects)
            case cmds.SendEmail(to=to, subject=subject, body=body):
                refused = [a for a in to if not self._may_write(conv, a)]
                if refused:
                    self._block(
                        conv,
                        "SEND_EMAIL",
                        "recipient not allowed",
                        f"not a participant: {', '.join(refused)}",
                    )
                    self._escalate(
                        conv,
                        event,
                        effects,
                        index=index,
                        reason=f"blocked an email to {', '.join(refused)}",
                    )
                    return
                self._email(conv, base, to=list(to), subject=subject, body=body, effects=effects)
            case cmds.SendSms(to=number, text=text):
                if not self._may_write(conv, number):
                    self._block(
                        conv, "SEND_SMS", "recipient not allowed", f"not a participant: {number}"
                    )
                    self._escalate(
                        conv, event, effects, index=index, reason=f"blocked an SMS to {number}"
                    )
                    return
                self._sms(conv, base, to=number, text=text, effects=effects)
            case cmds.NoAction(reason=reason):
                log.info("no action", extra={"reason": reason[:300]})
            case cmds.Escalate(reason=reason):
                self._escalate(conv, event, effects, index=index, reason=reason)
        self.own.commands.labels(name).inc()

    def _may_write(self, conv: Conversation, address: str) -> bool:
        target = address.lower()
        if target in (p.lower() for p in conv.participants):
            return True
        for allowed in self.settings.outbound_allowlist:
            entry = allowed.lower().strip()
            if entry == target or (entry.startswith("@") and target.endswith(entry)):
                return True
        return False

    def _block(self, conv: Conversation, action: str, reason: str, detail: str) -> None:
        self.metrics.blocked.labels(action, reason).inc()
        conv.notes.append(f"{action} refused ({reason}): {detail}")
        log.warning("action blocked", extra={"action": action, "reason": reason})

    def _reply(self, conv: Conversation, base: EventIds, text: str, effects: Effects) -> None:
        command_id = base["event_id"]
        if conv.channel == "email":
            subject = conv.subject or "your message"
            if not subject.lower().startswith("re:"):
                subject = f"Re: {subject}"
            self._email(conv, base, to=[conv.reply_to], subject=subject, body=text, effects=effects)
        elif conv.channel == "sms":
            self._sms(conv, base, to=conv.reply_to, text=text, effects=effects)
        else:
            effects.stored.append(
                (
                    subjects.command("api", conv.conversation_id),
                    ApiReply(
                        **base,
                        command_id=command_id,
                        client=conv.client,
                        thread_id=conv.thread_id,
                        body=text,
                    ),
                )
            )
            _record(conv, Outbound(command_id=command_id, kind="api", to=[conv.client], body=text))

    def _email(
        self,
        conv: Conversation,
        base: EventIds,
        *,
        to: list[str],
        subject: str,
        body: str,
        effects: Effects,
    ) -> None:
        command_id = base["event_id"]
        threaded = conv.channel == "email" and bool(conv.last_message_id)
        effects.stored.append(
            (
                subjects.command("email", conv.conversation_id),
                SendEmail(
                    **base,
                    command_id=command_id,
                    to=to,
                    subject=subject,
                    body=body,
                    in_reply_to=conv.last_message_id if threaded else "",
                    references=conv.references if threaded else [],
                ),
            )
        )
        _record(
            conv, Outbound(command_id=command_id, kind="email", to=to, subject=subject, body=body)
        )

    def _sms(
        self, conv: Conversation, base: EventIds, *, to: str, text: str, effects: Effects
    ) -> None:
        command_id, number = base["event_id"], to
        sender = conv.our_address if conv.channel == "sms" else ""
        effects.stored.append(
            (
                subjects.command("sms", conv.conversation_id),
                SendSms(**base, command_id=command_id, to=number, body=text, sender=sender),
            )
        )
        _record(conv, Outbound(command_id=command_id, kind="sms", to=[number], body=text))

    def _escalate(
        self,
        conv: Conversation,
        event: InboundMessage | TaskResult,
        effects: Effects,
        *,
        index: int,
        reason: str,
    ) -> None:
        operator = self.settings.operator_email
        self.own.escalations.labels(_reason_label(reason), str(bool(operator)).lower()).inc()
        log.error("escalation", extra={"reason": reason[:500], "operator": bool(operator)})
        if not operator:
            return
        command_id = stable_id(event.event_id, "escalate", str(index), reason)
        tasks = "\n".join(f"- {t.task_id}: {t.state} — {t.summary}" for t in conv.tasks.values())
        body = (
            f"Podium escalated conversation {conv.conversation_id} ({conv.channel}).\n\n"
            f"Reason: {reason}\n\nOriginal request:\n{conv.original_request}\n\n"
            f"Tasks:\n{tasks or '- none'}\n"
        )
        effects.stored.append(
            (
                subjects.command("email", conv.conversation_id),
                SendEmail(
                    event_id=command_id,
                    correlation_id=event.correlation_id,
                    conversation_id=conv.conversation_id,
                    command_id=command_id,
                    to=[operator],
                    subject=f"[Podium] escalation: {conv.subject or conv.conversation_id}",
                    body=body,
                ),
            )
        )
        _record(
            conv,
            Outbound(
                command_id=command_id,
                kind="operator",
                to=[operator],
                subject="escalation",
                body=reason,
            ),
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


def _cancel(kill: KillTask, current: TaskRecord | None) -> TaskRecord:
    record = current or TaskRecord(
        task_id=kill.task_id,
        conversation_id=kill.conversation_id,
        correlation_id=kill.correlation_id,
    )
    record.cancel_requested = True
    return record


def _record(conv: Conversation, outbound: Outbound) -> None:
    conv.outbound = [*conv.outbound, outbound][-MAX_OUTBOUND:]


def _reason_label(reason: str) -> str:
    lowered = reason.lower()
    for label in ("blocked", "exhausted", "failed"):
        if label in lowered:
            return label
    return "agent"
