"""Every event on Podium's bus, as msgspec Structs.

Events are JSON on the wire (readable with ``nats stream view``) and form one
tagged union, :data:`AnyEvent`, discriminated by the ``type`` field and decoded
by the single module-level :data:`DECODER`. Schema evolution: append fields
with defaults, never rename or retype one; ``SCHEMA_VERSION`` goes into the
``Podium-Schema`` header, and ``tests/test_events.py`` keeps payloads written
by earlier versions decoding.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, TypedDict

import msgspec

SCHEMA_VERSION = 1

Channel = Literal["email", "sms", "api"]
CHANNELS: tuple[Channel, ...] = ("email", "sms", "api")

TaskStatus = Literal["COMPLETE", "FAILED", "NEEDS_INPUT", "CANCELLED"]


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Fields every event carries.

    ``event_id`` is unique per logical event and doubles as the JetStream
    ``Nats-Msg-Id``; ``correlation_id`` follows one request through every hop
    (it is the id of the inbound event that started it all).
    """

    event_id: str
    correlation_id: str
    conversation_id: str
    at: datetime = msgspec.field(default_factory=utcnow)


class EventIds(TypedDict):
    """The id fields of an event, to pass on to the events it causes (``**ids``)."""

    event_id: str
    correlation_id: str
    conversation_id: str


class Media(msgspec.Struct, frozen=True, kw_only=True):
    """An attachment or MMS media item, referenced by URL or stored object name."""

    url: str = ""
    content_type: str = ""
    filename: str = ""
    size: int = 0
    #: Name in the ``attachments`` object store ("" = not stored, see ``note``).
    object: str = ""
    #: Why an attachment was not stored (over the size limit…), or "".
    note: str = ""


class Artifact(msgspec.Struct, frozen=True, kw_only=True):
    """A file a worker left under ``outputs/``, stored by the platform (not the agent) in
    the ``artifacts`` object store; the conductor attaches it with ``ATTACH: <ref>``."""

    task_id: str
    #: Its path under ``outputs/`` (``report.csv``, ``charts/q3.png``).
    name: str
    size: int
    content_type: str
    sha256: str
    #: Name in the ``artifacts`` object store.
    object: str

    @property
    def ref(self) -> str:
        """``<task id>/<name>``: how prompts and ``ATTACH`` name it."""
        return f"{self.task_id}/{self.name}"


class InboundMessage(Event, frozen=True, kw_only=True, tag="inbound.message"):
    """A message from the outside world (email, SMS or API), as ingress received it."""

    channel: Channel
    sender: str
    recipients: list[str] = []
    subject: str = ""
    text: str
    # The provider's own id: email Message-ID, Twilio MessageSid, API Idempotency-Key.
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = []
    media: list[Media] = []
    # API clients: the name of the token used and the client's thread id.
    client: str = ""
    thread_id: str = ""
    #: An email's ``From:`` as the ingress judged it from the provider's SPF and DKIM
    #: verdicts (DMARC alignment): "pass", "fail" or "none" (no verdicts posted). ""
    #: for the channels authenticated otherwise (API tokens, Twilio signatures).
    sender_auth: str = ""
    sender_auth_detail: str = ""


class TaskRequested(Event, frozen=True, kw_only=True, tag="task.requested"):
    """The conductor asks a worker to do a piece of work."""

    task_id: str
    instructions: str
    original_request: str = ""
    timeout_s: float = 0.0
    #: The conversation's files (email attachments, MMS media), placed under ``inputs/``
    #: in the task's directory when it starts; those not stored carry a ``note``.
    inputs: list[Media] = []
    #: The repository (``PODIUM_REPOSITORIES_FILE``) the task runs in, on its own branch.
    repository: str = ""


class TaskFollowup(Event, frozen=True, kw_only=True, tag="task.followup"):
    """The conductor tells a worker something about a task (an answer, a fix to make)."""

    task_id: str
    message: str
    timeout_s: float = 0.0


