"""SendGrid Inbound Parse: email in, parsed or raw mode, signed (ECDSA) or basic auth.

Authenticated, the post is parsed into facts (:mod:`podium.ingress.mail`),
its attachments kept in the object store, and one event stored for the conductor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol

from podium.contracts import subjects
from podium.contracts.events import InboundMessage, Media
from podium.contracts.ids import (
    conversation_id,
    conversation_of_address,
    conversation_of_message_id,
    email_thread_root,
    stable_id,
)
from podium.ingress import auth, mail, sender
from podium.ingress.base import MAX_TEXT, Deps, HttpError, Route, RouteTable

log = logging.getLogger("podium.ingress.handlers")

Files = dict[str, tuple[str, str, bytes]]
#: How long verifying a raw message's DKIM signatures may take (DNS lookups included),
#: well within SendGrid's wait for the webhook's answer.
DKIM_TIMEOUT_S = 10.0


class SendGridRoutes(Route):
    """SendGrid's route."""

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        settings = deps.settings
        self.own = {a.strip().lower() for a in settings.own_addresses if a.strip()}
        self.own_domains = mail.own_domains(self.own)
        self.sendgrid_key = (
            auth.sendgrid_public_key(settings.sendgrid_webhook_public_key)
            if settings.sendgrid_webhook_public_key
            else None
        )

    def routes(self) -> RouteTable:
        """``POST /webhooks/sendgrid/inbound``."""
        return [("POST", "/webhooks/sendgrid/inbound", "sendgrid_inbound", self.sendgrid_inbound)]

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
        if not auth.sendgrid_signature_valid(key, body, signature, timestamp):
            raise HttpError(403, "bad_signature", "the webhook signature does not match")

    async def sendgrid_inbound(self, request: web.Request) -> web.Response:
        """``POST /webhooks/sendgrid/inbound``: SendGrid Inbound Parse (parsed or raw mode)."""
        settings = self.deps.settings
        if settings.sendgrid_basic_auth and not auth.basic_auth_valid(
            request.headers.get("Authorization", ""), settings.sendgrid_basic_auth.reveal()
        ):
            raise HttpError(401, "unauthorized", "basic auth required")
        self.check_size(request, settings.webhook_max_bytes)
        if not request.content_type.startswith("multipart/form-data"):
            raise HttpError(415, "unsupported_media_type", "expected multipart/form-data")
        body = await self.read_limited(request, settings.webhook_max_bytes)
        self._check_sendgrid_signature(request, body)
        fields, files = await _read_multipart(request, body)
        charsets = _json_field(fields, "charsets")
        envelope = _json_field(fields, "envelope")

        def text_field(name: str) -> str:
            charset = charsets.get(name) if isinstance(charsets, dict) else None
            return mail.decode_text(fields.get(name, b""), str(charset) if charset else None)

        envelope_from = envelope.get("from") if isinstance(envelope, dict) else None
        envelope_to = envelope.get("to") if isinstance(envelope, dict) else None
        if not isinstance(envelope_to, list):
            envelope_to = []
        if envelope_from is not None and not isinstance(envelope_from, str):
            envelope_from = None
        try:
            if "email" in fields:
                facts = mail.raw_email_facts(
                    fields["email"], self.own, envelope_from=envelope_from, envelope_to=envelope_to
                )
            elif "from" in fields:
                facts = mail.email_facts(
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
        except HttpError:
            raise
        except Exception as err:
            # The parsers are meant to read any mail; one they cannot is refused with
            # a 4xx that names it (and counted), never a 500 the provider retries.
            log.warning("email could not be parsed", extra={"error": repr(err)[:300]})
            raise HttpError(400, "malformed_email", "the email could not be parsed") from err
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
        verdict = await self._sender_verdict(facts.sender, fields, text_field)
        self.deps.metrics.sender_auth.labels(verdict.result).inc()
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
            sender_auth=verdict.result,
            sender_auth_detail=verdict.detail[:500],
        )
        stored = await self.store(subjects.inbound("email", conversation), event)
        return web.json_response(
            {"event_id": event_id, "conversation_id": conversation, "duplicate": stored.duplicate}
        )

    async def _sender_verdict(
        self, address: str, fields: dict[str, bytes], text_field: Callable[[str], str]
    ) -> sender.Verdict:
        """Whether ``address`` (the From:) is authenticated: the provider's SPF verdict, and
        DKIM as the provider reports it (parsed mode) or as verified here (raw mode)."""
        dkim_verdicts = text_field("dkim") if "dkim" in fields else None
        if "email" in fields:
            ours = await self._verify_dkim(fields["email"])
            if ours or dkim_verdicts is not None or "SPF" in fields:
                dkim_verdicts = sender.as_verdicts(ours)
        return sender.judge(
            address,
            text_field("SPF") if "SPF" in fields else None,
            dkim_verdicts,
            text_field("envelope") if "envelope" in fields else None,
        )

    async def _verify_dkim(self, message: bytes) -> list[tuple[str, str]]:
        """The message's DKIM signatures, verified off the event loop (DNS lookups); a
        check that takes too long counts as no passing signature."""
        try:
            async with asyncio.timeout(DKIM_TIMEOUT_S):
                return await asyncio.to_thread(sender.verify_dkim, message, self.deps.dkim_dns)
        except TimeoutError:
            log.warning("DKIM check timed out", extra={"timeout_s": DKIM_TIMEOUT_S})
            return [("?", "temperror")]

    def _email_conversation(self, facts: mail.EmailFacts, natural_key: str) -> str:
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
        self, event_id: str, attachments: list[mail.Attachment]
    ) -> list[Media]:
        """Store attachments within the limits in the object store; list the others."""
        settings = self.deps.settings
        media: list[Media] = []
        for index, item in enumerate(attachments):
            size = len(item.data)
            listed = Media(filename=item.filename[:200], content_type=item.content_type, size=size)
            note = ""
            if index >= settings.attachments_max_count:
                note = f"not stored: more than {settings.attachments_max_count} attachments"
            elif size > settings.attachment_max_bytes:
                note = f"not stored: over the {settings.attachment_max_bytes} byte limit"
            if note:
                media.append(msgspec.structs.replace(listed, note=note))
                continue
            media.append(await self.keep("email", f"{event_id}/{index}", item.data, listed))
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


def _parsed_attachments(fields: dict[str, bytes], files: Files) -> list[mail.Attachment]:
    """Attachments of a parsed-mode post: ``attachmentN`` files, named by ``attachment-info``."""
    info = _json_field(fields, "attachment-info")
    out = []
    for name in sorted(files, key=lambda n: (len(n), n)):
        filename, ctype, data = files[name]
        meta = info.get(name) if isinstance(info, dict) else None
        if isinstance(meta, dict):
            filename = str(meta.get("filename") or filename)
            ctype = str(meta.get("type") or ctype)
        out.append(mail.Attachment(filename=filename, content_type=ctype, data=data))
    return out


def _json_field(fields: dict[str, bytes], name: str) -> Any:
    raw = fields.get(name)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as err:
        raise HttpError(400, "malformed_form", f"field {name!r} is not JSON") from err
