"""The JSON API: ``POST /v1/messages`` and ``GET /v1/conversations/{id}`` (bearer tokens)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from podium.contracts import streams, subjects
from podium.contracts.events import InboundMessage, decode
from podium.contracts.http import (
    Accepted,
    ApiMessage,
    ConversationView,
    Reply,
    TaskSummary,
    document,
)
from podium.contracts.ids import conversation_id, new_id, stable_id
from podium.ingress import auth
from podium.ingress.base import MAX_TEXT, Deps, HttpError, Route, RouteTable

MAX_IDEMPOTENCY_KEY = 255


class ApiRoutes(Route):
    """The API's routes."""

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.tokens = deps.settings.tokens()

    def routes(self) -> RouteTable:
        """``POST /v1/messages``, ``GET /v1/conversations/{conversation_id}``."""
        return [
            ("POST", "/v1/messages", "api", self.api_message),
            ("GET", "/v1/conversations/{conversation_id}", "api_get", self.api_get),
            ("GET", "/openapi.json", "openapi", self.openapi),
        ]

    def client(self, request: web.Request) -> str:
        client = auth.bearer_client(request.headers.get("Authorization", ""), self.tokens)
        if client is None:
            raise HttpError(401, "unauthorized", "missing or invalid bearer token")
        return client

    async def api_message(self, request: web.Request) -> web.Response:
        """``POST /v1/messages``: a message from an API client."""
        client = self.client(request)
        raw = await self.read_limited(request, self.deps.settings.api_max_bytes)
        try:
            body = msgspec.json.decode(raw, type=ApiMessage)
        except msgspec.ValidationError as err:
            raise HttpError(422, "invalid", str(err)) from err
        except msgspec.DecodeError as err:
            raise HttpError(400, "malformed_json", f"body is not valid JSON: {err}") from err
        if body.channel != "api":
            raise HttpError(
                422,
                "unknown_channel",
                f"channel {body.channel!r} is not accepted here; only 'api' (email and SMS "
                "arrive through their webhooks)",
            )
        if not body.text.strip():
            raise HttpError(422, "invalid", "text must not be empty")
        if len(body.text) > MAX_TEXT:
            raise HttpError(413, "too_large", f"text over {MAX_TEXT} characters")
        key = request.headers.get("Idempotency-Key", "")
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise HttpError(400, "invalid_idempotency_key", "Idempotency-Key is too long")
        if not _is_utf8(key):
            raise HttpError(400, "invalid_idempotency_key", "Idempotency-Key is not UTF-8")
        event_id = stable_id("api", client, key) if key else new_id()
        thread = body.thread_id or event_id
        if len(thread) > 200:
            raise HttpError(422, "invalid", "thread_id is too long")
        conversation = conversation_id("api", client, thread)
        event = InboundMessage(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            channel="api",
            sender=body.sender or client,
            subject=body.subject,
            text=body.text,
            message_id=key,
            client=client,
            thread_id=thread,
        )
        stored = await self.store(subjects.inbound("api", conversation), event)
        if stored.duplicate and not await self._same_as_stored(event, stored.seq):
            raise HttpError(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different message",
            )
        accepted = Accepted(
            event_id=event_id,
            conversation_id=conversation,
            thread_id=thread,
            duplicate=stored.duplicate,
        )
        return _json(accepted, status=202)

    async def api_get(self, request: web.Request) -> web.Response:
        """``GET /v1/conversations/{id}``: a conversation's state, tasks and replies."""
        client = self.client(request)
        conversation_key = request.match_info["conversation_id"]
        store = self.deps.conversations
        found = None
        if store is not None:
            try:
                subjects.token(conversation_key)
            except ValueError as err:
                raise HttpError(404, "not_found", "no such conversation") from err
            found = await store.get(conversation_key)
        # Another client's conversation looks exactly like a missing one.
        if found is None or found[0].client != client:
            raise HttpError(404, "not_found", "no such conversation")
        conv = found[0]
        # The replies come from the notifier's read model of this conversation (one
        # read): it owns what was sent and what providers said since.
        view = await self.deps.replies.get(conversation_key) if self.deps.replies else None
        replies = [
            Reply(
                command_id=r.command_id,
                kind=r.kind,
                body=r.body,
                at=r.at,
                delivery=r.delivery,
                provider_status=r.provider_status,
                files=r.files,
            )
            for r in (view[0].replies if view else [])
        ]
        return _json(
            ConversationView(
                conversation_id=conv.conversation_id,
                thread_id=conv.thread_id,
                channel=conv.channel,
                turns=conv.turns,
                tasks=[
                    TaskSummary(task_id=t.task_id, state=t.state, summary=t.summary)
                    for t in conv.tasks.values()
                ],
                replies=replies,
            )
        )

    async def openapi(self, request: web.Request) -> web.Response:
        """``GET /openapi.json``: the document of Podium's HTTP APIs."""
        return web.json_response(document())

    async def _same_as_stored(self, event: InboundMessage, seq: int) -> bool:
        """Whether the message stored under ``event``'s id says the same as ``event``."""
        try:
            stored = await self.deps.js.get_msg(streams.INBOUND.name, seq)
            original = decode(stored.data or b"")
        except Exception as err:
            raise HttpError(503, "unavailable", "could not read the stored message") from err
        if not isinstance(original, InboundMessage):
            return False
        return (original.text, original.thread_id, original.subject, original.sender) == (
            event.text,
            event.thread_id,
            event.subject,
            event.sender,
        )


_ENCODER = msgspec.json.Encoder()


def _json(value: msgspec.Struct, *, status: int = 200) -> web.Response:
    return web.Response(body=_ENCODER.encode(value), content_type="application/json", status=status)


def _is_utf8(header_value: str) -> bool:
    """Whether a header's bytes were UTF-8 (aiohttp turns other bytes into surrogates,
    which no event can carry)."""
    try:
        header_value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
