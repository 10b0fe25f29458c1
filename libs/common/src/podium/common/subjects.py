"""Every NATS subject Podium uses. No service spells a subject string of its own.

| subject                                   | producer  | consumer  | stream     |
|-------------------------------------------|-----------|-----------|------------|
| inbound.<channel>.<conversation>          | ingress   | conductor | INBOUND    |
| tasks.<task_id> / tasks.<task_id>.followup| conductor | worker    | TASKS      |
| results.<conversation>.<task_id>          | worker    | conductor | RESULTS    |
| results.<conversation>.<command_id>       | notifier, | conductor | RESULTS    |
|   (delivery failures)                     | ingress   |           |            |
| commands.<email|sms|api>.<conversation>   | conductor | notifier  | COMMANDS   |
| deadletter.<service>.<stream>             | any       | operators | DEADLETTER |
| control.tasks.<task_id>.kill (core NATS)  | conductor | worker    | —          |

INBOUND and RESULTS append a partition token when they store a message:
``inbound.<channel>.<conversation>.<p>``, ``results.<conversation>.<task>.<p>``,
with ``p = partition(conversation)`` computed by the server (a stream subject
transform, see :mod:`podium.common.streams`). Publishers never spell it; each
conductor replica consumes the partitions it owns, so one conversation is only
ever handled by one replica at a time.
"""

from __future__ import annotations

import re
from typing import Literal

from podium.common.events import Channel

CommandKind = Literal["email", "sms", "api"]

INBOUND_ALL = "inbound.>"
TASKS_ALL = "tasks.>"
RESULTS_ALL = "results.>"
COMMANDS_ALL = "commands.>"
DEADLETTER_ALL = "deadletter.>"
KILL_ALL = "control.tasks.*.kill"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def token(value: str) -> str:
    """Return ``value`` if it is safe as one subject token, else raise ``ValueError``.

    Only ``[A-Za-z0-9_-]`` is allowed: dots, wildcards and whitespace in an id
    would let a crafted value address other subjects.
    """
    if not _TOKEN.match(value):
        raise ValueError(f"not a safe subject token: {value!r}")
    return value


def inbound(channel: Channel, conversation: str) -> str:
    """Subject of an inbound message."""
    return f"inbound.{token(channel)}.{token(conversation)}"


def task(task_id: str) -> str:
    """Subject of a new task."""
    return f"tasks.{token(task_id)}"


def task_followup(task_id: str) -> str:
    """Subject of a follow-up (TELL_WORKER) for a task."""
    return f"tasks.{token(task_id)}.followup"


def result(conversation: str, task_id: str) -> str:
    """Subject of a worker's result for a task."""
    return f"results.{token(conversation)}.{token(task_id)}"


def delivery_report(conversation: str, command_id: str) -> str:
    """Subject of a delivery failure told to the conductor (in the conversation's partition)."""
    return f"results.{token(conversation)}.{token(command_id)}"


def command(kind: CommandKind, conversation: str) -> str:
    """Subject of an outbound command for the notifier."""
    return f"commands.{token(kind)}.{token(conversation)}"


def kill(task_id: str) -> str:
    """Core-NATS subject that tells whichever worker runs ``task_id`` to stop it."""
    return f"control.tasks.{token(task_id)}.kill"


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


def inbox_prefix(service: str) -> str:
    """Prefix of ``service``'s reply inboxes: each service reads replies only on its own."""
    return f"_INBOX.{token(service)}"


def dead_letter(service: str, stream: str) -> str:
    """Subject where ``service`` records a message of ``stream`` it could never handle."""
    return f"deadletter.{token(service)}.{token(stream)}"


def dead_letters_of(service: str) -> str:
    """Every subject where ``service`` may record dead letters (its NATS permission)."""
    return f"deadletter.{token(service)}.*"


# Headers every Podium publish carries, so operators can filter with the NATS CLI.
HDR_EVENT_TYPE = "Podium-Event"
HDR_SCHEMA = "Podium-Schema"
HDR_CORRELATION = "Podium-Correlation-Id"
HDR_MSG_ID = "Nats-Msg-Id"
