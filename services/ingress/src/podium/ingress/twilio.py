"""Twilio's webhooks: inbound SMS/MMS and status callbacks, signed (X-Twilio-Signature).

An inbound message is stored for the conductor; STOP/START and status callbacks
are stored as facts for the notifier, which owns the suppression list and the
outbox.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from aiohttp import web
from yarl import query_to_pairs

from podium.contracts import subjects
from podium.contracts.events import DeliveryStatus, InboundMessage, Media, RecipientPreference
from podium.contracts.ids import conversation_id, stable_id
from podium.contracts.state import DELIVERY_RANK
from podium.ingress import auth
from podium.ingress.base import MAX_TEXT, Deps, HttpError, Route, RouteTable
from podium.ingress.mms import NOT_CONFIGURED, Fetched, MediaFetcher, NotKept

log = logging.getLogger("podium.ingress.handlers")

TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_FORM_FIELDS = 1000
#: Twilio sends at most 10 media items with one message.
MAX_MEDIA = 10
MEDIA_OUTCOMES = (
    "stored",
    "not-configured",
    "host",
    "type",
    "too-large",
    "too-many",
    "failed",
    "store-full",
)


class TwilioRoutes(Route):
    """Twilio's routes."""

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        settings = deps.settings
        self.opt_out = frozenset(k.upper() for k in settings.sms_opt_out_keywords)
        self.opt_in = frozenset(k.upper() for k in settings.sms_opt_in_keywords)
        self.help = frozenset(k.upper() for k in settings.sms_help_keywords)
        self.keywords = self.opt_out | self.opt_in | self.help
        self.base_url = settings.base_url()
        self.twilio = (
            auth.TwilioSignatures(settings.twilio_auth_token.reveal())
            if settings.twilio_auth_token
            else None
        )
        self.fetcher = MediaFetcher(settings, deps.http)
        self.media_outcomes: dict[str, Any] = {
            o: deps.metrics.mms_media.labels(o) for o in MEDIA_OUTCOMES
        }

    def routes(self) -> RouteTable:
        """``POST /webhooks/twilio/sms``, ``POST /webhooks/twilio/status``."""
        return [
            ("POST", "/webhooks/twilio/sms", "twilio_sms", self.twilio_sms),
            ("POST", "/webhooks/twilio/status", "twilio_status", self.twilio_status),
        ]

    async def _twilio_form(self, request: web.Request) -> dict[str, str]:
        """A Twilio webhook's form, after its signature was checked over the public URL."""
        if request.content_type != "application/x-www-form-urlencoded":
            raise HttpError(415, "unsupported_media_type", "expected a form post")
        raw = await self.read_limited(request, self.deps.settings.api_max_bytes)
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
        text = form.get("Body", "")
        if len(text) > MAX_TEXT:
            raise HttpError(413, "too_large", "message too long")
        keyword = text.strip().upper()
        if keyword in self.keywords:
            await self._keyword(keyword, sender, ours, sid)
            return web.Response(text=TWIML_EMPTY, content_type="text/xml")
        event_id = stable_id("twilio", sid)
        conversation = conversation_id("sms", sender, ours)
        media = await self._media(event_id, form, num_media)
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
        await self.store(subjects.inbound("sms", conversation), event)
        return web.Response(text=TWIML_EMPTY, content_type="text/xml")

    async def _media(self, event_id: str, form: dict[str, str], num_media: int) -> list[Media]:
        """The message's media: downloaded (all at once, within
        ``PODIUM_MMS_DOWNLOAD_TIMEOUT_S``) and stored in the attachments store; each one
        not kept stays its URL, with a note saying why."""
        listed = [
            (index, Media(url=url, content_type=form.get(f"MediaContentType{index}", "")[:200]))
            for index in range(min(num_media, MAX_MEDIA))
            if (url := form.get(f"MediaUrl{index}"))
        ]
        if not listed:
            return []
        limit = self.deps.settings.attachments_max_count
        deadline = asyncio.get_running_loop().time() + self.deps.settings.mms_download_timeout_s
        fetched = await asyncio.gather(
            *(
                self._fetch(item, deadline)
                if position < limit
                else _refused(NotKept("too-many", f"not stored: more than {limit} media"))
                for position, (_, item) in enumerate(listed)
            )
        )
        media: list[Media] = []
        for (index, item), got in zip(listed, fetched, strict=True):
            if isinstance(got, NotKept):
                self.media_outcomes[got.outcome].inc()
                media.append(msgspec.structs.replace(item, note=got.note, size=got.size))
                continue
            kind = got.content_type or item.content_type
            if not self.fetcher.allowed_type(kind):
                refused = self.fetcher.type_refused(kind)
                self.media_outcomes[refused.outcome].inc()
                media.append(msgspec.structs.replace(item, note=refused.note))
                continue
            kept = await self.keep(
                "sms",
                f"{event_id}/{index}",
                got.data,
                msgspec.structs.replace(item, content_type=kind),
            )
            self.media_outcomes["stored" if kept.object else "store-full"].inc()
            media.append(kept)
        return media

    async def _fetch(self, item: Media, deadline: float) -> Fetched | NotKept:
        """One media item's bytes, or why it is not kept (this never raises)."""
        if not self.fetcher.configured:
            return NotKept("not-configured", NOT_CONFIGURED)
        if item.content_type and not self.fetcher.allowed_type(item.content_type):
            return self.fetcher.type_refused(item.content_type)
        try:
            async with asyncio.timeout_at(deadline):
                return await self.fetcher.fetch(item.url)
        except NotKept as refused:
            return refused
        except TimeoutError:
            timeout = self.deps.settings.mms_download_timeout_s
            return NotKept("failed", f"not downloaded: no answer within {timeout:g} s")
        except Exception as err:  # noqa: BLE001 - a download must never cost the message
            log.warning("mms media download failed", extra={"error": repr(err)[:300]})
            return NotKept("failed", "not downloaded: the download failed")

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
        await self.record(subjects.preference(fact.conversation_id), fact, "the opt-out")

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
        await self.record(subjects.delivery_status(command_id), fact, "the status")
        self.deps.metrics.statuses.labels(status).inc()
        return web.Response(text="")


async def _refused(why: NotKept) -> NotKept:
    return why


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
