"""What the KV buckets hold: conversation state, worker task state, outbox records.

Like events, these are contracts shared by services (the ingress reads a
conversation the conductor writes), so they live here. Evolve them the same
way: append fields with defaults.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from podium.contracts.events import (
    AnyEvent,
    Artifact,
    Channel,
    Media,
    TaskResult,
    TaskStatus,
    utcnow,
)
from podium.contracts.ids import stable_id

TaskState = Literal["queued", "running", "needs_input", "complete", "failed", "cancelled"]

#: The state a task is in once a worker reported ``status`` (the one place for the rule).
STATE_AFTER: dict[TaskStatus, TaskState] = {
    "COMPLETE": "complete",
    "FAILED": "failed",
    "NEEDS_INPUT": "needs_input",
    "CANCELLED": "cancelled",
}
FINISHED: frozenset[str] = frozenset({"complete", "failed", "cancelled"})

# Bounds that keep a long conversation's record small.
MAX_HANDLED = 200
MAX_REFERENCES = 20
MAX_OUTBOUND = 100
#: Files kept for a conversation's tasks, and artifacts it may attach (the newest).
MAX_MEDIA = 50
MAX_ARTIFACTS = 200
#: What the agent was last given, kept verbatim for a rotated session's summary.
MAX_RECENT = 6
MAX_RECENT_CHARS = 3000


class TaskInfo(msgspec.Struct, kw_only=True):
    """A task as the conductor tracks it."""

    task_id: str
    instructions: str
    state: TaskState = "queued"
    summary: str = ""
    #: How many times the conductor has sent the worker back (validation rounds).
    rounds: int = 0
    created_at: datetime = msgspec.field(default_factory=utcnow)
    updated_at: datetime = msgspec.field(default_factory=utcnow)
    #: What the task's turns cost so far, as its results reported.
    cost_usd: float = 0.0
    #: The worker's question while it waits for an answer (``needs_input``).
    question: str = ""


#: Where a conversation stands for operators: ``escalated`` waits for an operator's
#: answer (the console's escalations), ``closed`` was closed by one (no agent turn runs
#: until someone writes again).
ConversationState = Literal["open", "escalated", "closed"]


class Outbound(msgspec.Struct, kw_only=True):
    """A message the conductor asked the notifier to send."""

    command_id: str
    kind: Literal["email", "sms", "api", "operator"]
    to: list[str]
    subject: str = ""
    body: str = ""
    at: datetime = msgspec.field(default_factory=utcnow)


class Pending(msgspec.Struct, kw_only=True):
    """An event a conductor turn decided on and has saved, but perhaps not yet published.

    The turn's decisions are saved with the conversation first and published
    after (a transactional outbox): a crash in between leaves them here, and the
    redelivered event publishes them. So a worker can never report on a task
    the conversation does not know.
    """

    subject: str
    event: AnyEvent
    #: Core NATS (a kill), not JetStream.
    core: bool = False


class Conversation(msgspec.Struct, kw_only=True):
    """One conversation (email thread, SMS number pair, API thread): the conductor's memory."""

    conversation_id: str
    channel: Channel
    #: The conductor agent's session (always the id from the latest result).
    session_id: str = ""
    #: Who we may write to: everyone who wrote to us in this conversation.
    participants: list[str] = []
    #: Where replies go: the latest sender.
    reply_to: str = ""
    #: The address or number they wrote to (our sender for replies).
    our_address: str = ""
    subject: str = ""
    last_message_id: str = ""
    references: list[str] = []
    client: str = ""
    thread_id: str = ""
    #: The request that started the conversation, as the conductor first saw it.
    original_request: str = ""
    tasks: dict[str, TaskInfo] = {}
    outbound: list[Outbound] = []
    #: Problems to tell the conductor agent on its next turn (rejected commands…).
    notes: list[str] = []
    #: Ids of events already handled, so a redelivery never runs a turn twice.
    handled: list[str] = []
    #: Worker results whose task state, cost and failure are counted. Usually the
    #: same as ``handled``; a result no turn could handle is counted without a turn
    #: (and not marked handled, so a replay runs the turn, without counting it again).
    accounted: list[str] = []
    turns: int = 0
    #: Agent spend on this conversation so far (conductor turns and worker tasks).
    spend_usd: float = 0.0
    failed_tasks: int = 0
    escalations: int = 0
    #: Whether an unknown sender has been told (once) that we do not take their work.
    refused: bool = False
    #: Whether the operator has been told (once) of an allowlisted From: that failed
    #: authentication in this conversation.
    spoof_reported: bool = False
    #: Decisions of the last turn not yet confirmed published (see ``Pending``).
    pending: list[Pending] = []
    #: The files people sent in this conversation (bounded), given to each new task.
    media: list[Media] = []
    #: What its workers produced, by ``<task id>/<name>``: what ``ATTACH`` may name.
    artifacts: dict[str, Artifact] = {}
    created_at: datetime = msgspec.field(default_factory=utcnow)
    updated_at: datetime = msgspec.field(default_factory=utcnow)
    state: ConversationState = "open"
    #: Why it was last escalated (what the operator is asked to look at).
    escalation: str = ""
    #: Turns of the current agent session, and the input tokens of its latest turn:
    #: what decides when it is rotated (``PODIUM_ROTATE_*``).
    session_turns: int = 0
    session_input_tokens: int = 0
    rotations: int = 0
    #: The last few blocks the agent was given (messages, worker reports), verbatim.
    recent: list[str] = []


