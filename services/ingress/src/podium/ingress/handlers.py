"""HTTP handlers: the JSON API and the provider webhooks.

Each handler validates and authenticates first, then publishes one
``InboundMessage`` and answers 2xx only after JetStream has stored it; a
rejected request publishes nothing. A publish that JetStream does not
acknowledge in time gets 503, so providers retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, PubAck
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError
from nats.js.object_store import ObjectStore
from yarl import query_to_pairs

from podium.common import streams, subjects
from podium.common.backoff import backoff
from podium.common.bus import publish
from podium.common.events import (
    DeliveryStatus,
    Event,
    InboundMessage,
    Media,
    RecipientPreference,
    decode,
)
from podium.common.ids import (
    conversation_id,
    conversation_of_address,
    conversation_of_message_id,
    email_thread_root,
    new_id,
    stable_id,
)
from podium.common.kv import Store
from podium.common.state import DELIVERY_RANK, Conversation, ConversationReplies
from podium.ingress import parsing
from podium.ingress.config import IngressSettings
from podium.ingress.metrics import IngressMetrics

log = logging.getLogger(__name__)

#: One publish attempt's wait for JetStream's ack; attempts repeat within
#: PODIUM_PUBLISH_TIMEOUT_S (see Handlers._store).
_ATTEMPT_S = 2.0
#: JetStream's error code for a store that has used up its size limit.
_STORE_FULL = 10077

TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_TEXT = 64 * 1024
MAX_IDEMPOTENCY_KEY = 255
MAX_FORM_FIELDS = 1000


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


async def _not_found(request: web.Request) -> web.Response:
    return error_response(404, "not_found", "Not Found")


def _method_not_allowed(allowed: str) -> Handler:
    async def refuse(request: web.Request) -> web.Response:
        response = error_response(405, "method_not_allowed", "Method Not Allowed")
        response.headers["Allow"] = allowed
        return response

    return refuse


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
    replies: Store[ConversationReplies] | None = None
    attachments: ObjectStore | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Handlers:
    """The ingress routes."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.tokens = deps.settings.tokens()
        self._duplicate_seq = 0
        #: Labelled children of the accepted counter, looked up once (every request's path).
        self._accepted: dict[tuple[str, bool], Any] = {}
        settings = deps.settings
        self.opt_out = frozenset(k.upper() for k in settings.sms_opt_out_keywords)
        self.opt_in = frozenset(k.upper() for k in settings.sms_opt_in_keywords)
        self.help = frozenset(k.upper() for k in settings.sms_help_keywords)
        self.keywords = self.opt_out | self.opt_in | self.help
        self.own = {a.strip().lower() for a in settings.own_addresses if a.strip()}
        self.own_domains = parsing.own_domains(self.own)
        self.base_url = settings.base_url()
        self.twilio = (
            parsing.TwilioSignatures(settings.twilio_auth_token.reveal())
            if settings.twilio_auth_token
            else None
        )
        self.sendgrid_key = (
            parsing.sendgrid_public_key(settings.sendgrid_webhook_public_key)
            if settings.sendgrid_webhook_public_key
            else None
        )

    def routes(self) -> list[web.RouteDef]:
        """The route table; unknown paths and methods answer in the JSON error shape too.

        Routes, not a middleware: a middleware adds two coroutine layers to every
        request, a measurable share of a webhook's CPU (docs/performance.md).
        """
        table = [
            ("POST", "/v1/messages", "api", self.api_message),
            ("GET", "/v1/conversations/{conversation_id}", "api_get", self.api_get),
            ("POST", "/webhooks/twilio/sms", "twilio_sms", self.twilio_sms),
            ("POST", "/webhooks/twilio/status", "twilio_status", self.twilio_status),
            ("POST", "/webhooks/sendgrid/inbound", "sendgrid_inbound", self.sendgrid_inbound),
        ]
        routes = []
        for method, path, name, handler in table:
            routes.append(web.route(method, path, self._wrap(name, handler)))
            # Any other method on the same path (the same resource): 405 with Allow.
            allowed = "GET, HEAD" if method == "GET" else method
            routes.append(web.route("*", path, _method_not_allowed(allowed)))
        routes.append(web.route("*", "/{path:.*}", _not_found))
        return routes

    def _wrap(self, route: str, handler: Handler) -> Handler:
        metrics = self.deps.metrics
        # Labelled children looked up once: this is every request's path.
        latency = metrics.latency.labels(route)
        by_status: dict[int, Any] = {}

        async def wrapped(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
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
            except BaseException:
                latency.observe(time.perf_counter() - started)
                raise
            counter = by_status.get(response.status)
            if counter is None:
                counter = by_status[response.status] = metrics.requests.labels(
                    route, str(response.status)
                )
            counter.inc()
            latency.observe(time.perf_counter() - started)
            return response

        return wrapped

    async def _store(self, subject: str, event: InboundMessage) -> bool:
        """Store an inbound message (see ``_durably``); True if it was a duplicate."""
        ack, tries = await self._durably(subject, event, "the message")
        # After a lost acknowledgement, "duplicate" may mean our own earlier attempt was
        # stored: only the first attempt's answer says whether someone else sent it.
        duplicate = bool(ack.duplicate) and tries == 0
        if duplicate:
            self._duplicate_seq = ack.seq
        # Bodies are personal data: DEBUG only.
        counter = self._accepted.get((event.channel, duplicate))
        if counter is None:
            counter = self._accepted[event.channel, duplicate] = self.deps.metrics.accepted.labels(
                event.channel, str(duplicate).lower()
            )
        counter.inc()
        # One line per accepted message costs as much CPU as the signature check and
        # the event together (docs/performance.md), and INBOUND already records every
        # message with its id: DEBUG. Refusals and ignored mail stay at INFO.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "inbound stored",
                extra={
                    "channel": event.channel,
                    "event_id": event.event_id,
                    "conversation_id": event.conversation_id,
                    "stream_seq": ack.seq,
                    "duplicate": duplicate,
                    "text": event.text[:4000],
                },
            )
        return duplicate

    async def _durably(self, subject: str, event: Event, what: str) -> tuple[PubAck, int]:
        """Publish and wait for the ack: (ack, failed attempts before it). 503 on failure.

        A stream whose leader is being re-elected (a NATS node lost) answers "no
        responders" or nothing for a few seconds: the publish is tried again, under the
        same Nats-Msg-Id (so stored at most once), until ``PODIUM_PUBLISH_TIMEOUT_S`` is
        spent, and only then is the provider asked to retry with a 503.
        """
        deadline = time.monotonic() + self.deps.settings.publish_timeout_s
        tries = 0
        while True:
            # Short attempts: an ack that does not come from an old leader is not waited
            # for until the whole budget is gone.
            attempt_s = max(0.05, min(_ATTEMPT_S, deadline - time.monotonic()))
            try:
                ack = await publish(self.deps.js, subject, event, timeout_s=attempt_s)
                break
            except Exception as err:
                tries += 1
                delay = backoff(tries, base=0.1, cap=1.0)
                # A refusal that will not clear (the stream is full, or refuses the
                # message) is answered at once; only an election's silence is waited out.
                full = isinstance(err, ServiceUnavailableError) and err.err_code == _STORE_FULL
                final = full or (
                    isinstance(err, APIError)
                    and not isinstance(err, ServiceUnavailableError | NoStreamResponseError)
                )
                if final or time.monotonic() + delay >= deadline:
                    log.warning("could not store an event", extra={"error": repr(err)})
                    raise HttpError(
                        503, "unavailable", f"could not store {what}; retry later"
                    ) from err
                log.info("store not acknowledged; trying again", extra={"error": repr(err)})
                await asyncio.sleep(delay)
        return ack, tries

    async def _same_as_stored(self, event: InboundMessage) -> bool:
        """Whether the message stored under ``event``'s id says the same as ``event``."""
        try:
            stored = await self.deps.js.get_msg(streams.INBOUND.name, self._duplicate_seq)
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

    def _check_size(self, request: web.Request, limit: int) -> None:
        length = request.content_length
        if length is not None and length > limit:
            raise HttpError(413, "too_large", f"body over {limit} bytes")

    async def _read_limited(self, request: web.Request, limit: int) -> bytes:
        self._check_size(request, limit)
        if request.content_length is not None:
            # Declared and within the limit: aiohttp reads exactly that much.
            return await request.read()
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
        duplicate = await self._store(subjects.inbound("api", conversation), event)
        if duplicate and not await self._same_as_stored(event):
            raise HttpError(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different message",
            )
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
        # The replies come from the notifier's read model of this conversation (one
        # read): it owns what was sent and what providers said since.
        view = await self.deps.replies.get(conversation_key) if self.deps.replies else None
        replies = [
            {
                "command_id": r.command_id,
                "kind": r.kind,
                "body": r.body,
                "at": r.at.isoformat(),
                "delivery": r.delivery,
                # What the provider reported afterwards (status callbacks), if anything.
                "provider_status": r.provider_status,
            }
            for r in (view[0].replies if view else [])
        ]
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

    async def _twilio_form(self, request: web.Request) -> dict[str, str]:
        """A Twilio webhook's form, after its signature was checked over the public URL."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise HttpError(415, "unsupported_media_type", "expected a form post")
        raw = await self._read_limited(request, self.deps.settings.api_max_bytes)
        try:
            pairs = _parse_form(raw)
        except ValueError as err:
            raise HttpError(400, "malformed_form", str(err)) from err
        if self.twilio is not None:
            signature = request.headers.get("X-Twilio-Signature", "")
            url = self.base_url + request.path_qs
            if not signature or not self.twilio.valid(url, pairs, signature):
                raise HttpError(403, "bad_signature", "X-Twilio-Signature does not match")
        return dict(pairs)

    async def twilio_sms(self, request: web.Request) -> web.Response:
        """``POST /webhooks/twilio/sms``: an inbound SMS/MMS from Twilio."""
        form = await self._twilio_form(request)
        sender, ours, sid = form.get("From"), form.get("To"), form.get("MessageSid")
        if not (sender and ours and sid):
            missing = [f for f in ("From", "To", "MessageSid") if not form.get(f)]
            raise HttpError(400, "missing_fields", "missing " + ", ".join(missing))
        try:
            num_media = int(form.get("NumMedia", "0") or "0")
        except ValueError as err:
            raise HttpError(400, "invalid", "NumMedia is not a number") from err
        media = (
            [
                Media(url=form[f"MediaUrl{i}"], content_type=form.get(f"MediaContentType{i}", ""))
                for i in range(min(num_media, 10))
                if form.get(f"MediaUrl{i}")
            ]
            if num_media > 0
            else []
        )
        text = form.get("Body", "")
        if len(text) > MAX_TEXT:
            raise HttpError(413, "too_large", "message too long")
        keyword = text.strip().upper()
        if keyword in self.keywords:
            await self._keyword(keyword, sender, ours, sid)
            return web.Response(text=TWIML_EMPTY, content_type="text/xml")
        event_id = stable_id("twilio", sid)
        conversation = conversation_id("sms", sender, ours)
        event = InboundMessage(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            channel="sms",
            sender=sender,
            recipients=[ours],
            text=text,
            message_id=sid,
            media=media,
        )
        await self._store(subjects.inbound("sms", conversation), event)
        return web.Response(text=TWIML_EMPTY, content_type="text/xml")

    async def _keyword(self, keyword: str, sender: str, ours: str, sid: str) -> None:
        """STOP/START/HELP: recorded (opt-out/in) and counted, never forwarded to an agent.

        Twilio answers these keywords itself (Advanced Opt-Out); what we must do
        is never text an opted-out number until it says START. The keyword is
        stored as a fact for the notifier, which keeps the suppression list.
        """
        kind = (
            "opt-out" if keyword in self.opt_out else "opt-in" if keyword in self.opt_in else "help"
        )
        self.deps.metrics.ignored.labels("sms", kind).inc()
        log.info("sms keyword", extra={"keyword": keyword, "kind": kind})
        if kind == "help":
            return
        fact = RecipientPreference(
            event_id=stable_id("twilio", sid),
            correlation_id=stable_id("twilio", sid),
            conversation_id=conversation_id("sms", sender, ours),
            channel="sms",
            address=sender,
            opted_out=kind == "opt-out",
            keyword=keyword,
            our_address=ours,
            source_id=sid,
        )
        await self._record(subjects.preference(fact.conversation_id), fact, "the opt-out")

    async def _record(
        self, subject: str, fact: DeliveryStatus | RecipientPreference, what: str
    ) -> None:
        """Store a fact for the notifier, which owns what it changes; 503 if not stored."""
        await self._durably(subject, fact, what)

    async def twilio_status(self, request: web.Request) -> web.Response:
        """``POST /webhooks/twilio/status?cid=<command>``: how far Twilio got with our SMS.

        The command id is in the callback URL the notifier gave Twilio, so it is
        covered by the signature. The callback is stored as a fact for the
        notifier, which owns the outbox: it moves the record forward and reports
        a failure to the conductor.
        """
        form = await self._twilio_form(request)
        command_id = request.query.get("cid", "")
        sid, status = form.get("MessageSid", ""), form.get("MessageStatus", "").lower()
        if not (sid and status):
            raise HttpError(400, "missing_fields", "MessageSid and MessageStatus are required")
        try:
            subjects.token(command_id)
        except ValueError as err:
            raise HttpError(400, "invalid", "cid is missing or not a command id") from err
        if status not in DELIVERY_RANK:
            self.deps.metrics.ignored.labels("sms_status", "unknown-status").inc()
            return web.Response(text="")
        fact = DeliveryStatus(
            # One per part and status: Twilio's retries of the same callback are one fact.
            event_id=stable_id("twilio-status", command_id, sid, status),
            correlation_id=command_id,
            conversation_id="",
            command_id=command_id,
            channel="sms",
            provider_id=sid,
            status=status,
            error_code=form.get("ErrorCode", ""),
            to=form.get("To", ""),
            our_address=form.get("From", ""),
        )
        await self._record(subjects.delivery_status(command_id), fact, "the status")
        self.deps.metrics.statuses.labels(status).inc()
        return web.Response(text="")

    # --- SendGrid ----------------------------------------------------------

    def _check_sendgrid_signature(self, request: web.Request, body: bytes) -> None:
        key = self.sendgrid_key
        if key is None:
            return
        signature = request.headers.get("X-Twilio-Email-Event-Webhook-Signature", "")
        timestamp = request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", "")
        if not signature or not timestamp:
            raise HttpError(403, "missing_signature", "signed webhook headers are missing")
        try:
            when = int(timestamp)
        except ValueError as err:
            raise HttpError(
                403, "bad_signature", "the signature timestamp is not a number"
            ) from err
        if abs(time.time() - when) > self.deps.settings.sendgrid_webhook_max_age_s:
            raise HttpError(403, "stale_signature", "the signature timestamp is outside the window")
        if not parsing.sendgrid_signature_valid(key, body, signature, timestamp):
            raise HttpError(403, "bad_signature", "the webhook signature does not match")

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
        body = await self._read_limited(request, settings.webhook_max_bytes)
        self._check_sendgrid_signature(request, body)
        fields, files = await _read_multipart(request, body)
        charsets = _json_field(fields, "charsets")
        envelope = _json_field(fields, "envelope")

        def text_field(name: str) -> str:
            charset = charsets.get(name) if isinstance(charsets, dict) else None
            return parsing.decode_text(fields.get(name, b""), str(charset) if charset else None)

        envelope_from = envelope.get("from") if isinstance(envelope, dict) else None
        envelope_to = envelope.get("to") if isinstance(envelope, dict) else None
        if not isinstance(envelope_to, list):
            envelope_to = []
        if envelope_from is not None and not isinstance(envelope_from, str):
            envelope_from = None
        if "email" in fields:
            facts = parsing.raw_email_facts(
                fields["email"], self.own, envelope_from=envelope_from, envelope_to=envelope_to
            )
        elif "from" in fields:
            facts = parsing.email_facts(
                sender_field=text_field("from"),
                to_field=text_field("to"),
                subject=text_field("subject"),
                text=text_field("text"),
                html=text_field("html"),
                raw_headers=text_field("headers"),
                own_addresses=self.own,
                envelope_from=envelope_from,
                envelope_to=envelope_to,
                attachments=_parsed_attachments(fields, files),
            )
        else:
            raise HttpError(400, "missing_fields", "neither 'from' (parsed) nor 'email' (raw)")
        if not facts.sender or "@" not in facts.sender:
            raise HttpError(400, "invalid", "no sender address")
        if facts.ignore_reason:
            self.deps.metrics.ignored.labels("email", facts.ignore_reason).inc()
            log.info("email ignored", extra={"reason": facts.ignore_reason})
            return web.json_response({"ignored": facts.ignore_reason})
        natural_key = facts.message_id or stable_id(facts.sender, facts.subject, facts.text)
        event_id = stable_id("email", natural_key)
        conversation = self._email_conversation(facts, natural_key)
        media = await self._keep_attachments(event_id, facts.attachments)
        event = InboundMessage(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            channel="email",
            sender=facts.sender,
            recipients=facts.recipients[:50],
            subject=facts.subject[:998],
            text=facts.text[:MAX_TEXT],
            message_id=facts.message_id[:998],
            in_reply_to=facts.in_reply_to[:998],
            references=[r[:998] for r in facts.references[-20:]],
            media=media,
        )
        duplicate = await self._store(subjects.inbound("email", conversation), event)
        return web.json_response(
            {"event_id": event_id, "conversation_id": conversation, "duplicate": duplicate}
        )

    def _email_conversation(self, facts: parsing.EmailFacts, natural_key: str) -> str:
        """Which conversation an email joins.

        1. a plus-addressed reply token in a recipient (``podium+<token>@…``);
        2. one of our own Message-IDs in In-Reply-To / References;
        3. the thread's root Message-ID (first of References, else In-Reply-To);
        4. a new conversation named by the message itself.
        """
        for address in facts.recipients:
            found = conversation_of_address(address, self.own)
            if found:
                return found
        for mid in [facts.in_reply_to, *reversed(facts.references)]:
            found = conversation_of_message_id(mid, self.own_domains) if mid else None
            if found:
                return found
        root = email_thread_root(facts.message_id, facts.in_reply_to, facts.references)
        return conversation_id("email", root or natural_key)

    async def _keep_attachments(
        self, event_id: str, attachments: list[parsing.Attachment]
    ) -> list[Media]:
        """Store attachments within the limits in the object store; list the others."""
        settings = self.deps.settings
        media: list[Media] = []
        for index, item in enumerate(attachments):
            size = len(item.data)
            name = item.filename[:200]
            note = ""
            if index >= settings.attachments_max_count:
                note = f"not stored: more than {settings.attachments_max_count} attachments"
            elif size > settings.attachment_max_bytes:
                note = f"not stored: over the {settings.attachment_max_bytes} byte limit"
            elif self.deps.attachments is None:
                note = "not stored: no attachment store"
            if note:
                media.append(
                    Media(filename=name, content_type=item.content_type, size=size, note=note)
                )
                continue
            object_name = f"{event_id}/{index}"
            try:
                assert self.deps.attachments is not None  # noqa: S101 - checked above
                await self.deps.attachments.put(
                    object_name,
                    item.data,
                    meta=ObjectMeta(name=object_name, description=f"{item.content_type} {name}"),
                )
            except ServiceUnavailableError as err:
                if err.err_code != _STORE_FULL:
                    log.warning("could not store an attachment", extra={"error": repr(err)})
                    raise HttpError(503, "unavailable", "could not store an attachment") from err
                # Its share of the storage budget is used up: the email still goes through,
                # this attachment listed as left out (a 503 would lose the whole email once
                # the provider gives up retrying).
                log.warning("attachment store full; attachment left out")
                self.deps.metrics.ignored.labels("email", "attachment store full").inc()
                media.append(
                    Media(
                        filename=name,
                        content_type=item.content_type,
                        size=size,
                        note="not stored: the attachment store is full",
                    )
                )
                continue
            except Exception as err:
                log.warning("could not store an attachment", extra={"error": repr(err)})
                raise HttpError(503, "unavailable", "could not store an attachment") from err
            media.append(
                Media(filename=name, content_type=item.content_type, size=size, object=object_name)
            )
        return media


def _stream_of(body: bytes) -> StreamReader:
    """``body`` as the stream aiohttp's multipart reader reads.

    The body is read whole first (a signature covers all of it, and the size
    limit is enforced while reading), then parsed by aiohttp's own reader.
    """
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    return stream


Files = dict[str, tuple[str, str, bytes]]


async def _read_multipart(request: web.Request, body: bytes) -> tuple[dict[str, bytes], Files]:
    """(fields, files) of a multipart/form-data body: files by part name, with their
    filename and content type."""
    try:
        reader = MultipartReader(request.headers, _stream_of(body))
    except (ValueError, AssertionError, KeyError) as err:
        raise HttpError(400, "malformed_form", f"bad multipart body: {err}") from err
    fields: dict[str, bytes] = {}
    files: Files = {}
    try:
        for _ in range(1000):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise HttpError(400, "malformed_form", "nested multipart is not supported")
            data = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                data += chunk
            if not part.name:
                continue
            if part.filename is None:
                fields[part.name] = bytes(data)
            else:
                ctype = part.headers.get("Content-Type", "application/octet-stream")
                files[part.name] = (part.filename, ctype, bytes(data))
        else:
            raise HttpError(400, "malformed_form", "too many parts")
    except HttpError:
        raise
    except (ValueError, AssertionError, UnicodeDecodeError, KeyError, LookupError) as err:
        raise HttpError(400, "malformed_form", f"bad multipart body: {err}") from err
    return fields, files


def _parsed_attachments(fields: dict[str, bytes], files: Files) -> list[parsing.Attachment]:
    """Attachments of a parsed-mode post: ``attachmentN`` files, named by ``attachment-info``."""
    info = _json_field(fields, "attachment-info")
    out = []
    for name in sorted(files, key=lambda n: (len(n), n)):
        filename, ctype, data = files[name]
        meta = info.get(name) if isinstance(info, dict) else None
        if isinstance(meta, dict):
            filename = str(meta.get("filename") or filename)
            ctype = str(meta.get("type") or ctype)
        out.append(parsing.Attachment(filename=filename, content_type=ctype, data=data))
    return out


def _is_utf8(header_value: str) -> bool:
    """Whether a header's bytes were UTF-8 (aiohttp turns other bytes into surrogates,
    which no event can carry)."""
    try:
        header_value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_form(raw: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs of an urlencoded form, as ``parse_qsl`` reads them
    (blank values kept). yarl's parser (the one aiohttp's ``post()`` uses) decodes
    with its C unquoter, half the cost of ``urllib``'s: this runs for every webhook."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError("form is not UTF-8") from err
    try:
        return query_to_pairs(text, max_fields=MAX_FORM_FIELDS)
    except ValueError as err:
        raise ValueError(f"more than {MAX_FORM_FIELDS} fields") from err


def _json_field(fields: dict[str, bytes], name: str) -> Any:
    raw = fields.get(name)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise HttpError(400, "malformed_form", f"field {name!r} is not JSON") from err
