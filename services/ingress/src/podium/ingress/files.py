"""Download links: ``GET /v1/files/<token>`` streams an artifact from the ``artifacts`` store.

The token (:mod:`podium.common.links`) is the credential, so the route takes no
bearer token: links go to people in SMS, email and API replies. It names one
object and an expiry, signed under ``PODIUM_LINK_SECRET``. A token that is not
ours and a valid one for an object that is gone answer the same 404; an expired
one answers 410. The token is never logged (it is the file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import string
from typing import Any
from urllib.parse import quote

from aiohttp import web
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ObjectInfo
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_DIGEST_TYPE, OBJ_STREAM_TEMPLATE

from podium.common import links
from podium.contracts import streams
from podium.ingress.base import Deps, HttpError, Route, RouteTable

log = logging.getLogger("podium.ingress.handlers")

PushSubscription = JetStreamContext.PushSubscription

DEFAULT_TYPE = "application/octet-stream"
#: type/subtype as RFC 6838 allows their names (no parameters, nothing to inject).
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w!#$&^.+-]{0,126}/[A-Za-z0-9][\w!#$&^.+-]{0,126}", re.ASCII)
#: What the quoted ``filename=`` fallback keeps as it is; anything else becomes ``_``.
_PLAIN = frozenset(string.ascii_letters + string.digits + " ._-()+,=@")
#: How long to wait for the next chunk of an object before giving up on the download.
CHUNK_WAIT_S = 10.0
OUTCOMES = ("served", "invalid", "expired", "missing", "disabled", "unavailable", "failed")


def media_type(description: str | None) -> str:
    """The media type an object's description holds (its first word), or the default."""
    first = (description or "").split(maxsplit=1)
    if first and _MEDIA_TYPE.fullmatch(first[0]):
        return first[0].lower()
    return DEFAULT_TYPE


def content_disposition(name: str) -> str:
    """``attachment`` with the last component of ``name`` as the file name: a plain
    quoted fallback, and the exact name as RFC 6266 / 5987 ``filename*``."""
    filename = name.rsplit("/", 1)[-1].strip() or "download"
    plain = "".join(c if c in _PLAIN else "_" for c in filename)
    exact = quote(filename, safe="")
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{exact}"


def _digest_of(info: ObjectInfo) -> bytes | None:
    """The SHA-256 an object's metadata promises, if it has a readable one."""
    text = info.digest or ""
    if not text.upper().startswith(OBJ_DIGEST_TYPE.upper()):
        return None
    value = text[len(OBJ_DIGEST_TYPE) :]
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


class FileRoutes(Route):
    """The download-link route."""

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.secret = deps.settings.link_secret.reveal()
        self.outcomes: dict[str, Any] = {o: deps.metrics.files.labels(o) for o in OUTCOMES}

    def routes(self) -> RouteTable:
        """``GET /v1/files/{token}``."""
        return [("GET", links.PATH + "{token}", "files", self.download)]

    def _refuse(self, outcome: str) -> HttpError:
        self.outcomes[outcome].inc()
        if outcome == "expired":
            return HttpError(410, "expired", "this download link has expired")
        if outcome == "unavailable":
            return HttpError(503, "unavailable", "the file cannot be read now; retry later")
        # Not ours, off, or gone: one answer, so a link tells nothing about the store.
        return HttpError(404, "not_found", "no such file")

    async def download(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/files/<token>``: the artifact the token names, as an attachment."""
        store = self.deps.artifacts
        if not self.secret or store is None:
            raise self._refuse("disabled")
        try:
            name = links.check(request.match_info["token"], self.secret)
        except links.LinkError as err:
            raise self._refuse("expired" if err.reason == "expired" else "invalid") from None
        try:
            info = await store.get_info(name)
        except NotFoundError:
            raise self._refuse("missing") from None
        except Exception as err:
            log.warning("could not read an artifact's metadata", extra={"error": repr(err)})
            raise self._refuse("unavailable") from err
        if info.deleted or not info.nuid or info.is_link():
            raise self._refuse("missing")
        size = info.size or 0
        sub = None
        if size:
            try:
                sub = await self.deps.js.subscribe(
                    OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=streams.ARTIFACTS, obj=info.nuid),
                    stream=OBJ_STREAM_TEMPLATE.format(bucket=streams.ARTIFACTS),
                    ordered_consumer=True,
                )
            except Exception as err:
                log.warning("could not read an artifact", extra={"error": repr(err)})
                raise self._refuse("unavailable") from err
        response = web.StreamResponse(
            headers={
                "Content-Disposition": content_disposition(name),
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "private, no-store",
                "Content-Security-Policy": "default-src 'none'; sandbox",
                "Referrer-Policy": "no-referrer",
            }
        )
        response.content_type = media_type(info.description)
        response.content_length = size
        try:
            await response.prepare(request)
            if sub is not None and not await self._send(sub, info, response):
                # Headers are gone: the one way left to say "incomplete" is to cut it short.
                self.outcomes["failed"].inc()
                if request.transport is not None:
                    request.transport.close()
                return response
        except ConnectionError:
            # The client went away mid-download.
            self.outcomes["failed"].inc()
            return response
        finally:
            if sub is not None:
                await _unsubscribe(sub)
        self.outcomes["served"].inc()
        self.deps.metrics.file_bytes.inc(size)
        log.debug("file served", extra={"object": name, "size": size})
        return response

    async def _send(
        self, sub: PushSubscription, info: ObjectInfo, response: web.StreamResponse
    ) -> bool:
        """Write the object's chunks as they arrive; whether all of it checked out.

        The last chunk is held back until the digest is checked, so a corrupt object
        is never delivered whole.
        """
        expected = _digest_of(info)
        size = info.size or 0
        digest = hashlib.sha256()
        held = b""
        seen = 0
        while True:
            try:
                msg = await sub.next_msg(timeout=CHUNK_WAIT_S)
            except (NatsTimeoutError, TimeoutError):
                log.warning("an artifact's chunks stopped arriving")
                return False
            except Exception as err:  # noqa: BLE001 - the connection failed: cut it short
                log.warning("could not read an artifact", extra={"error": repr(err)})
                return False
            data = msg.data or b""
            seen += len(data)
            if seen > size:
                break
            digest.update(data)
            if held:
                await response.write(held)
            held = data
            if msg.metadata.num_pending == 0:
                break
        if seen != size or (expected is not None and digest.digest() != expected):
            log.warning("an artifact does not match its metadata", extra={"size": size})
            return False
        await response.write(held)
        return True


async def _unsubscribe(sub: PushSubscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as err:  # noqa: BLE001 - a closed connection: nothing to clean up
        log.debug("could not unsubscribe", extra={"error": repr(err)})
