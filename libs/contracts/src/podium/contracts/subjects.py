"""Every NATS subject Podium uses. No service spells a subject string of its own.

The templates, and who produces and consumes each, are declared once in
:mod:`podium.contracts.registry`; the functions here fill them with checked tokens.

INBOUND and RESULTS append a partition token when they store a message:
``inbound.<channel>.<conversation>.<p>``, ``results.<conversation>.<task>.<p>``,
with ``p = partition(conversation)`` computed by the server (a stream subject
transform, see :mod:`podium.contracts.streams`). Publishers never spell it; each
conductor replica consumes the partitions it owns, so one conversation is only
ever handled by one replica at a time.
"""

from __future__ import annotations

import re
from typing import Literal

from podium.contracts import registry as reg
from podium.contracts.events import Channel

CommandKind = Literal["email", "sms", "api"]

INBOUND_ALL = f"{reg.INBOUND.namespace}.>"
TASKS_ALL = f"{reg.TASK.namespace}.>"
RESULTS_ALL = f"{reg.RESULT.namespace}.>"
COMMANDS_ALL = f"{reg.EMAIL_COMMAND.namespace}.>"
DELIVERY_ALL = f"{reg.DELIVERY_STATUS.namespace}.>"
DEADLETTER_ALL = f"{reg.DEAD_LETTER.namespace}.>"
KILL_ALL = reg.KILL.wildcard()
TURNS_ALL = f"{reg.TURN.namespace}.>"
#: Operators' events come under ``inbound.operator.``, and nothing else does.
OPERATOR_NAMESPACE = "inbound.operator"
AUDIT_ALL = f"{reg.AUDIT.namespace}.>"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def token(value: str) -> str:
    """Return ``value`` if it is safe as one subject token, else raise ``ValueError``.

    Only ``[A-Za-z0-9_-]`` is allowed: dots, wildcards and whitespace in an id
    would let a crafted value address other subjects.
    """
    if not _TOKEN.match(value):
        raise ValueError(f"not a safe subject token: {value!r}")
    return value


def _fill(spec: reg.ChannelSpec, /, **values: str) -> str:
    return spec.address.format(**{name: token(v) for name, v in values.items()})


def inbound(channel: Channel, conversation: str) -> str:
    """Subject of an inbound message."""
    return _fill(reg.INBOUND, channel=channel, conversation=conversation)


def task(task_id: str) -> str:
    """Subject of a new task."""
    return _fill(reg.TASK, task=task_id)


def task_followup(task_id: str) -> str:
    """Subject of a follow-up (TELL_WORKER) for a task."""
    return _fill(reg.TASK_FOLLOWUP, task=task_id)


def task_cancel(task_id: str) -> str:
    """Subject of a stored cancel request: a worker records it in the task's state."""
    return _fill(reg.TASK_CANCEL, task=task_id)


def result(conversation: str, task_id: str) -> str:
    """Subject of a worker's result for a task."""
    return _fill(reg.RESULT, conversation=conversation, task=task_id)


def delivery_report(conversation: str, command_id: str) -> str:
    """Subject of a delivery failure told to the conductor (in the conversation's partition)."""
    return _fill(reg.DELIVERY_REPORT, conversation=conversation, command=command_id)


def command(kind: CommandKind, conversation: str) -> str:
    """Subject of an outbound command for the notifier."""
    spec = {"email": reg.EMAIL_COMMAND, "sms": reg.SMS_COMMAND, "api": reg.API_COMMAND}[kind]
    return _fill(spec, conversation=conversation)


def delivery_status(command_id: str) -> str:
    """Subject of a provider's status callback for one of our commands (a fact)."""
    return _fill(reg.DELIVERY_STATUS, command=command_id)


def preference(conversation: str) -> str:
    """Subject of a recipient's opt-out or opt-in (a fact), in its conversation's order."""
    return _fill(reg.PREFERENCE, conversation=conversation)


def operator_command(conversation: str) -> str:
    """Subject of an operator's answer, kill or close, in the conversation's order."""
    return _fill(reg.OPERATOR_COMMAND, conversation=conversation)


def turn(conversation: str) -> str:
    """Subject of a conductor turn's record (the console's timeline)."""
    return _fill(reg.TURN, conversation=conversation)


def audit(action: str) -> str:
    """Subject of an operator's action, kept for audit."""
    return _fill(reg.AUDIT, action=action)


def of_conversation(conversation: str) -> dict[str, list[str]]:
    """Every subject under which a conversation's events are stored, by stream."""
    c = token(conversation)
    return {
        "INBOUND": [f"{reg.INBOUND.namespace}.*.{c}.*"],
        "RESULTS": [f"{reg.RESULT.namespace}.{c}.*.*"],
        "COMMANDS": [f"{reg.EMAIL_COMMAND.namespace}.*.{c}"],
        "TURNS": [turn(c)],
    }


def kill(task_id: str) -> str:
    """Core-NATS subject that tells whichever worker runs ``task_id`` to stop it."""
    return _fill(reg.KILL, task=task_id)


def inbound_partition(partition: int) -> str:
    """Filter of the stored inbound messages of one conductor partition."""
    return f"inbound.*.*.{partition}"


def results_partition(partition: int) -> str:
    """Filter of the stored worker results of one conductor partition."""
    return f"results.*.*.{partition}"


def partition_of(conversation: str, partitions: int) -> int:
    """The partition the server assigns to ``conversation``.

    NATS's ``{{partition(n, …)}}`` is FNV-1a (32 bit) of the token, modulo n;
    computing it here lets tools say which replica owns a conversation.
    """
    h = 0x811C9DC5
    for byte in conversation.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


#: JetStream's API (no domain: Podium's streams live in the account's own JetStream).
JS_API = "$JS.API"


def pull_request(stream: str, durable: str) -> str:
    """Where a pull request for messages of durable consumer ``durable`` is sent."""
    return f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"


def inbox_prefix(service: str) -> str:
    """Prefix of ``service``'s reply inboxes: each service reads replies only on its own."""
    return f"_INBOX.{token(service)}"


def dead_letter(service: str, stream: str) -> str:
    """Subject where ``service`` records a message of ``stream`` it could never handle."""
    return _fill(reg.DEAD_LETTER, service=service, stream=stream)


def dead_letters_of(service: str) -> str:
    """Every subject where ``service`` may record dead letters (its NATS permission)."""
    return reg.DEAD_LETTER.wildcard(token(service))


# Headers every Podium publish carries, so operators can filter with the NATS CLI.
HDR_EVENT_TYPE = "Podium-Event"
HDR_SCHEMA = "Podium-Schema"
HDR_CORRELATION = "Podium-Correlation-Id"
HDR_MSG_ID = "Nats-Msg-Id"
