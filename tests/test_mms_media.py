"""Inbound MMS media: downloaded from Twilio with the account's credentials and stored in
the ``attachments`` object store, within limits; what is not kept stays a URL, with a note.

A local fake plays Twilio's side as it really behaves with "Enforce HTTP Auth on Media
URLs" on: the media URL (``/2010-04-01/Accounts/AC…/Messages/MM…/Media/ME…``) wants HTTP
basic auth with the account SID and auth token, answers Twilio's JSON error without it,
and redirects (302) to a short-lived signed URL on a CDN (a second server here, as
``mms.twiliocdn.com`` is another host). Like S3 behind it, the CDN refuses a request
that carries an Authorization header besides its signed query: the credentials must
never leave for the redirect's host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.js import JetStreamContext
from yarl import URL

from podium.cli.natsserver import NatsServer
from podium.common.runtime import listen
from podium.contracts import streams
from podium.contracts.events import InboundMessage, Media
from podium.contracts.ids import stable_id
from podium.ingress.mms import NOT_CONFIGURED, MediaFetcher
from podium.ingress.service import IngressService
from podium.testing.services import in_process
from tests.test_ingress import TWILIO_TOKEN, Ingress, post_twilio, settings, stored, twilio_form

ACCOUNT = "AC" + "5" * 32
LIMIT = 4096
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)


@dataclass
class Item:
    """One stored media item of the fake: what the CDN serves for it, and how."""

    content_type: str
    data: bytes = b""
    #: "length" (Content-Length), "chunked" (no length, never-ending), "hang" (no answer).
    mode: str = "length"


@dataclass
class Seen:
    """A request the fake received."""

    path: str
    authorization: str


@dataclass
class FakeTwilioMedia:
    """Twilio's media URLs (basic auth, 302 to the CDN) and the CDN, on two ports."""

    account_sid: str
    auth_token: str
    items: dict[str, Item] = field(default_factory=dict)
    api_seen: list[Seen] = field(default_factory=list)
    cdn_seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when a client hung up on a never-ending download.
    cut_off: asyncio.Event = field(default_factory=asyncio.Event)
    api_port: int = 0
    cdn_port: int = 0
    _runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def api_host(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    def add(self, item: Item, message_sid: str = "MM" + "1" * 32) -> str:
        """Store ``item``; the MediaUrl Twilio would post for it."""
        sid = "ME" + secrets.token_hex(16)
        self.items[sid] = item
        return (
            f"http://{self.api_host}/2010-04-01/Accounts/{self.account_sid}"
            f"/Messages/{message_sid}/Media/{sid}"
        )

    async def start(self) -> FakeTwilioMedia:
        api = web.Application()
        api.router.add_get(
            "/2010-04-01/Accounts/{account}/Messages/{message}/Media/{media}", self._media
        )
        cdn = web.Application()
        cdn.router.add_get("/{account}/{media}", self._cdn)
        ports = []
        for app in (api, cdn):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            ports.append(await listen(runner, "127.0.0.1", 0))
        self.api_port, self.cdn_port = ports
        return self

    async def stop(self) -> None:
        self.release.set()
        for runner in self._runners:
            await runner.cleanup()

    async def _media(self, request: web.Request) -> web.StreamResponse:
        self.api_seen.append(Seen(request.path, request.headers.get("Authorization", "")))
        login, password = _basic(request.headers.get("Authorization", ""))
        if (
            login != self.account_sid
            or request.match_info["account"] != self.account_sid
            or not secrets.compare_digest(password, self.auth_token)
        ):
            return _twilio_error(401, 20003, "Authenticate")
        media = request.match_info["media"]
        if media not in self.items:
            return _twilio_error(404, 20404, "The requested resource was not found")
        expires = int(time.time()) + 4 * 3600
        signature = base64.urlsafe_b64encode(os.urandom(24)).decode()
        location = (
            f"http://127.0.0.1:{self.cdn_port}/{self.account_sid}/{media}"
            f"?Expires={expires}&Signature={signature}&Key-Pair-Id=APKAFAKE"
        )
        raise web.HTTPFound(location)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_seen.append(Seen(request.path, request.headers.get("Authorization", "")))
        if "Authorization" in request.headers:
            # S3's answer to a second authentication mechanism besides the signed URL.
            return web.Response(
                status=400,
                content_type="application/xml",
                text="<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism "
                "allowed; only the X-Amz-Algorithm query parameter, Signature query string "
                "parameter or the Authorization header should be specified</Message></Error>",
            )
        if "Signature" not in request.query:
            return web.Response(status=403, content_type="application/xml", text="<Error/>")
        item = self.items.get(request.match_info["media"])
        if item is None:
            return web.Response(status=404)
        if item.mode == "hang":
            await self.release.wait()
            return web.Response(body=item.data, content_type=item.content_type)
        if item.mode == "chunked":
            response = web.StreamResponse(headers={"Content-Type": item.content_type})
            response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b"\x00" * 1024
            try:
                # Far past any limit: only a client that stops reading ends this early.
                for _ in range(64 * 1024):
                    await response.write(chunk)
            except ConnectionError:
                self.cut_off.set()
            return response
        return web.Response(body=item.data, headers={"Content-Type": item.content_type})


def _basic(header: str) -> tuple[str, str]:
    """(login, password) of an ``Authorization: Basic`` header; empty if it is none."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        login, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:
        return "", ""
    return login, password


def _twilio_error(status: int, code: int, message: str) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else {}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


@pytest.fixture
async def twilio_media() -> AsyncIterator[FakeTwilioMedia]:
    fake = await FakeTwilioMedia(ACCOUNT, TWILIO_TOKEN).start()
    try:
        yield fake
    finally:
        await fake.stop()


Start = Callable[..., Awaitable[Ingress]]


@pytest.fixture
async def start_ingress(
    nats_server: NatsServer, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> AsyncIterator[Start]:
    """Start an ingress that downloads media from the fake (settings may be overridden)."""
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def start(**extra: Any) -> Ingress:
            values: dict[str, Any] = {
                "twilio_account_sid": ACCOUNT,
                "twilio_media_hosts": [twilio_media.api_host],
                "mms_max_bytes": LIMIT,
            }
            values.update(extra)
            service = IngressService(settings(nats_server, **values))
            running = await stack.enter_async_context(in_process(service, service.settings))
            return Ingress(running, service, http)

        yield start


def mms(sid: str, *media: tuple[str, str]) -> dict[str, str]:
    """A signed-webhook form of an MMS with ``media`` as (MediaUrl, MediaContentType)."""
    fields = {"NumMedia": str(len(media)), "Body": "See the picture"}
    for index, (url, kind) in enumerate(media):
        fields[f"MediaUrl{index}"] = url
        fields[f"MediaContentType{index}"] = kind
    return twilio_form(sid, **fields)


async def received(ingress: Ingress, js: JetStreamContext, form: dict[str, str]) -> list[Media]:
    """Post the MMS; the media of the one message stored."""
    resp = await post_twilio(ingress, form)
    assert resp.status == 200, await resp.text()
    (event,) = await stored(js, expect=1)
    assert isinstance(event, InboundMessage)
    assert event.event_id == stable_id("twilio", form["MessageSid"])
    return event.media


def outcome(ingress: Ingress, name: str) -> float:
    value = ingress.running.health.registry.get_sample_value(
        "podium_ingress_mms_media_total", {"outcome": name}
    )
    return value or 0.0


async def test_an_mms_image_is_downloaded_with_the_credentials_and_stored(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress()
    url = twilio_media.add(Item("image/png", PNG))
    sid = "MM" + "a" * 32
    (media,) = await received(ingress, js, mms(sid, (url, "image/png")))
    assert media.object == f"{stable_id('twilio', sid)}/0"
    assert (media.url, media.content_type, media.size, media.note) == (
        url,
        "image/png",
        len(PNG),
        "",
    )
    objects = await js.object_store(streams.ATTACHMENTS)
    assert (await objects.get(media.object)).data == PNG
    # Basic auth to Twilio's host; the redirect's host never saw the credentials.
    (api,) = twilio_media.api_seen
    expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{TWILIO_TOKEN}".encode()).decode()
    assert api.authorization == expected
    (cdn,) = twilio_media.cdn_seen
    assert cdn.authorization == ""
    assert outcome(ingress, "stored") == 1


async def test_media_over_the_limit_or_of_a_type_not_allowed_get_a_note(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress()
    big = twilio_media.add(Item("image/jpeg", os.urandom(LIMIT + 1)))
    endless = twilio_media.add(Item("video/mp4", mode="chunked"))
    exe = twilio_media.add(Item("application/x-msdownload", b"MZ" + os.urandom(100)))
    disguised = twilio_media.add(Item("application/x-msdownload", b"MZ" + os.urandom(100)))
    small = twilio_media.add(Item("text/vcard", b"BEGIN:VCARD\r\nEND:VCARD\r\n"))
    form = mms(
        "MM" + "b" * 32,
        (big, "image/jpeg"),
        (endless, "video/mp4"),
        (exe, "application/x-msdownload"),
        (disguised, "image/jpeg"),
        (small, "text/vcard"),
    )
    oversize, unending, refused, lied, kept = await received(ingress, js, form)
    for item, url in ((oversize, big), (unending, endless)):
        assert (item.url, item.object) == (url, "")
        assert item.note == f"not stored: over the {LIMIT} byte limit (PODIUM_MMS_MAX_BYTES)"
    assert oversize.size == LIMIT + 1  # as its Content-Length said
    # The one without a length was not read to its end: the ingress hung up.
    await asyncio.wait_for(twilio_media.cut_off.wait(), timeout=10)
    for item, url in ((refused, exe), (lied, disguised)):
        assert (item.url, item.object) == (url, "")
        assert item.note == (
            "not stored: application/x-msdownload is not an allowed type (PODIUM_MMS_TYPES)"
        )
    # A type refused as Twilio declared it is not even fetched.
    assert not any(exe.endswith(seen.path) for seen in twilio_media.api_seen)
    assert kept.object and kept.content_type == "text/vcard"
    assert (outcome(ingress, "too-large"), outcome(ingress, "type")) == (2, 2)
    objects = await js.object_store(streams.ATTACHMENTS)
    assert (await objects.get(kept.object)).data == b"BEGIN:VCARD\r\nEND:VCARD\r\n"


async def test_media_elsewhere_than_twilio_are_not_fetched(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress()
    # A server that exists (the CDN's) but is not a media host; and a URL that is none.
    elsewhere = f"http://127.0.0.1:{twilio_media.cdn_port}/{ACCOUNT}/ME{'0' * 32}?Signature=x"
    form = mms("MM" + "c" * 32, (elsewhere, "image/png"), ("not a url", "image/png"))
    first, second = await received(ingress, js, form)
    assert (first.url, first.object) == (elsewhere, "")
    assert first.note == (
        "not downloaded: 127.0.0.1 is not a Twilio media host (PODIUM_TWILIO_MEDIA_HOSTS)"
    )
    assert second.object == ""
    assert second.note.startswith("not downloaded:")
    assert twilio_media.cdn_seen == [] and twilio_media.api_seen == []


async def test_without_credentials_media_are_kept_as_urls(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress(twilio_account_sid="")
    url = twilio_media.add(Item("image/png", PNG))
    (media,) = await received(ingress, js, mms("MM" + "d" * 32, (url, "image/png")))
    assert (media.url, media.content_type, media.object) == (url, "image/png", "")
    assert media.note == NOT_CONFIGURED
    assert NOT_CONFIGURED == (
        "not downloaded: PODIUM_TWILIO_ACCOUNT_SID/PODIUM_TWILIO_AUTH_TOKEN not set"
    )
    assert twilio_media.api_seen == []


async def test_a_refused_download_is_noted(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress(twilio_account_sid="AC" + "6" * 32)  # not this account's
    url = twilio_media.add(Item("image/png", PNG))
    (unauthorized,) = await received(ingress, js, mms("MM" + "e" * 32, (url, "image/png")))
    assert unauthorized.object == ""
    assert unauthorized.note == "not downloaded: the media host answered HTTP 401"
    assert twilio_media.cdn_seen == []


async def test_a_slow_media_host_cannot_hold_the_webhook(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress(mms_download_timeout_s=1.0)
    slow = twilio_media.add(Item("image/png", PNG, mode="hang"))
    fast = twilio_media.add(Item("image/png", PNG))
    started = time.monotonic()
    form = mms("MM" + "f" * 32, (slow, "image/png"), (fast, "image/png"))
    late, kept = await received(ingress, js, form)
    assert time.monotonic() - started < 10  # well inside Twilio's 15 s
    assert late.object == ""
    assert late.note.startswith("not downloaded:")
    assert kept.object  # downloaded alongside, not after, the slow one
    assert outcome(ingress, "failed") == 1


async def test_only_so_many_media_are_kept(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress(attachments_max_count=1)
    urls = [twilio_media.add(Item("image/png", PNG)) for _ in range(2)]
    first, second = await received(
        ingress, js, mms("MM" + "0" * 32, *((u, "image/png") for u in urls))
    )
    assert first.object
    assert (second.url, second.object, second.note) == (
        urls[1],
        "",
        "not stored: more than 1 media",
    )
    assert len(twilio_media.api_seen) == 1


async def test_an_mms_still_goes_through_when_the_attachment_store_is_full(
    start_ingress: Start, js: JetStreamContext, twilio_media: FakeTwilioMedia
) -> None:
    ingress = await start_ingress()
    # The attachments store's share of the storage budget, used up (after the ingress
    # provisioned it).
    info = await js.stream_info(f"OBJ_{streams.ATTACHMENTS}")
    await js.update_stream(info.config.evolve(max_bytes=1500))
    await (await js.object_store(streams.ATTACHMENTS)).put("earlier", b"x" * 1000)
    url = twilio_media.add(Item("image/png", PNG))
    (media,) = await received(ingress, js, mms("MM" + "9" * 32, (url, "image/png")))
    assert (media.url, media.object) == (url, "")
    assert media.note == "not stored: the attachment store is full"
    assert outcome(ingress, "store-full") == 1


def test_which_urls_are_twilio_media_hosts(nats_server: NatsServer) -> None:
    fetcher = MediaFetcher(
        settings(nats_server, twilio_account_sid=ACCOUNT, twilio_media_hosts=["api.twilio.com"]),
        None,
    )
    for url, allowed in [
        ("https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1", True),
        ("https://API.twilio.com:443/x", True),
        ("http://api.twilio.com/x", False),  # the credentials would go in the clear
        ("https://api.twilio.com:8443/x", False),
        ("https://api.twilio.com.evil.example/x", False),
        ("https://evil.example/?u=https://api.twilio.com/", False),
        ("ftp://api.twilio.com/x", False),
    ]:
        assert fetcher.media_host(URL(url)) is allowed, url
    local = MediaFetcher(settings(nats_server, twilio_media_hosts=["127.0.0.1:8123"]), None)
    assert local.media_host(URL("http://127.0.0.1:8123/m"))
    assert not local.media_host(URL("http://127.0.0.1:8124/m"))
    assert not local.configured  # no account SID
