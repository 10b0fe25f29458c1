"""The one map of Podium's bus: every channel and every bucket, who writes and who reads.

Each :class:`ChannelSpec` says what travels where: its subject template, the event
types on it, the stream that stores it (or core NATS), and which services
produce and consume it. Each :class:`BucketSpec` entry of :data:`BUCKETS` says which
service owns a KV bucket or object store (the only one that writes it) and which
others may read it. Everything else derives from here:

- the subject functions of :mod:`podium.contracts.subjects` fill these templates;
- each stream's subjects are the namespaces of its channels
  (:func:`stream_subjects`, used by :mod:`podium.contracts.streams`);
- the NATS permissions of :mod:`podium.contracts.access` (a service may publish
  only what it produces and write only what it owns, and the server enforces it);
- the AsyncAPI document (``podium generate``).

``tests/test_access.py`` connects as each service to a real nats-server with
those permissions and checks that every bucket refuses writes from all but its
owner; the end-to-end tests run the services under the same permissions, so a
service that writes state it does not own fails there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from podium.contracts import events

Role = Literal["ingress", "conductor", "worker", "notifier", "console"]
#: Where operators' tools (``podium replay``, the NATS CLI) stand: the admin user.
OPERATORS: Literal["operators"] = "operators"
SERVICES: tuple[Role, ...] = ("ingress", "conductor", "worker", "notifier", "console")
#: Services that may put a dead letter through again (``podium replay``'s way): they
#: publish to the subjects of every stream a service consumes.
REPLAYERS: tuple[Role, ...] = ("console",)

_PARAM = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class ChannelSpec:
    """One subject pattern, the events on it, where it is stored, who sends and reads it."""

    key: str
    #: Subject template; each ``{name}`` is one token (see ``subjects.token``).
    address: str
    events: tuple[type[events.Event], ...]
    producers: tuple[Role, ...]
    consumers: tuple[Role | Literal["operators"], ...]
    description: str
    parameters: dict[str, str] = field(default_factory=dict)
    #: The JetStream stream that stores it; "" for core NATS (not stored).
    stream: str = ""
    #: A parameter each producer fills with its own name (``deadletter.{service}…``).
    producer_param: str = ""
    #: Its producers read back what they stored (the API compares a reused
    #: Idempotency-Key's message with the stored one).
    readback: bool = False
    #: Services that read the stored channel without consuming it (ordered consumers:
    #: the console's timeline).
    readers: tuple[Role, ...] = ()
    #: Parameters whose producers may use only these values (``{channel}`` of inbound:
    #: email, sms, api — not ``operator``, which only the console publishes).
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def producer_subjects(self, producer: str) -> tuple[str, ...]:
        """The subjects ``producer`` may publish on: :meth:`wildcard`, with each parameter
        of :attr:`choices` spelled out."""
        subjects = [self.wildcard(producer)]
        for name, values in self.choices.items():
            index = self.address.split(".").index(f"{{{name}}}")
            subjects = [
                ".".join([*s.split(".")[:index], value, *s.split(".")[index + 1 :]])
                for s in subjects
                for value in values
            ]
        return tuple(subjects)

    def wildcard(self, producer: str = "") -> str:
        """The subject filter of every subject of this channel (one producer's, if asked)."""

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            return producer if producer and name == self.producer_param else "*"

        return _PARAM.sub(fill, self.address)

    @property
    def namespace(self) -> str:
        """The first token: a stream holds whole namespaces (``inbound.>``)."""
        return self.address.split(".", 1)[0]


@dataclass(frozen=True)
class BucketSpec:
    """Who owns a KV bucket or object store, and who else may read it."""

    name: str
    kind: Literal["kv", "object"]
    #: The services that write it. Several owners of a KV bucket each write only
    #: keys under their own name (``sessions``: ``conductor.<key>``, ``worker.<key>``).
    owners: tuple[Role, ...]
    readers: tuple[Role, ...] = ()
    #: Owners that list its keys (an ordered consumer on the bucket's stream).
    lists_keys: bool = False
    #: Readers that list (and watch) its keys.
    listers: tuple[Role, ...] = ()

    @property
    def shared(self) -> bool:
        """Whether several services own it, each its own keys."""
        return len(self.owners) > 1


INBOUND = ChannelSpec(
    "inbound",
    "inbound.{channel}.{conversation}",
    (events.InboundMessage,),
    producers=("ingress",),
    consumers=("conductor",),
    description="A message from the outside world. The stream stores it as "
    "`inbound.{channel}.{conversation}.{partition}` (its conductor partition).",
    parameters={"channel": "email, sms or api", "conversation": "conversation id"},
    stream="INBOUND",
    readback=True,
    readers=("console",),
    choices={"channel": ("email", "sms", "api")},
)
TASK = ChannelSpec(
    "task",
    "tasks.{task}",
    (events.TaskRequested,),
    producers=("conductor",),
    consumers=("worker",),
    description="A new task for a worker.",
    parameters={"task": "task id"},
    stream="TASKS",
)
TASK_FOLLOWUP = ChannelSpec(
    "taskFollowup",
    "tasks.{task}.followup",
    (events.TaskFollowup,),
    producers=("conductor",),
    consumers=("worker",),
    description="The conductor tells a worker something about its task (TELL_WORKER).",
    parameters={"task": "task id"},
    stream="TASKS",
)
TASK_CANCEL = ChannelSpec(
    "taskCancel",
    "tasks.{task}.cancel",
    (events.KillTask,),
    producers=("conductor",),
    consumers=("worker",),
    description="A kill, stored: the worker that takes it records the cancel in the task's "
    "state (so a task not started yet never runs) and says it again on core NATS.",
    parameters={"task": "task id"},
    stream="TASKS",
)
RESULT = ChannelSpec(
    "result",
    "results.{conversation}.{task}",
    (events.TaskResult, events.TaskProgress),
    producers=("worker",),
    consumers=("conductor",),
    description="A worker's progress and results. Stored as "
    "`results.{conversation}.{task}.{partition}`.",
    parameters={"conversation": "conversation id", "task": "task id"},
    stream="RESULTS",
    readers=("console",),
)
DELIVERY_REPORT = ChannelSpec(
    "deliveryReport",
    "results.{conversation}.{command}",
    (events.DeliveryFailed,),
    producers=("notifier",),
    consumers=("conductor",),
    description="A command the notifier could not deliver (or a provider reported "
    "undelivered), told to the conductor in the conversation's partition. Stored as "
    "`results.{conversation}.{command}.{partition}`.",
    parameters={"conversation": "conversation id", "command": "command id"},
    stream="RESULTS",
    readers=("console",),
)
EMAIL_COMMAND = ChannelSpec(
    "emailCommand",
    "commands.email.{conversation}",
    (events.SendEmail,),
    producers=("conductor",),
    consumers=("notifier",),
    description="Send one email; `command_id` makes it idempotent (notifier outbox).",
    parameters={"conversation": "conversation id"},
    stream="COMMANDS",
    readers=("console",),
)
SMS_COMMAND = ChannelSpec(
    "smsCommand",
    "commands.sms.{conversation}",
    (events.SendSms,),
    producers=("conductor",),
    consumers=("notifier",),
    description="Send one SMS; `command_id` makes it idempotent.",
    parameters={"conversation": "conversation id"},
    stream="COMMANDS",
    readers=("console",),
)
API_COMMAND = ChannelSpec(
    "apiCommand",
    "commands.api.{conversation}",
    (events.ApiReply,),
    producers=("conductor",),
    consumers=("notifier",),
    description="Deliver a reply to an API client's thread; `command_id` makes it idempotent.",
    parameters={"conversation": "conversation id"},
    stream="COMMANDS",
    readers=("console",),
)
DELIVERY_STATUS = ChannelSpec(
    "deliveryStatus",
    "delivery.status.{command}",
    (events.DeliveryStatus,),
    producers=("ingress",),
    consumers=("notifier",),
    description="A provider's status callback for one of our messages, as the ingress "
    "received it; the notifier applies it to the outbox.",
    parameters={"command": "command id"},
    stream="DELIVERY",
)
PREFERENCE = ChannelSpec(
    "recipientPreference",
    "delivery.preference.{conversation}",
    (events.RecipientPreference,),
    producers=("ingress",),
    consumers=("notifier",),
    description="A recipient's STOP or START, as the ingress received it; the notifier "
    "keeps the suppression list.",
    parameters={"conversation": "conversation id"},
    stream="DELIVERY",
)
OPERATOR_COMMAND = ChannelSpec(
    "operatorCommand",
    "inbound.operator.{conversation}",
    (events.OperatorAnswer, events.OperatorKill, events.OperatorClose),
    producers=("console",),
    consumers=("conductor",),
    description="What an operator asks in a conversation (answer an escalation, kill a "
    "task, close it), in order with the conversation's messages: stored and partitioned "
    "like them.",
    parameters={"conversation": "conversation id"},
    stream="INBOUND",
    readers=("console",),
)
TURN = ChannelSpec(
    "turn",
    "turns.{conversation}",
    (events.TurnRecorded,),
    producers=("conductor",),
    consumers=(OPERATORS,),
    description="What each conductor turn was given and answered, the commands carried "
    "out or refused, its tokens and cost: the conversation's timeline for operators.",
    parameters={"conversation": "conversation id"},
    stream="TURNS",
    readers=("console",),
)
AUDIT = ChannelSpec(
    "audit",
    "audit.{action}",
    (events.OperatorAction,),
    producers=("console",),
    consumers=(OPERATORS,),
    description="Every action an operator took in the console, with the operator's name.",
    parameters={"action": "answer, kill, close, replay, login or logout"},
    stream="AUDIT",
    readers=("console",),
)
KILL = ChannelSpec(
    "kill",
    "control.tasks.{task}.kill",
    (events.KillTask,),
    producers=("conductor", "worker"),
    consumers=("worker",),
    description="Core NATS (not stored): whichever worker runs the task stops it.",
    parameters={"task": "task id"},
)
DEAD_LETTER = ChannelSpec(
    "deadLetter",
    "deadletter.{service}.{stream}",
    (events.DeadLetter,),
    # The services that consume streams (the ingress consumes none).
    producers=("conductor", "worker", "notifier"),
    consumers=(OPERATORS,),
    description="A message a service could never handle, kept for operators (`podium replay`).",
    parameters={"service": "the service that gave up", "stream": "the stream it came from"},
    stream="DEADLETTER",
    producer_param="service",
    readers=("console",),
)

CHANNELS: tuple[ChannelSpec, ...] = (
    INBOUND,
    TASK,
    TASK_FOLLOWUP,
    TASK_CANCEL,
    RESULT,
    DELIVERY_REPORT,
    EMAIL_COMMAND,
    SMS_COMMAND,
    API_COMMAND,
    DELIVERY_STATUS,
    PREFERENCE,
    OPERATOR_COMMAND,
    TURN,
    AUDIT,
    KILL,
    DEAD_LETTER,
)

BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec(
        "conversations",
        "kv",
        owners=("conductor",),
        readers=("ingress", "console"),
        # The console lists them (and follows their changes) for its pages.
        listers=("console",),
    ),
    BucketSpec("tasks", "kv", owners=("worker",)),
    BucketSpec("outbox", "kv", owners=("notifier",)),
    BucketSpec("suppressions", "kv", owners=("notifier",)),
    BucketSpec("replies", "kv", owners=("notifier",), readers=("ingress", "console")),
    BucketSpec("conductors", "kv", owners=("conductor",), lists_keys=True),
    BucketSpec("sessions", "kv", owners=("conductor", "worker")),
    # Object names start with the owner's role (``conductor/…``, ``worker/…``); NATS
    # cannot tell an object's name from its subject, so this split is by convention.
    BucketSpec("transcripts", "object", owners=("conductor", "worker")),
    BucketSpec("attachments", "object", owners=("ingress",), readers=("worker",)),
    # The ingress serves download links to them; the notifier attaches them to mail.
    BucketSpec("artifacts", "object", owners=("worker",), readers=("notifier", "ingress")),
)


def stream_subjects(stream: str) -> tuple[str, ...]:
    """A stream's subjects: the namespaces of the channels it stores."""
    found = tuple(dict.fromkeys(f"{c.namespace}.>" for c in CHANNELS if c.stream == stream))
    if not found:
        raise KeyError(f"no channel is stored in stream {stream}")
    return found


def channels_of(stream: str) -> tuple[ChannelSpec, ...]:
    """The channels a stream stores."""
    return tuple(c for c in CHANNELS if c.stream == stream)


def bucket(name: str) -> BucketSpec:
    """The ownership entry of bucket ``name``."""
    for spec in BUCKETS:
        if spec.name == name:
            return spec
    raise KeyError(f"bucket {name} has no owner in the registry")