class TaskResult(Event, frozen=True, kw_only=True, tag="task.result"):
    """What a worker reports after a turn on a task."""

    task_id: str
    status: TaskStatus
    summary: str
    details: str = ""
    # False when the agent did not end with the Status/Summary/Details report.
    structured: bool = True
    session_id: str = ""
    cost_usd: float = 0.0
    duration_ms: int = 0
    # The task or follow-up event this result answers.
    answers: str = ""
    #: Every file under the task's ``outputs/`` after this turn, as stored.
    artifacts: list[Artifact] = []
    #: Files under ``outputs/`` not kept, each with why ("big.iso: over the … limit").
    left_out: list[str] = []
    #: What the platform checked itself, as ``Name: value`` lines (``Branch: …``,
    #: ``Diff: …``, ``Check: passed``, ``Pull request: <url>``), not the agent's claim.
    facts: list[str] = []


class TaskProgress(Event, frozen=True, kw_only=True, tag="task.progress"):
    """A worker says how a task is going (it started; later, partial results)."""

    task_id: str
    note: str
    #: The task or follow-up event this progress belongs to.
    answers: str = ""


class SendEmail(Event, frozen=True, kw_only=True, tag="command.email"):
    """Send one email. ``command_id`` makes the send idempotent."""

    command_id: str
    to: list[str]
    subject: str
    body: str
    in_reply_to: str = ""
    references: list[str] = []
    #: An escalation to the operator, not a reply to the conversation's people: the
    #: API's read model of a conversation's replies leaves it out.
    operator: bool = False
    #: Artifacts to send with it: MIME parts, or download links past the size limit.
    attachments: list[Artifact] = []


class SendSms(Event, frozen=True, kw_only=True, tag="command.sms"):
    """Send one SMS (the transport splits long text)."""

    command_id: str
    to: str
    body: str
    sender: str = ""
    #: Artifacts to send with it, as download links in the text.
    attachments: list[Artifact] = []


class ApiReply(Event, frozen=True, kw_only=True, tag="command.api"):
    """Deliver a reply to an API client's thread."""

    command_id: str
    client: str
    thread_id: str
    body: str
    #: Artifacts to send with it, listed with download links in the replies read model.
    attachments: list[Artifact] = []


DeliveryOutcome = Literal["rejected", "suppressed", "ambiguous", "exhausted", "undelivered"]


class DeliveryFailed(Event, frozen=True, kw_only=True, tag="delivery.failed"):
    """A command the notifier could not deliver, told to the conductor.

    Published on ``results.<conversation>.<command_id>`` so it reaches the
    conductor replica that owns the conversation, in order with its worker
    results. ``outcome``: ``rejected`` (the provider refused for good: invalid
    number or address), ``suppressed`` (the recipient opted out or hard-bounced;
    nothing was sent), ``ambiguous`` (it may have gone out; not retried),
    ``exhausted`` (transient failures until the retries ran out),
    ``undelivered`` (accepted, then reported failed by a status callback).
    """

    command_id: str
    channel: Literal["email", "sms", "api"]
    to: list[str] = []
    outcome: DeliveryOutcome
    reason: str = ""
    #: The provider's error code when there is one (Twilio 21610, SMTP 550…).
    provider_code: str = ""
    transport: str = ""


class DeliveryStatus(Event, frozen=True, kw_only=True, tag="delivery.status"):
    """A provider's status callback for one part of a message we sent, as received.

    A fact the ingress records (Twilio's ``MessageStatus``): the notifier, which owns
    the outbox, applies it to the command's record and reports a failure to the
    conductor. ``conversation_id`` is empty: the callback names only the command.
    """

    command_id: str
    channel: Literal["email", "sms"]
    provider_id: str
    status: str
    error_code: str = ""
    #: The recipient and our number as the provider reports them.
    to: str = ""
    our_address: str = ""


class RecipientPreference(Event, frozen=True, kw_only=True, tag="delivery.preference"):
    """A recipient said STOP or START (an SMS keyword), as the ingress received it.

    The notifier, owner of the suppression list, applies it: never text an
    opted-out number until it opts back in. ``source_id`` is the provider's id
    of the keyword message, so a retried STOP cannot undo a later START.
    """

    channel: Literal["email", "sms"]
    address: str
    opted_out: bool
    keyword: str = ""
    our_address: str = ""
    source_id: str


