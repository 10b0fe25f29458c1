"""What every ingress route shares: the error shape, its dependencies, storing events.

Each provider module (:mod:`~podium.ingress.api`, :mod:`~podium.ingress.twilio`,
:mod:`~podium.ingress.sendgrid`) authenticates, parses, makes one event and stores
it through :meth:`Route.store` (or :meth:`Route.record` for a provider's fact);
a rejected request publishes nothing. A publish that JetStream does not
acknowledge in time gets 503, so providers retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import msgspec
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, PubAck
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError
from nats.js.object_store import ObjectStore

from podium.common.backoff import backoff
from podium.common.bus import publish
from podium.common.kv import Store
from podium.contracts.events import Event, InboundMessage, Media
from podium.contracts.state import Conversation, ConversationReplies
from podium.ingress.config import IngressSettings
from podium.ingress.metrics import IngressMetrics
from podium.ingress.sender import DnsFunc

log = logging.getLogger("podium.ingress.handlers")

#: One publish attempt's wait for JetStream's ack; attempts repeat within
#: PODIUM_PUBLISH_TIMEOUT_S (see Route.durably).
_ATTEMPT_S = 2.0
#: JetStream's error code for a store that has used up its size limit.
STORE_FULL = 10077
MAX_TEXT = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A provider's routes: (method, path, route name for metrics, handler).
RouteTable = list[tuple[str, str, str, Handler]]


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


@dataclass
class Deps:
    """What the handlers need, passed in (no globals)."""

    settings: IngressSettings
    js: JetStreamContext
    metrics: IngressMetrics
    conversations: Store[Conversation] | None = None
    replies: Store[ConversationReplies] | None = None
    attachments: ObjectStore | None = None
    #: The files workers made, served by download links.
    artifacts: ObjectStore | None = None
    #: The client that downloads MMS media (made and closed by the service).
    http: aiohttp.ClientSession | None = None
    #: DNS TXT lookups of DKIM keys (None: dkimpy's resolver; tests inject their own).
    dkim_dns: DnsFunc | None = None


class Stored(NamedTuple):
    """Where an inbound message is: ``duplicate`` if it had been stored already (at ``seq``)."""

    duplicate: bool
    seq: int


class Route:
    """Base of each provider's routes: the dependencies and the one way to store."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        #: Labelled children of the accepted counter, looked up once (every request's path).
        self._accepted: dict[tuple[str, bool], Any] = {}

    def routes(self) -> RouteTable:
        """This provider's routes."""
        raise NotImplementedError

    async def store(self, subject: str, event: InboundMessage) -> Stored:
        """Store an inbound message (see ``durably``): whether it was there already, and where."""
        ack, tries = await self.durably(subject, event, "the message")
        # After a lost acknowledgement, "duplicate" may mean our own earlier attempt was
        # stored: only the first attempt's answer says whether someone else sent it.
        duplicate = bool(ack.duplicate) and tries == 0
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
        return Stored(duplicate, ack.seq)

    async def durably(self, subject: str, event: Event, what: str) -> tuple[PubAck, int]:
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
                full = isinstance(err, ServiceUnavailableError) and err.err_code == STORE_FULL
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

    def check_size(self, request: web.Request, limit: int) -> None:
        length = request.content_length
        if length is not None and length > limit:
            raise HttpError(413, "too_large", f"body over {limit} bytes")

    async def read_limited(self, request: web.Request, limit: int) -> bytes:
        self.check_size(request, limit)
        if request.content_length is not None:
            # Declared and within the limit: aiohttp reads exactly that much.
            return await request.read()
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise HttpError(413, "too_large", f"body over {limit} bytes")
        return bytes(body)

    async def keep(self, channel: str, object_name: str, data: bytes, media: Media) -> Media:
        """``media`` with ``data`` stored as ``object_name`` in the attachments store.

        Returned with ``object`` set; or with a ``note`` when there is no store or its
        share of the storage budget is used up (the message still goes through: a 503
        would lose all of it once the provider gives up retrying). Any other failure to
        store is a 503, so the provider retries.
        """
        store = self.deps.attachments
        if store is None:
            return msgspec.structs.replace(media, note="not stored: no attachment store")
        description = " ".join(part for part in (media.content_type, media.filename) if part)
        try:
            await store.put(
                object_name, data, meta=ObjectMeta(name=object_name, description=description)
            )
        except ServiceUnavailableError as err:
            if err.err_code != STORE_FULL:
                log.warning("could not store an attachment", extra={"error": repr(err)})
                raise HttpError(503, "unavailable", "could not store an attachment") from err
            log.warning("attachment store full; attachment left out")
            self.deps.metrics.ignored.labels(channel, "attachment store full").inc()
            return msgspec.structs.replace(media, note="not stored: the attachment store is full")
        except Exception as err:
            log.warning("could not store an attachment", extra={"error": repr(err)})
            raise HttpError(503, "unavailable", "could not store an attachment") from err
        return msgspec.structs.replace(media, object=object_name, size=len(data))

    async def record(self, subject: str, fact: Event, what: str) -> None:
        """Store a provider's fact for the service that owns what it changes; 503 if not."""
        await self.durably(subject, fact, what)
