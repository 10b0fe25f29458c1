"""The AsyncAPI 3.0 document of Podium's bus, generated from the contracts.

Message payloads are the JSON Schemas msgspec derives from the event Structs
(:mod:`podium.common.events`); channels are the subjects of
:mod:`podium.common.subjects`; who sends and receives what comes from the
NATS roles of :mod:`podium.common.access`. ``podium generate`` writes it to
``docs/asyncapi.yaml``; tests check the file is current, that every event
type has a channel, that each channel's address is what the subject
functions produce, and that real encoded events validate against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from podium.common import access, events, streams, subjects


@dataclass(frozen=True)
class ChannelDoc:
    """One subject pattern and the events that travel on it."""

    key: str
    address: str
    #: The wildcard subject it falls under (what the roles' sends/receives name).
    wildcard: str
    events: tuple[type[events.Event], ...]
    description: str
    parameters: dict[str, str]
    stream: str = ""


CHANNELS: tuple[ChannelDoc, ...] = (
    ChannelDoc(
        "inbound",
        "inbound.{channel}.{conversation}",
        subjects.INBOUND_ALL,
        (events.InboundMessage,),
        "A message from the outside world. The stream stores it as "
        "`inbound.{channel}.{conversation}.{partition}` (conductor partition, "
        f"FNV-1a of the conversation modulo {streams.PARTITIONS}).",
        {"channel": "email, sms or api", "conversation": "conversation id"},
        streams.INBOUND.name,
    ),
    ChannelDoc(
        "task",
        "tasks.{task}",
        subjects.TASKS_ALL,
        (events.TaskRequested,),
        "A new task for a worker.",
        {"task": "task id"},
        streams.TASKS.name,
    ),
    ChannelDoc(
        "taskFollowup",
        "tasks.{task}.followup",
        subjects.TASKS_ALL,
        (events.TaskFollowup,),
        "The conductor tells a worker something about its task (TELL_WORKER).",
        {"task": "task id"},
        streams.TASKS.name,
    ),
    ChannelDoc(
        "result",
        "results.{conversation}.{task}",
        subjects.RESULTS_ALL,
        (events.TaskResult, events.TaskProgress),
        "A worker's progress and results. Stored as `results.{conversation}.{task}.{partition}`.",
        {"conversation": "conversation id", "task": "task id"},
        streams.RESULTS.name,
    ),
    ChannelDoc(
        "deliveryReport",
        "results.{conversation}.{command}",
        subjects.RESULTS_ALL,
        (events.DeliveryFailed,),
        "A command the notifier (or a provider's status callback) could not deliver, told "
        "to the conductor in the conversation's partition. Stored as "
        "`results.{conversation}.{command}.{partition}`.",
        {"conversation": "conversation id", "command": "command id"},
        streams.RESULTS.name,
    ),
    ChannelDoc(
        "emailCommand",
        "commands.email.{conversation}",
        subjects.COMMANDS_ALL,
        (events.SendEmail,),
        "Send one email; `command_id` makes it idempotent (notifier outbox).",
        {"conversation": "conversation id"},
        streams.COMMANDS.name,
    ),
    ChannelDoc(
        "smsCommand",
        "commands.sms.{conversation}",
        subjects.COMMANDS_ALL,
        (events.SendSms,),
        "Send one SMS; `command_id` makes it idempotent.",
        {"conversation": "conversation id"},
        streams.COMMANDS.name,
    ),
    ChannelDoc(
        "apiCommand",
        "commands.api.{conversation}",
        subjects.COMMANDS_ALL,
        (events.ApiReply,),
        "Deliver a reply to an API client's thread; `command_id` makes it idempotent.",
        {"conversation": "conversation id"},
        streams.COMMANDS.name,
    ),
    ChannelDoc(
        "kill",
        "control.tasks.{task}.kill",
        subjects.KILL_ALL,
        (events.KillTask,),
        "Core NATS (not stored): whichever worker runs the task stops it.",
        {"task": "task id"},
    ),
    ChannelDoc(
        "deadLetter",
        "deadletter.{service}.{stream}",
        subjects.DEADLETTER_ALL,
        (events.DeadLetter,),
        "A message a service could never handle, kept for operators (`podium replay`).",
        {"service": "the service that gave up", "stream": "the stream the message came from"},
        streams.DEADLETTER.name,
    ),
)

HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        subjects.HDR_EVENT_TYPE: {"type": "string", "description": "The event's `type` tag."},
        subjects.HDR_SCHEMA: {
            "type": "string",
            "description": f"Schema version of the payload (now {events.SCHEMA_VERSION}).",
        },
        subjects.HDR_CORRELATION: {
            "type": "string",
            "description": "Id of the inbound event that started the work.",
        },
        subjects.HDR_MSG_ID: {
            "type": "string",
            "description": "JetStream de-duplication key: the event id (a replay gets a new one "
            "and keeps the event id, see docs/operations.md).",
        },
    },
    "required": [subjects.HDR_EVENT_TYPE, subjects.HDR_SCHEMA, subjects.HDR_MSG_ID],
}


def _event_types() -> list[type[events.Event]]:
    return [t for c in CHANNELS for t in c.events]


def _tag(t: type[events.Event]) -> str:
    return str(t.__struct_config__.tag)


def render_document() -> dict[str, Any]:
    """The AsyncAPI document as a dict."""
    event_types = list(dict.fromkeys(_event_types()))
    _, schemas = msgspec.json.schema_components(
        event_types, ref_template="#/components/schemas/{name}"
    )
    schemas["PodiumHeaders"] = HEADERS_SCHEMA
    messages = {
        t.__name__: {
            "name": _tag(t),
            "title": t.__name__,
            "summary": (t.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/PodiumHeaders"},
            "payload": {"$ref": f"#/components/schemas/{t.__name__}"},
        }
        for t in event_types
    }
    channels: dict[str, Any] = {}
    for c in CHANNELS:
        entry: dict[str, Any] = {
            "address": c.address,
            "description": c.description + (f" Stream `{c.stream}`." if c.stream else ""),
            "parameters": {name: {"description": d} for name, d in c.parameters.items()},
            "messages": {
                t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in c.events
            },
        }
        channels[c.key] = entry
    operations: dict[str, Any] = {}
    for role in access.SERVICES.values():
        for action, wildcards in (("send", role.sends), ("receive", role.receives)):
            for c in CHANNELS:
                if c.wildcard not in wildcards:
                    continue
                operations[f"{role.user}.{action}.{c.key}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{c.key}"},
                    "summary": f"{role.user} {action}s {c.address}",
                    "messages": [
                        {"$ref": f"#/channels/{c.key}/messages/{t.__name__}"} for t in c.events
                    ],
                }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Podium bus",
            "version": str(events.SCHEMA_VERSION),
            "description": "Events Podium's four services exchange over NATS JetStream. "
            "Generated from libs/common (events, subjects, access) by `podium generate`; "
            "do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "nats:4222",
                "protocol": "nats",
                "description": f"NATS with JetStream; account {access.ACCOUNT}, one user per "
                "service (deploy/nats/accounts.conf).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def render() -> str:
    """``docs/asyncapi.yaml``."""
    import yaml  # noqa: PLC0415 - only the generator needs it

    header = "# Generated by `podium generate` from libs/common: do not edit.\n"
    body: str = yaml.safe_dump(render_document(), sort_keys=False, allow_unicode=True, width=100)
    return header + body