class KillTask(Event, frozen=True, kw_only=True, tag="control.kill"):
    """Stop a task's agent wherever it runs (core NATS, not stored)."""

    task_id: str
    reason: str = ""


class DeadLetter(Event, frozen=True, kw_only=True, tag="deadletter"):
    """A message that could never be handled, kept for an operator to inspect."""

    service: str
    stream: str
    consumer: str
    subject: str
    stream_seq: int
    deliveries: int
    reason: str
    headers: dict[str, str] = {}
    # The original payload, as text when it was UTF-8, otherwise base64 (see encoding).
    payload: str = ""
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"


class TurnRecorded(Event, frozen=True, kw_only=True, tag="conductor.turn"):
    """What one conductor turn was given and answered, and what came of it: the
    conversation's timeline for operators (``turns.<conversation>``)."""

    #: What started the turn: email, sms, api, worker or operator.
    trigger: str
    #: The event the turn answered.
    trigger_event_id: str
    #: The block the agent was given, and its answer (both cut at 8 KB).
    prompt: str
    answer: str
    #: Commands carried out (``SPAWN_WORKER t1a2b3``, ``REPLY``…) and refused, with why.
    commands: list[str] = []
    refused: list[str] = []
    escalations: list[str] = []
    outcome: str = "ok"
    duration_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    #: Why this turn began a new agent session (``turns``, ``input_tokens``,
    #: ``session_lost``); empty when it went on with the conversation's session.
    new_session: str = ""


class OperatorAnswer(Event, frozen=True, kw_only=True, tag="operator.answer"):
    """An operator answers an escalated conversation: the conductor's next turn gets it
    as an ``[OPERATOR]`` block, and the agent carries on."""

    operator: str
    text: str


class OperatorKill(Event, frozen=True, kw_only=True, tag="operator.kill"):
    """An operator stops a task; the conductor, which owns the conversation, kills it."""

    operator: str
    task_id: str
    reason: str = ""


class OperatorClose(Event, frozen=True, kw_only=True, tag="operator.close"):
    """An operator closes a conversation: its open tasks are killed, no agent turn runs
    until someone writes again."""

    operator: str
    reason: str = ""


class OperatorAction(Event, frozen=True, kw_only=True, tag="operator.action"):
    """What an operator did in the console, kept for audit (``audit.<action>``)."""

    operator: str
    action: Literal["answer", "kill", "close", "replay", "login", "logout"]
    #: What it was done to: a task id, a dead letter's sequence, the conversation.
    target: str = ""
    detail: str = ""


AnyEvent = (
    InboundMessage
    | TaskRequested
    | TaskFollowup
    | TaskResult
    | TaskProgress
    | SendEmail
    | SendSms
    | ApiReply
    | KillTask
    | DeadLetter
    | DeliveryFailed
    | DeliveryStatus
    | RecipientPreference
    | TurnRecorded
    | OperatorAnswer
    | OperatorKill
    | OperatorClose
    | OperatorAction
)
#: What an operator asks of the conductor, in a conversation's order (INBOUND).
OperatorCommand = OperatorAnswer | OperatorKill | OperatorClose

Command = SendEmail | SendSms | ApiReply

DECODER = msgspec.json.Decoder(AnyEvent)
ENCODER = msgspec.json.Encoder()


def encode(event: Event) -> bytes:
    """The JSON bytes of ``event`` (its ``type`` tag included)."""
    return ENCODER.encode(event)


def decode(data: bytes) -> AnyEvent:
    """Decode any Podium event; raises ``msgspec.DecodeError`` / ``ValidationError``."""
    event: AnyEvent = DECODER.decode(data)
    return event


def event_type(event: Event) -> str:
    """The tag of an event's class (the value of its ``type`` field)."""
    tag = type(event).__struct_config__.tag
    return str(tag)
