"""Turning the conductor agent's commands into events, through the policy.

Every id an action produces is derived from the event that caused the turn
and the command's position in the answer, so a turn run again after a crash
publishes nothing new (JetStream de-duplicates on ``Nats-Msg-Id``, the
notifier on the command id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from podium.common.metrics import Metrics
from podium.common.repositories import Repository, named_in
from podium.conductor import commands as cmds
from podium.conductor.config import ConductorSettings
from podium.conductor.metrics import ConductorMetrics
from podium.conductor.policy import Policy, Refusal
from podium.contracts import subjects
from podium.contracts.events import (
    AnyEvent,
    ApiReply,
    Artifact,
    EventIds,
    InboundMessage,
    KillTask,
    OperatorAnswer,
    SendEmail,
    SendSms,
    TaskFollowup,
    TaskRequested,
    TaskResult,
    utcnow,
)
from podium.contracts.ids import reply_subject, short_id, stable_id
from podium.contracts.state import MAX_OUTBOUND, Conversation, Outbound, TaskInfo

log = logging.getLogger(__name__)

Trigger = InboundMessage | TaskResult | OperatorAnswer


@dataclass
class Effects:
    """What one turn publishes, and what it escalates."""

    stored: list[tuple[str, AnyEvent]] = field(default_factory=list)
    kills: list[KillTask] = field(default_factory=list)
    escalations: list[str] = field(default_factory=list)
    #: The turn's ATTACH files: they go with every message the turn sends.
    attachments: list[Artifact] = field(default_factory=list)
    #: Whether a message of this turn carried them.
    attached: bool = False


class Actions:
    """Applies commands to a conversation, producing effects or refusals."""

    def __init__(
        self,
        settings: ConductorSettings,
        metrics: Metrics,
        own_metrics: ConductorMetrics,
        repositories: dict[str, Repository] | None = None,
    ) -> None:
        self.settings = settings
        self.repositories = repositories or {}
        self.policy = Policy(settings)
        self.metrics = metrics
        self.own = own_metrics

    def gather_attachments(
        self, conv: Conversation, commands: list[cmds.Command], effects: Effects
    ) -> None:
        """The turn's ATTACH commands, resolved against the conversation's artifacts before
        any message is built (an ATTACH may come after its REPLY)."""
        for command in commands:
            if not isinstance(command, cmds.Attach):
                continue
            artifact = conv.artifacts.get(command.ref)
            if artifact is None:
                known = ", ".join(list(conv.artifacts)[-10:]) or "none yet"
                detail = f"there is no file {command.ref} (files the workers made: {known})"
                self.refuse(conv, command.name, Refusal("unknown artifact", detail), effects)
            elif artifact not in effects.attachments:
                effects.attachments.append(artifact)
                self.own.commands.labels(command.name).inc()

    def check_attached(self, conv: Conversation, effects: Effects) -> None:
        """ATTACH without a message to go with is refused, not dropped."""
        if effects.attachments and not effects.attached:
            refs = ", ".join(a.ref for a in effects.attachments)
            detail = f"{refs}: ATTACH goes with a REPLY, SEND_EMAIL or SEND_SMS in the same answer"
            self.refuse(conv, "ATTACH", Refusal("nothing to attach to", detail), effects)

    def apply(
        self,
        conv: Conversation,
        event: Trigger,
        index: int,
        command: cmds.Command,
        effects: Effects,
    ) -> None:
        """Carry out one command, or refuse it (noted, counted, escalated)."""
        base = EventIds(
            event_id=stable_id(event.event_id, "effect", str(index)),
            correlation_id=event.correlation_id,
            conversation_id=conv.conversation_id,
        )
        name = command.name
        refusal: Refusal | None = None
        match command:
            case cmds.SpawnWorker(task=task):
                refusal = self.policy.may_spawn(conv) or self._known_repository(task)
                if refusal is None:
                    self._spawn(conv, event, index=index, base=base, task=task, effects=effects)
            case cmds.TellWorker(task_id=task_id, message=message):
                info = conv.tasks.get(task_id)
                refusal = self.policy.may_tell(info, task_id, conv)
                if refusal is None and info is not None:
                    self._tell(info, base, message, effects)
            case cmds.KillWorker(task_id=task_id):
                if task_id not in conv.tasks:
                    refusal = Refusal("unknown task", f"there is no task {task_id}")
                else:
                    effects.kills.append(KillTask(**base, task_id=task_id, reason="KILL_WORKER"))
            case cmds.Reply(text=text):
                refusal = self.policy.may_send(conv)
                if refusal is None:
                    self.reply(conv, base, text, effects)
            case cmds.SendEmail(to=to, subject=subject, body=body):
                refusal = next(
                    (r for a in to if (r := self.policy.may_write(conv, a)) is not None),
                    None,
                ) or self.policy.may_send(conv)
                if refusal is None:
                    self.email(conv, base, to=list(to), subject=subject, body=body, effects=effects)
            case cmds.SendSms(to=number, text=text):
                refusal = self.policy.may_write(conv, number) or self.policy.may_send(conv)
                if refusal is None:
                    self.sms(conv, base, to=number, text=text, effects=effects)
            case cmds.NoAction(reason=reason):
                log.info("no action", extra={"reason": reason[:300]})
            case cmds.Escalate(reason=reason):
                effects.escalations.append(f"the conductor agent escalated: {reason}")
            case cmds.Attach():
                return  # resolved before the turn's messages (gather_attachments)
        if refusal is not None:
            self.refuse(conv, name, refusal, effects)
        else:
            self.own.commands.labels(name).inc()

    def _known_repository(self, task: str) -> Refusal | None:
        """A task naming a repository (``Repository: <name>``) must name a known one."""
        name = named_in(task)
        if not name or name in self.repositories:
            return None
        known = ", ".join(self.repositories) or "none are configured"
        return Refusal("unknown repository", f"there is no repository {name!r} ({known})")

    def refuse(self, conv: Conversation, action: str, refusal: Refusal, effects: Effects) -> None:
        """A blocked action: logged, counted, told to the agent, escalated."""
        self.metrics.blocked.labels(action, refusal.reason).inc()
        conv.notes.append(f"{action} refused ({refusal.reason}): {refusal.detail}")
        effects.escalations.append(f"blocked {action}: {refusal.reason} — {refusal.detail}")
        log.warning(
            "action blocked",
            extra={"action": action, "reason": refusal.reason, "detail": refusal.detail},
        )

    def _spawn(
        self,
        conv: Conversation,
        event: Trigger,
        *,
        index: int,
        base: EventIds,
        task: str,
        effects: Effects,
    ) -> None:
        task_id = short_id(event.event_id, "task", str(index))
        conv.tasks[task_id] = TaskInfo(task_id=task_id, instructions=task[:4000])
        requested = TaskRequested(
            **base,
            task_id=task_id,
            instructions=task,
            original_request=conv.original_request,
            timeout_s=self.settings.task_timeout_s,
            inputs=conv.media,
            repository=named_in(task),
        )
        effects.stored.append((subjects.task(task_id), requested))

    def _tell(self, info: TaskInfo, base: EventIds, message: str, effects: Effects) -> None:
        if info.state == "complete":
            info.rounds += 1  # a validation round: the worker is sent back
        info.state = "running"
        info.updated_at = utcnow()
        followup = TaskFollowup(
            **base, task_id=info.task_id, message=message, timeout_s=self.settings.task_timeout_s
        )
        effects.stored.append((subjects.task_followup(info.task_id), followup))

    def reply(self, conv: Conversation, base: EventIds, text: str, effects: Effects) -> None:
        """Answer the requester on the channel the conversation came in on."""
        if conv.channel == "email":
            subject = reply_subject(conv.subject or "your message")
            self.email(conv, base, to=[conv.reply_to], subject=subject, body=text, effects=effects)
        elif conv.channel == "sms":
            self.sms(conv, base, to=conv.reply_to, text=text, effects=effects)
        else:
            command_id = base["event_id"]
            reply = ApiReply(
                **base,
                command_id=command_id,
                client=conv.client,
                thread_id=conv.thread_id,
                body=text,
                attachments=effects.attachments,
            )
            effects.attached = effects.attached or bool(effects.attachments)
            effects.stored.append((subjects.command("api", conv.conversation_id), reply))
            record(conv, Outbound(command_id=command_id, kind="api", to=[conv.client], body=text))

    def email(
        self,
        conv: Conversation,
        base: EventIds,
        *,
        to: list[str],
        subject: str,
        body: str,
        effects: Effects,
    ) -> None:
        """An email; threaded when the conversation is an email thread."""
        command_id = base["event_id"]
        threaded = conv.channel == "email" and bool(conv.last_message_id)
        message = SendEmail(
            **base,
            command_id=command_id,
            to=to,
            subject=subject,
            body=body,
            in_reply_to=conv.last_message_id if threaded else "",
            references=conv.references if threaded else [],
            attachments=effects.attachments,
        )
        effects.attached = effects.attached or bool(effects.attachments)
        effects.stored.append((subjects.command("email", conv.conversation_id), message))
        record(
            conv, Outbound(command_id=command_id, kind="email", to=to, subject=subject, body=body)
        )

    def sms(
        self, conv: Conversation, base: EventIds, *, to: str, text: str, effects: Effects
    ) -> None:
        """An SMS; from the number they wrote to when the conversation is an SMS one."""
        command_id = base["event_id"]
        sender = conv.our_address if conv.channel == "sms" else ""
        message = SendSms(
            **base,
            command_id=command_id,
            to=to,
            body=text,
            sender=sender,
            attachments=effects.attachments,
        )
        effects.attached = effects.attached or bool(effects.attachments)
        effects.stored.append((subjects.command("sms", conv.conversation_id), message))
        record(conv, Outbound(command_id=command_id, kind="sms", to=[to], body=text))

    def escalate(self, conv: Conversation, event: Trigger, effects: Effects) -> None:
        """One email to the operator with every reason this turn gathered, and the context."""
        if not effects.escalations:
            return
        operator = self.settings.operator_email
        for reason in effects.escalations:
            self.own.escalations.labels(_reason_label(reason), str(bool(operator)).lower()).inc()
        log.error(
            "escalation",
            extra={"reasons": [r[:300] for r in effects.escalations], "operator": bool(operator)},
        )
        conv.escalations += 1
        # The console lists it among the escalations until an operator answers or closes.
        conv.state = "escalated"
        conv.escalation = "; ".join(effects.escalations)[:2000]
        if not operator:
            return
        command_id = stable_id(event.event_id, "escalate", *effects.escalations)
        tasks = "\n".join(f"- {t.task_id}: {t.state} — {t.summary}" for t in conv.tasks.values())
        reasons = "\n".join(f"- {r}" for r in effects.escalations)
        who = ", ".join(conv.participants) or conv.client or "unknown"
        body = (
            f"Podium escalated conversation {conv.conversation_id} ({conv.channel}, with "
            f"{who}).\n\nWhy:\n{reasons}\n\nOriginal request:\n{conv.original_request}\n\n"
            f"Tasks:\n{tasks or '- none'}\n\nSpend so far: ${conv.spend_usd:.2f}\n"
        )
        message = SendEmail(
            event_id=command_id,
            correlation_id=event.correlation_id,
            conversation_id=conv.conversation_id,
            command_id=command_id,
            to=[operator],
            subject=f"[Podium] escalation: {conv.subject or conv.conversation_id}",
            body=body,
            operator=True,
        )
        effects.stored.append((subjects.command("email", conv.conversation_id), message))
        record(
            conv,
            Outbound(
                command_id=command_id,
                kind="operator",
                to=[operator],
                subject="escalation",
                body=reasons,
            ),
        )


def record(conv: Conversation, outbound: Outbound) -> None:
    """Remember an outbound message in the conversation (bounded)."""
    conv.outbound = [*conv.outbound, outbound][-MAX_OUTBOUND:]


def _reason_label(reason: str) -> str:
    lowered = reason.lower()
    for label in ("blocked", "exhausted", "failed", "spend", "escalated"):
        if label in lowered:
            return label
    return "other"