class TaskRecord(msgspec.Struct, kw_only=True):
    """A task as workers track it (``tasks`` bucket)."""

    task_id: str
    conversation_id: str
    correlation_id: str = ""
    state: TaskState = "queued"
    session_id: str = ""
    workdir: str = ""
    #: The task or follow-up event last run to completion, and what it produced.
    last_event_id: str = ""
    last_result: TaskResult | None = None
    cancel_requested: bool = False
    #: What the task asks, to restart it afresh should its session be lost.
    instructions: str = ""
    #: A repository task's branch and pull request (kept across its fix rounds).
    repository: str = ""
    branch: str = ""
    pull_request: int = 0
    pull_request_url: str = ""
    updated_at: datetime = msgspec.field(default_factory=utcnow)


class SessionRecord(msgspec.Struct, kw_only=True):
    """An agent session as every replica sees it (``sessions`` bucket, key ``<role>.<key>``).

    The record is the session's lease (one holder at a time, until
    ``lease_until``) and its history's version: ``generation`` counts the turns
    whose transcript is in the object store, so a replica whose local copy is
    older restores it before resuming.
    """

    key: str
    session_id: str = ""
    generation: int = 0
    holder: str = ""
    #: Unix time after which the lease lapses if the holder has not renewed it.
    lease_until: float = 0.0
    workdir: str = ""
    #: Object names of the stored transcript and workspace archive ("" = none stored).
    transcript: str = ""
    workspace: str = ""
    updated_at: datetime = msgspec.field(default_factory=utcnow)
    #: A small transcript (zlib-compressed) and workspace archive kept in the record
    #: itself; when set, they are the current ones (the named objects are older).
    transcript_inline: bytes = b""
    workspace_inline: bytes = b""


OutboxState = Literal["pending", "sending", "sent", "retry", "failed", "ambiguous"]

#: How far a provider has taken a message, from its status callbacks. A status only
#: ever replaces one of lower rank: callbacks arrive out of order and are retried.
DELIVERY_RANK: dict[str, int] = {
    "accepted": 1,
    "scheduled": 1,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "undelivered": 4,
    "failed": 4,
    "canceled": 4,
    "read": 5,
}
DELIVERY_FAILED: frozenset[str] = frozenset({"undelivered", "failed", "canceled"})


