"""Podium's HTTP APIs as data: what the ingress's ``/v1`` and the console's ``/api``
answer and accept, and the OpenAPI 3.1 document made from them (:func:`document`).

The services answer with these structures, the ``podium`` command reads them, and
``podium generate`` writes the document to ``docs/openapi.json`` (a test fails when it
drifts); each service serves it at ``/openapi.json``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from podium.contracts.state import ConversationState, FileLink, TaskState

# --- the ingress's API (bearer tokens of PODIUM_API_TOKENS) ----------------------------


class ApiMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``POST /v1/messages``."""

    text: str
    channel: str = "api"
    thread_id: str = ""
    sender: str = msgspec.field(default="", name="from")
    subject: str = ""


class Accepted(msgspec.Struct, kw_only=True):
    """``202`` to ``POST /v1/messages``: the message is stored and its conversation named."""

    event_id: str
    conversation_id: str
    thread_id: str
    #: The same Idempotency-Key was used before for this message: nothing new was stored.
    duplicate: bool


class TaskSummary(msgspec.Struct, kw_only=True):
    """A task of a conversation, as an API client sees it."""

    task_id: str
    state: TaskState
    summary: str


class Reply(msgspec.Struct, kw_only=True):
    """A reply sent in a conversation, and how far it got."""

    command_id: str
    kind: str
    body: str
    at: datetime
    #: The notifier's state: sending, sent, failed, ambiguous…
    delivery: str
    #: What the provider reported afterwards (status callbacks), if anything.
    provider_status: str
    #: The files that went with it, as download links.
    files: list[FileLink] = []


class ConversationView(msgspec.Struct, kw_only=True):
    """``GET /v1/conversations/{conversation_id}``: an API conversation's state."""

    conversation_id: str
    thread_id: str
    channel: str
    turns: int
    tasks: list[TaskSummary]
    replies: list[Reply]


# --- the console's API (operator tokens, or a signed-in session) ------------------------


class ConversationSummary(msgspec.Struct, kw_only=True):
    """One conversation, as the conversations page lists it."""

    conversation_id: str
    channel: str
    participants: list[str]
    subject: str
    #: The start of the first request (one line), for lists.
    preview: str = ""
    state: ConversationState
    #: Why it is escalated ("" when it is not).
    escalation: str = ""
    open_tasks: int
    tasks: int
    turns: int
    last_activity: datetime
    spend_usd: float
    over_limit: bool = False


class ConversationList(msgspec.Struct, kw_only=True):
    """``GET /api/conversations`` (and ``/api/escalations``)."""

    conversations: list[ConversationSummary]
    #: How many conversations there are in all (before filters).
    total: int


class Section(msgspec.Struct, kw_only=True):
    """A labelled block of text in a timeline entry (a body, a prompt, an answer)."""

    label: str
    text: str


TimelineKind = Literal[
    "inbound", "operator", "turn", "task", "progress", "result", "outbound", "undelivered"
]


class TimelineEntry(msgspec.Struct, kw_only=True):
    """One thing that happened in a conversation, as stored on the bus."""

    at: datetime
    kind: TimelineKind
    title: str
    #: Short facts (sender authentication, tokens, cost, delivery state…).
    facts: dict[str, str] = {}
    #: Lines of a list (commands carried out, refusals, files).
    items: list[str] = []
    sections: list[Section] = []


class TaskView(msgspec.Struct, kw_only=True):
    """A task, as the conductor tracks it."""

    task_id: str
    conversation_id: str
    state: TaskState
    instructions: str
    summary: str
    cost_usd: float
    created_at: datetime
    updated_at: datetime


class ConversationDetail(msgspec.Struct, kw_only=True):
    """``GET /api/conversations/{conversation_id}``: one conversation and its timeline."""

    conversation: ConversationSummary
    original_request: str
    tasks: list[TaskView]
    timeline: list[TimelineEntry]


class TaskList(msgspec.Struct, kw_only=True):
    """``GET /api/tasks``."""

    tasks: list[TaskView]


class DeadLetterView(msgspec.Struct, kw_only=True):
    """A message a service could never handle, kept in DEADLETTER."""

    seq: int
    at: datetime
    service: str
    stream: str
    stream_seq: int
    subject: str
    deliveries: int
    reason: str
    conversation_id: str


class DeadLetterDetail(msgspec.Struct, kw_only=True):
    """``GET /api/dead-letters/{seq}``: a dead letter with what it carried."""

    dead_letter: DeadLetterView
    headers: dict[str, str]
    payload: str
    payload_encoding: str


class DeadLetterList(msgspec.Struct, kw_only=True):
    """``GET /api/dead-letters`` (the newest first)."""

    dead_letters: list[DeadLetterView]


class Amount(msgspec.Struct, kw_only=True):
    """Spend under one key: a day, a sender, a conversation."""

    key: str
    usd: float
    #: For a conversation: over the conductor's spend limit.
    over_limit: bool = False


class SpendView(msgspec.Struct, kw_only=True):
    """``GET /api/spend``: agent spend against the limits."""

    limit_per_conversation_usd: float
    total_usd: float
    by_day: list[Amount]
    by_sender: list[Amount]
    by_conversation: list[Amount]


class AnswerRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /api/conversations/{conversation_id}/answer``."""

    text: str


class CloseRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /api/conversations/{conversation_id}/close``."""

    reason: str = ""


class KillRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /api/tasks/{task_id}/kill``."""

    reason: str = ""


class ActionResult(msgspec.Struct, kw_only=True):
    """What an action did: the event it published (the conductor carries it out)."""

    ok: bool
    event_id: str
    detail: str = ""


class Problem(msgspec.Struct, kw_only=True):
    """An error: ``{"error": {"code", "message"}}``, as the ingress answers them."""

    code: str
    message: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """The body of every error answer."""

    error: Problem


# --- the document -------------------------------------------------------------------------


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """One operation of the document."""

    method: str
    path: str
    summary: str
    tag: Literal["ingress", "console"]
    response: type[Any] | None
    status: int = 200
    request: type[Any] | None = None
    query: tuple[str, ...] = ()
    idempotent_key: bool = False
    content_type: str = "application/json"


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        method="post", path="/v1/messages", tag="ingress", request=ApiMessage,
        response=Accepted, status=202, idempotent_key=True,
        summary="Send a message (stored before the 202; the reply comes as a conversation's "
        "reply)",
    ),
    Operation(
        method="get", path="/v1/conversations/{conversation_id}", tag="ingress",
        response=ConversationView, summary="An API conversation's tasks and replies",
    ),
    Operation(
        method="get", path="/v1/files/{token}", tag="ingress", response=None,
        content_type="application/octet-stream",
        summary="A file a reply linked to (a signed link that expires: 410 once it has)",
    ),
    Operation(
        method="get", path="/api/conversations", tag="console", response=ConversationList,
        query=("state", "channel", "q"), summary="Conversations, most recently active first",
    ),
    Operation(
        method="get", path="/api/conversations/{conversation_id}", tag="console",
        response=ConversationDetail, summary="A conversation, its tasks and its timeline",
    ),
    Operation(
        method="post", path="/api/conversations/{conversation_id}/answer", tag="console",
        request=AnswerRequest, response=ActionResult, status=202, idempotent_key=True,
        summary="Answer a conversation: the conductor's next turn gets it as [OPERATOR]",
    ),
    Operation(
        method="post", path="/api/conversations/{conversation_id}/close", tag="console",
        request=CloseRequest, response=ActionResult, status=202, idempotent_key=True,
        summary="Close a conversation (its open tasks are killed)",
    ),
    Operation(
        method="get", path="/api/tasks", tag="console", response=TaskList,
        summary="Every task, most recently changed first",
    ),
    Operation(
        method="post", path="/api/tasks/{task_id}/kill", tag="console", request=KillRequest,
        response=ActionResult, status=202, idempotent_key=True, summary="Kill a running task",
    ),
    Operation(
        method="get", path="/api/escalations", tag="console", response=ConversationList,
        summary="Conversations waiting for an operator",
    ),
    Operation(
        method="get", path="/api/dead-letters", tag="console", response=DeadLetterList,
        summary="Dead letters, newest first",
    ),
    Operation(
        method="get", path="/api/dead-letters/{seq}", tag="console", response=DeadLetterDetail,
        summary="A dead letter and what it carried",
    ),
    Operation(
        method="post", path="/api/dead-letters/{seq}/replay", tag="console",
        response=ActionResult, status=202, summary="Put a dead letter through again",
    ),
    Operation(
        method="get", path="/api/spend", tag="console", response=SpendView,
        summary="Agent spend by day, sender and conversation, against the limits",
    ),
)  # fmt: skip


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ingress's and the console's HTTP APIs."""
    types = {t for op in OPERATIONS for t in (op.request, op.response) if t is not None}
    types.add(ErrorBody)
    ordered = sorted(types, key=lambda t: t.__name__)
    _, components = msgspec.json.schema_components(
        ordered, ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Podium",
            "version": "1",
            "description": "The ingress's API (`/v1`, bearer tokens of PODIUM_API_TOKENS) and "
            "the console's (`/api`, an operator's token or a signed-in session).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiToken": {"type": "http", "scheme": "bearer"},
                "operatorToken": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "podium_console"},
            },
        },
    }


def _operation(op: Operation) -> dict[str, Any]:
    def ref(kind: type[Any]) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{kind.__name__}"}

    errors = {"content": {"application/json": {"schema": ref(ErrorBody)}}}
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_parameters(op.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in op.query
    ]
    if op.idempotent_key:
        parameters.append(
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "maxLength": 200}}
        )  # fmt: skip
    ok: dict[str, Any] = {"description": "OK"}
    if op.response is not None:
        ok["content"] = {op.content_type: {"schema": ref(op.response)}}
    else:
        ok["content"] = {op.content_type: {"schema": {"type": "string", "format": "binary"}}}
    found: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": parameters,
        "responses": {
            str(op.status): ok,
            "4XX": {"description": "Refused", **errors},
            "5XX": {"description": "Not stored now: retry", **errors},
        },
        "security": (
            [{"apiToken": []}] if op.tag == "ingress" else [{"operatorToken": []}, {"session": []}]
        ),
    }
    if op.path.startswith("/v1/files/"):
        found["security"] = []
    if op.request is not None:
        found["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(op.request)}},
        }
    return found


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
