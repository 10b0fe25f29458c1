"""HTTP handlers: the JSON API and the provider webhooks.

Each handler validates and authenticates first, then publishes one
``InboundMessage`` and answers 2xx only after JetStream has stored it; a
rejected request publishes nothing. A publish that JetStream does not
acknowledge in time gets 503, so providers retry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web
from nats.js import JetStreamContext

from podium.common import subjects
from podium.common.bus import publish
from podium.common.events import InboundMessage, Media
from podium.common.ids import conversation_id, email_thread_root, new_id, stable_id
from podium.common.kv import Store
from podium.common.state import Conversation, OutboxRecord
from podium.ingress import parsing
from podium.ingress.config import IngressSettings
from podium.ingress.metrics import IngressMetrics

log = logging.getLogger(__name__)

TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_TEXT = 64 * 1024
MAX_IDEMPOTENCY_KEY = 255


class HttpError(Exception):
    """A request refused with ``status`` and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


def error_response(status: int, code: str, message: str) -> web.Response:
    """Errors have one shape everywhere: ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class ApiMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``POST /v1/messages``."""

    text: str
    channel: str = "api"
    thread_id: str = ""
    sender: str = msgspec.field(default="", name="from")
    subject: str = ""


@dataclass
class Deps:
    """What the handlers need, passed in (no globals)."""

    settings: IngressSettings
    js: JetStreamContext
    metrics: IngressMetrics
    conversations: Store[Conversation] | None = None
    outbox: Store[OutboxRecord] | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Handlers:
    """The ingress routes."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.tokens = deps.settings.tokens()

    def routes(self) -> list[web.RouteDef]:
        """The route table."""
        return [
            web.post("/v1/messages", self._wrap("api", self.api_message)),
            web.get("/v1/conversations/{conversation_id}", self._wrap("api_get", self.api_get)),
            web.post("/webhooks/twilio/sms", self._wrap("twilio_sms", self.twilio_sms)),
            web.post(
                "/webhooks/sendgrid/inbound", self._wrap("sendgrid_inbound", self.sendgrid_inbound)
            ),
        ]

    def _wrap(self, route: str, handler: Handler) -> Handler:
        metrics = self.deps.metrics

        async def wrapped(request: web.Request) -> web.StreamResponse:
            with metrics.latency.labels(route).time():
                try:
                    response = await handler(request)
                except HttpError as err:
                    metrics.refused.labels(route, err.code).inc()
                    log.info(
                        "request refused",
                        extra={"route": route, "status": err.status, "code": err.code},
                    )
                    response = error_response(err.status, err.code, err.message)
                    if err.status == 401:
                        response.headers["WWW-Authenticate"] = 'Bearer realm="podium"'
                metrics.requests.labels(route, str(response.status)).inc()
                return response

        return wrapped

    async def _store(self, subject: str, event: InboundMessage) -> bool:
        """Publish and wait for the ack; True if it was a duplicate. 503 on failure."""
        try:
            ack = await publish(
                self.deps.js, subject, event, timeout_s=self.deps.settings.publish_timeout_s
            )
        except Exception as err:
            log.warning("could not store inbound event", extra={"error": repr(err)})
            raise HttpError(503, "unavailable", "could not store the message; retry later") from err
        duplicate = bool(ack.duplicate)
        # Bodies are personal data: DEBUG only.
        log.debug("inbound text", extra={"event_id": event.event_id, "text": event.text[:4000]})
        self.deps.metrics.accepted.labels(event.channel, str(duplicate).lower()).inc()
        log.info(
            "inbound stored",
            extra={
                "channel": event.channel,
                "event_id": event.event_id,
                "conversation_id": event.conversation_id,
                "stream_seq": ack.seq,
                "duplicate": duplicate,
            },
        )
        return duplicate

    def _check_size(self, request: web.Request, limit: int) -> None:
        length = request.content_length
        if length is not None and length > limit:
            raise HttpError(413, "too_large", f"body over {limit} bytes")

    async def _read_limited(self, request: web.Request, limit: int) -> bytes:
        self._check_size(request, limit)
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise HttpError(413, "too_large", f"body over {limit} bytes")
        return bytes(body)

    # --- API ---------------------------------------------------------------

    def _client(self, request: web.Request) -> str:
        client = parsing.bearer_client(request.headers.get("Authorization", ""), self.tokens)
        if client is None:
            raise HttpError(401, "unauthorized", "missing or invalid bearer token")
        return client

    async def api_message(self, request: web.Request) -> web.Response:
        """``POST /v1/messages``: a message from an API client."""
        client = self._client(request)
        raw = await self._read_limited(request, self.deps.settings.api_max_bytes)
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
        duplicate = await self._store(subjects.inbound("api", conversation), event)
        return web.json_response(
            {
                "event_id": event_id,
                "conversation_id": conversation,
                "thread_id": thread,
                "duplicate": duplicate,
            },
            status=202,
        )

    async def api_get(self, request: web.Request) -> web.Response:
        """``GET /v1/conversations/{id}``: a conversation's state, tasks and replies."""
        client = self._client(request)
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
        replies: list[dict[str, Any]] = []
        for out in conv.outbound:
            delivery = await self.deps.outbox.get(out.command_id) if self.deps.outbox else None
            replies.append(
                {
                    "command_id": out.command_id,
                    "kind": out.kind,
                    "body": out.body,
                    "at": out.at.isoformat(),
                    "delivery": delivery[0].state if delivery else "pending",
                }
            )
        return web.json_response(
            {
                "conversation_id": conv.conversation_id,
                "thread_id": conv.thread_id,
                "channel": conv.channel,
                "turns": conv.turns,
                "tasks": [
                    {"task_id": t.task_id, "state": t.state, "summary": t.summary}
                    for t in conv.tasks.values()
                ],
                "replies": replies,
            }
        )

    # --- Twilio ------------------------------------------------------------

    async def twilio_sms(self, request: web.Request) -> web.Response:
        """``POST /webhooks/twilio/sms``: an inbound SMS/MMS from Twilio."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise HttpError(415, "unsupported_media_type", "expected a form post")
        raw = await self._read_limited(request, self.deps.settings.api_max_bytes)
        try:
            pairs = _parse_form(raw)
        except ValueError as err:
            raise HttpError(400, "malformed_form", str(err)) from err
        token = self.deps.settings.twilio_auth_token
        if token:
            signature = request.headers.get("X-Twilio-Signature", "")
            url = self.deps.settings.base_url() + request.path_qs
            if not signature or not parsing.twilio_signature_valid(
                token.reveal(), url, pairs, signature
            ):
                raise HttpError(403, "bad_signature", "X-Twilio-Signature does not match")
        form = dict(pairs)
        missing = [f for f in ("From", "To", "MessageSid") if not form.get(f)]
        if missing:
            raise HttpError(400, "missing_fields", "missing " + ", ".join(missing))
        try:
            num_media = int(form.get("NumMedia", "0") or "0")
        except ValueError as err:
            raise HttpError(400, "invalid", "NumMedia is not a number") from err
        media = [
            Media(url=form[f"MediaUrl{i}"], content_type=form.get(f"MediaContentType{i}", ""))
            for i in range(min(num_media, 10))
            if form.get(f"MediaUrl{i}")
        ]
        text = form.get("Body", "")
        if len(text) > MAX_TEXT:
            raise HttpError(413, "too_large", "message too long")
        sender, ours = form["From"], form["To"]
        event_id = stable_id("twilio", form["MessageSid"])
        conversation = conversation_id("sms", sender, ours)
        event = InboundMessage(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            channel="sms",
            sender=sender,
            recipients=[ours],
            text=text,
            message_id=form["MessageSid"],
            media=media,
        )
        await self._store(subjects.inbound("sms", conversation), event)
        return web.Response(text=TWIML_EMPTY, content_type="text/xml")

    # --- SendGrid ----------------------------------------------------------

    async def sendgrid_inbound(self, request: web.Request) -> web.Response:
        """``POST /webhooks/sendgrid/inbound``: SendGrid Inbound Parse (parsed or raw mode)."""
        settings = self.deps.settings
        if settings.sendgrid_basic_auth and not parsing.basic_auth_valid(
            request.headers.get("Authorization", ""), settings.sendgrid_basic_auth.reveal()
        ):
            raise HttpError(401, "unauthorized", "basic auth required")
        self._check_size(request, settings.webhook_max_bytes)
        if not request.content_type.startswith("multipart/form-data"):
            raise HttpError(415, "unsupported_media_type", "expected multipart/form-data")
        fields = await self._read_multipart(request, settings.webhook_max_bytes)
        charsets = _json_field(fields, "charsets")
        envelope = _json_field(fields, "envelope")

        def text_field(name: str) -> str:
            value = fields.get(name, b"")
            charset = str(charsets.get(name, "utf-8")) if isinstance(charsets, dict) else "utf-8"
            try:
                return value.decode(charset, errors="replace")
            except LookupError:
                return value.decode("utf-8", errors="replace")

        envelope_from = envelope.get("from") if isinstance(envelope, dict) else None
        if "email" in fields:
            facts = parsing.raw_email_facts(
                fields["email"], settings.own_addresses, envelope_from=envelope_from
            )
        elif "from" in fields:
            facts = parsing.email_facts(
                sender_field=text_field("from"),
                to_field=text_field("to"),
                subject=text_field("subject"),
                text=text_field("text"),
                html=text_field("html"),
                raw_headers=text_field("headers"),
                own_addresses=settings.own_addresses,
                envelope_from=envelope_from,
            )
        else:
            raise HttpError(400, "missing_fields", "neither 'from' (parsed) nor 'email' (raw)")
        if not facts.sender:
            raise HttpError(400, "invalid", "no sender address")
        if facts.ignore_reason:
            self.deps.metrics.ignored.labels("email", facts.ignore_reason).inc()
            log.info("email ignored", extra={"reason": facts.ignore_reason})
            return web.json_response({"ignored": facts.ignore_reason})
        natural_key = facts.message_id or stable_id(facts.sender, facts.subject, facts.text)
        event_id = stable_id("email", natural_key)
        root = email_thread_root(facts.message_id, facts.in_reply_to, facts.references)
        conversation = conversation_id("email", root or natural_key)
        event = InboundMessage(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            channel="email",
            sender=facts.sender,
            recipients=facts.recipients,
            subject=facts.subject,
            text=facts.text[:MAX_TEXT],
            message_id=facts.message_id,
            in_reply_to=facts.in_reply_to,
            references=facts.references,
            media=[
                Media(filename=name, content_type=ctype, size=size)
                for name, ctype, size in facts.attachments
            ],
        )
        duplicate = await self._store(subjects.inbound("email", conversation), event)
        return web.json_response(
            {"event_id": event_id, "conversation_id": conversation, "duplicate": duplicate}
        )

    async def _read_multipart(self, request: web.Request, limit: int) -> dict[str, bytes]:
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as err:
            raise HttpError(400, "malformed_form", f"bad multipart body: {err}") from err
        fields: dict[str, bytes] = {}
        total = 0
        try:
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise HttpError(400, "malformed_form", "nested multipart is not supported")
                data = bytearray()
                while chunk := await part.read_chunk(64 * 1024):
                    data += chunk
                    total += len(chunk)
                    if total > limit:
                        raise HttpError(413, "too_large", f"body over {limit} bytes")
                if part.name and part.filename is None:
                    fields[part.name] = bytes(data)
        except HttpError:
            raise
        except (ValueError, AssertionError, UnicodeDecodeError) as err:
            raise HttpError(400, "malformed_form", f"bad multipart body: {err}") from err
        return fields


def _parse_form(raw: bytes) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl  # noqa: PLC0415

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError("form is not UTF-8") from err
    return parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=1000)


def _json_field(fields: dict[str, bytes], name: str) -> Any:
    raw = fields.get(name)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise HttpError(400, "malformed_form", f"field {name!r} is not JSON") from err