class OutboxRecord(msgspec.Struct, kw_only=True):
    """The notifier's record of one command: sent at most once.

    ``state`` is the notifier's own (``pending`` → ``sending`` → ``sent`` |
    ``retry`` | ``failed`` | ``ambiguous``); ``delivery`` is what the provider
    reported afterwards through status callbacks (``queued`` … ``delivered``,
    ``undelivered``), only ever moving forward (:data:`DELIVERY_RANK`).
    """

    command_id: str
    state: OutboxState
    transport: str
    attempts: int = 1
    provider_id: str = ""
    error: str = ""
    updated_at: datetime = msgspec.field(default_factory=utcnow)
    channel: str = ""
    conversation_id: str = ""
    correlation_id: str = ""
    to: list[str] = []
    #: Provider ids of every part sent (a long SMS goes out in several), in order.
    provider_ids: list[str] = []
    delivery: str = ""
    delivery_error: str = ""
    #: Delivery status of each part, by provider id (status callbacks).
    parts: dict[str, str] = {}
    #: Whether a failure of this command was reported to the conductor, and as what
    #: (a DeliveryFailed outcome: rejected, suppressed, ambiguous, exhausted, undelivered).
    reported: bool = False
    outcome: str = ""


def delivery_of(parts: dict[str, str]) -> str:
    """A whole message's delivery status from its parts' statuses.

    Failed if any part failed; otherwise as far as its slowest part got.
    """
    if not parts:
        return ""
    failed = [status for status in parts.values() if status in DELIVERY_FAILED]
    if failed:
        return failed[0]
    return min(parts.values(), key=lambda status: DELIVERY_RANK.get(status, 0))


SuppressionReason = Literal["opt-out", "provider-opt-out", "invalid-recipient", "hard-bounce"]


class Suppression(msgspec.Struct, kw_only=True):
    """One recipient of the ``suppressions`` bucket (key: :func:`suppression_key`).

    ``suppressed`` is False once they opted back in (START); the record stays
    so the history is visible. ``seen`` keeps the provider ids of the keyword
    messages already applied, so a retried STOP cannot undo a later START.
    """

    channel: Literal["email", "sms"]
    address: str
    suppressed: bool
    reason: str = ""
    keyword: str = ""
    #: Our number or address it was said to (Twilio keeps opt-outs per sender too).
    our_address: str = ""
    source_id: str = ""
    seen: list[str] = []
    updated_at: datetime = msgspec.field(default_factory=utcnow)
    #: When the keyword last applied was received (the fact's time): an older STOP or
    #: START applied late (retried, or by another replica) cannot undo a newer one.
    said_at: datetime | None = None


def suppression_key(channel: str, address: str) -> str:
    """KV key of a recipient: ``sms.<digits>`` (readable), ``email.<hash>`` (addresses hold
    characters KV keys may not)."""
    if channel == "sms":
        digits = "".join(ch for ch in address if ch.isdigit())
        return f"sms.{digits}" if digits else f"sms.h{stable_id(address.strip().lower())}"
    return f"email.{stable_id(address.strip().lower())}"


class FileLink(msgspec.Struct, kw_only=True):
    """An artifact as a reply shows it: a download link that expires."""

    name: str
    size: int
    content_type: str
    url: str
    expires_at: datetime


class ReplyView(msgspec.Struct, kw_only=True):
    """One reply as the API shows it: what went out and how far it got."""

    command_id: str
    kind: Literal["email", "sms", "api"]
    to: list[str] = []
    subject: str = ""
    body: str = ""
    #: The notifier's state (``sending`` … ``sent``, ``failed``, ``ambiguous``).
    delivery: str = "pending"
    #: What the provider reported afterwards (status callbacks), if anything.
    provider_status: str = ""
    #: The artifacts that went with it, with their download links.
    files: list[FileLink] = []
    at: datetime = msgspec.field(default_factory=utcnow)


class ConversationReplies(msgspec.Struct, kw_only=True):
    """The ``replies`` bucket (key: conversation id): a read model kept by the notifier.

    The notifier owns every fact in it (what it sent, and what providers said
    since), so ``GET /v1/conversations/{id}`` reads one record per owner instead
    of joining the conversation with an outbox record per reply.
    """

    conversation_id: str
    replies: list[ReplyView] = []
    updated_at: datetime = msgspec.field(default_factory=utcnow)
