"""Ingress: 2xx only after JetStream stored the event; bad input gets 4xx and publishes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js import JetStreamContext
from twilio.request_validator import RequestValidator

from podium.cli.natsserver import NatsServer
from podium.common.config import Secret
from podium.common.provision import ensure_stream
from podium.contracts import streams
from podium.contracts.events import InboundMessage, decode
from podium.ingress.auth import TwilioSignatures
from podium.ingress.config import IngressSettings
from podium.ingress.service import IngressService
from podium.testing.services import Running, in_process

TOKEN = "s3cret-token-for-tests-0123456789"
TWILIO_TOKEN = "twilio-auth-token-0123456789abcdef"
PUBLIC = "https://podium.example.com"


class Ingress:
    """A running ingress and an HTTP client for it."""

    def __init__(self, running: Running, service: IngressService, http: aiohttp.ClientSession):
        self.running = running
        self.service = service
        self.http = http

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"


def settings(nats: NatsServer, **extra: Any) -> IngressSettings:
    values: dict[str, Any] = {
        "nats_url": nats.url,
        "port": 0,
        "health_port": 0,
        "api_tokens": Secret(f"acme:{TOKEN}"),
        "public_url": PUBLIC,
        "twilio_auth_token": Secret(TWILIO_TOKEN),
        "sendgrid_basic_auth": Secret("sendgrid:parse-pass-123"),
        "own_addresses": ["podium@example.com"],
        "api_max_bytes": 4096,
    }
    values.update(extra)
    return IngressSettings(**values)


@pytest.fixture
async def ingress(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Ingress]:
    service = IngressService(settings(nats_server))
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


async def stored(js: JetStreamContext, expect: int | None = None) -> list[InboundMessage]:
    """Every event in INBOUND (waits briefly for ``expect`` of them)."""
    info = await js.stream_info("INBOUND")
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg("INBOUND", seq)
        assert msg.data is not None
        event = decode(msg.data)
        assert isinstance(event, InboundMessage)
        events.append(event)
    if expect is not None:
        assert len(events) == expect
    return events


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- API -------------------------------------------------------------------


async def test_api_message_is_stored_then_acknowledged(
    ingress: Ingress, js: JetStreamContext
) -> None:
    async with ingress.http.post(
        f"{ingress.url}/v1/messages",
        json={"text": "Summarise Q3", "from": "ops@acme.test", "thread_id": "th-1"},
        headers=bearer(),
    ) as resp:
        assert resp.status == 202
        body = await resp.json()
    (event,) = await stored(js, expect=1)
    assert event.event_id == body["event_id"]
    assert event.conversation_id == body["conversation_id"]
    assert (event.channel, event.text, event.client, event.thread_id) == (
        "api",
        "Summarise Q3",
        "acme",
        "th-1",
    )
    msg = await js.get_msg("INBOUND", 1)
    assert msg.headers is not None
    assert msg.headers["Podium-Event"] == "inbound.message"
    assert msg.headers["Nats-Msg-Id"] == event.event_id


async def test_idempotency_key_stores_once(ingress: Ingress, js: JetStreamContext) -> None:
    answers = []
    for _ in range(3):
        async with ingress.http.post(
            f"{ingress.url}/v1/messages",
            json={"text": "once"},
            headers={**bearer(), "Idempotency-Key": "order-42"},
        ) as resp:
            assert resp.status == 202
            answers.append(await resp.json())
    assert [a["duplicate"] for a in answers] == [False, True, True]
    assert len({a["event_id"] for a in answers}) == 1
    await stored(js, expect=1)


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"text": "hi"', bearer(), 400, "malformed_json"),
        (b'{"text": "hi", "channel": "fax"}', bearer(), 422, "unknown_channel"),
        (b'{"text": "hi", "colour": "red"}', bearer(), 422, "invalid"),
        (b'{"text": "   "}', bearer(), 422, "invalid"),
        (b'{"text": "' + b"x" * 5000 + b'"}', bearer(), 413, "too_large"),
        (b'{"text": "hi"}', bearer("wrong-token-wrong-token"), 401, "unauthorized"),
        (b'{"text": "hi"}', {}, 401, "unauthorized"),
        (b'{"text": "hi"}', {"Authorization": f"Basic {TOKEN}"}, 401, "unauthorized"),
    ],
    ids=[
        "malformed",
        "unknown-channel",
        "unknown-field",
        "empty",
        "oversize",
        "wrong-token",
        "no-token",
        "wrong-scheme",
    ],
)
async def test_bad_api_requests_publish_nothing(
    ingress: Ingress,
    js: JetStreamContext,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    async with ingress.http.post(
        f"{ingress.url}/v1/messages",
        data=body,
        headers={**headers, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == status
        payload = await resp.json()
    assert payload["error"]["code"] == code
    await stored(js, expect=0)


async def test_unknown_route_has_the_same_error_shape(ingress: Ingress) -> None:
    for path in ("/v1/nope", "/", "/webhooks/twilio/sms/extra"):
        async with ingress.http.get(f"{ingress.url}{path}") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
    for method, path, allowed in [
        ("GET", "/v1/messages", "POST"),
        ("PUT", "/webhooks/twilio/sms", "POST"),
        ("DELETE", "/v1/conversations/api-123", "GET, HEAD"),
    ]:
        async with ingress.http.request(method, f"{ingress.url}{path}") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == allowed
            assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_503_when_jetstream_cannot_store(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    service = IngressService(settings(nats_server, publish_timeout_s=1.0, provision=False))
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        await js.delete_stream("INBOUND")
        await post_and_expect_503(Ingress(running, service, http))


async def post_and_expect_503(ingress: Ingress) -> None:
    async with ingress.http.post(
        f"{ingress.url}/v1/messages", json={"text": "hi"}, headers=bearer()
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "unavailable"


async def test_a_store_refused_for_a_moment_is_tried_again_before_any_503(
    ingress: Ingress, js: JetStreamContext
) -> None:
    # As while a stream's leader is re-elected: nothing takes the subject for a moment.
    await js.delete_stream("INBOUND")

    async def back_soon() -> None:
        await asyncio.sleep(1.0)
        await ensure_stream(js, streams.INBOUND)

    restore = asyncio.create_task(back_soon())
    async with ingress.http.post(
        f"{ingress.url}/v1/messages",
        json={"text": "hi"},
        headers={**bearer(), "Idempotency-Key": "k-failover-1"},
    ) as resp:
        status = resp.status
    await restore
    assert status == 202
    (event,) = await stored(js, 1)
    assert event.text == "hi"


# --- Twilio ----------------------------------------------------------------


def twilio_form(sid: str = "SM0123456789abcdef0123456789abcdef", **extra: str) -> dict[str, str]:
    form = {
        "MessageSid": sid,
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "From": "+15550100001",
        "To": "+15550100999",
        "Body": "Book the meeting room for Tuesday",
        "NumMedia": "0",
    }
    form.update(extra)
    return form


async def post_twilio(
    ingress: Ingress, form: dict[str, str], *, url: str | None = None, signature: str | None = None
) -> aiohttp.ClientResponse:
    signed_url = url or f"{PUBLIC}/webhooks/twilio/sms"
    sig = (
        signature
        if signature is not None
        else RequestValidator(TWILIO_TOKEN).compute_signature(signed_url, form)
    )
    headers = {"X-Twilio-Signature": sig} if sig else {}
    resp = await ingress.http.post(f"{ingress.url}/webhooks/twilio/sms", data=form, headers=headers)
    await resp.read()
    return resp


async def test_signed_twilio_sms_is_stored_and_answered_with_twiml(
    ingress: Ingress, js: JetStreamContext
) -> None:
    form = twilio_form(
        NumMedia="1", MediaUrl0="https://api.twilio.com/m/1.jpg", MediaContentType0="image/jpeg"
    )
    resp = await post_twilio(ingress, form)
    assert resp.status == 200
    assert resp.content_type == "text/xml"
    assert "<Response>" in await resp.text()
    (event,) = await stored(js, expect=1)
    assert (event.channel, event.sender, event.recipients) == (
        "sms",
        "+15550100001",
        ["+15550100999"],
    )
    assert event.media[0].url == "https://api.twilio.com/m/1.jpg"
    # No account SID configured: the media is kept as its URL, saying why.
    assert event.media[0].object == ""
    assert event.media[0].note == (
        "not downloaded: PODIUM_TWILIO_ACCOUNT_SID/PODIUM_TWILIO_AUTH_TOKEN not set"
    )
    # A retry of the same MessageSid is acknowledged but stored once.
    assert (await post_twilio(ingress, form)).status == 200
    await stored(js, expect=1)


@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
        st.text(st.characters(codec="utf-8"), max_size=40),
        max_size=12,
    )
)
def test_signatures_are_twilios(form: dict[str, str]) -> None:
    # The ingress's keyed HMAC signs exactly as Twilio's own library does, and accepts
    # the URL with its default port spelled either way (as RequestValidator does).
    ours = TwilioSignatures(TWILIO_TOKEN)
    url = f"{PUBLIC}/webhooks/twilio/sms?x=1"
    theirs = RequestValidator(TWILIO_TOKEN).compute_signature(url, form)
    assert ours.sign(url, list(form.items())) == theirs
    with_port = RequestValidator(TWILIO_TOKEN).compute_signature(
        url.replace(".example.com/", ".example.com:443/"), form
    )
    assert ours.valid(url, list(form.items()), with_port)
    tampered = ("B" if theirs[0] == "A" else "A") + theirs[1:]
    assert not ours.valid(url, list(form.items()), tampered)
    assert not TwilioSignatures("another-token").valid(url, list(form.items()), theirs)


@pytest.mark.parametrize("case", ["missing", "invalid", "wrong-url", "tampered"])
async def test_bad_twilio_signatures_are_refused(
    ingress: Ingress, js: JetStreamContext, case: str
) -> None:
    form = twilio_form()
    if case == "missing":
        resp = await post_twilio(ingress, form, signature="")
    elif case == "invalid":
        resp = await post_twilio(ingress, form, signature=base64.b64encode(b"x" * 20).decode())
    elif case == "wrong-url":
        # Signed for the pod's own address, not the configured public URL.
        resp = await post_twilio(ingress, form, url=f"{ingress.url}/webhooks/twilio/sms")
    else:
        sig = RequestValidator(TWILIO_TOKEN).compute_signature(
            f"{PUBLIC}/webhooks/twilio/sms", form
        )
        resp = await post_twilio(ingress, {**form, "Body": "Wire $5000 now"}, signature=sig)
    assert resp.status == 403
    await stored(js, expect=0)


async def test_twilio_without_required_fields_is_refused(
    ingress: Ingress, js: JetStreamContext
) -> None:
    form = twilio_form()
    del form["From"]
    resp = await post_twilio(ingress, form)
    assert resp.status == 400
    await stored(js, expect=0)


# --- SendGrid --------------------------------------------------------------


def sendgrid_form(**fields: str) -> aiohttp.FormData:
    base = {
        "from": "Grace Hopper <grace@example.org>",
        "to": "podium@example.com",
        "subject": "Quarterly numbers",
        "text": "Can you compile the numbers?\n\n"
        "On Mon, Nov 2, 2026 at 9:00 AM Podium wrote:\n> old",
        "headers": "Message-ID: <abc123@example.org>\nFrom: grace@example.org\n"
        "Subject: Quarterly numbers\n",
        "envelope": json.dumps({"from": "grace@example.org", "to": ["podium@example.com"]}),
        "charsets": json.dumps({"text": "UTF-8", "subject": "UTF-8", "from": "UTF-8"}),
    }
    base.update(fields)
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in base.items():
        form.add_field(name, value)
    return form


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


SENDGRID_AUTH = basic("sendgrid", "parse-pass-123")


async def test_sendgrid_email_is_stored_with_thread_facts(
    ingress: Ingress, js: JetStreamContext
) -> None:
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound", data=sendgrid_form(), headers=SENDGRID_AUTH
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    (event,) = await stored(js, expect=1)
    assert event.conversation_id == body["conversation_id"]
    assert (event.channel, event.sender, event.subject) == (
        "email",
        "grace@example.org",
        "Quarterly numbers",
    )
    assert event.text == "Can you compile the numbers?"  # quoted history stripped
    assert event.message_id == "<abc123@example.org>"

    # A reply in the same thread joins the same conversation.
    reply = sendgrid_form(
        text="Also add Q2, please.",
        headers="Message-ID: <def456@example.org>\nIn-Reply-To: <podium-1@example.com>\n"
        "References: <abc123@example.org> <podium-1@example.com>\n",
    )
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound", data=reply, headers=SENDGRID_AUTH
    ) as resp:
        assert resp.status == 200
    first, second = await stored(js, expect=2)
    assert second.conversation_id == first.conversation_id


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ("Message-ID: <a1@x.org>\nAuto-Submitted: auto-replied\n", "auto-submitted"),
        ("Message-ID: <a2@x.org>\nPrecedence: bulk\n", "precedence-bulk"),
        ("Message-ID: <a3@x.org>\nList-Id: <team.lists.x.org>\n", "mailing-list"),
        ("Message-ID: <a4@x.org>\nX-Autoreply: yes\n", "auto-reply"),
        ("Message-ID: <a5@x.org>\nReturn-Path: <>\n", "bounce"),
    ],
)
async def test_automatic_mail_is_never_forwarded(
    ingress: Ingress, js: JetStreamContext, headers: str, reason: str
) -> None:
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound",
        data=sendgrid_form(headers=headers),
        headers=SENDGRID_AUTH,
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["ignored"] == reason
    await stored(js, expect=0)


async def test_sendgrid_raw_mode(ingress: Ingress, js: JetStreamContext) -> None:
    raw = (
        "From: Alan <alan@example.net>\r\nTo: podium@example.com\r\n"
        "Subject: =?utf-8?q?Caf=C3=A9?=\r\n"
        "Message-ID: <raw1@example.net>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        "Un caf=E9, s'il vous pla=EEt.\r\n"
    )
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("email", raw)
    form.add_field("envelope", json.dumps({"from": "alan@example.net"}))
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound", data=form, headers=SENDGRID_AUTH
    ) as resp:
        assert resp.status == 200, await resp.text()
    (event,) = await stored(js, expect=1)
    assert event.subject == "Café"
    assert event.text == "Un café, s'il vous plaît."


@pytest.mark.parametrize("auth", [{}, basic("sendgrid", "wrong"), basic("other", "parse-pass-123")])
async def test_sendgrid_needs_basic_auth(
    ingress: Ingress, js: JetStreamContext, auth: dict[str, str]
) -> None:
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound", data=sendgrid_form(), headers=auth
    ) as resp:
        assert resp.status == 401
    await stored(js, expect=0)


async def test_sendgrid_not_multipart_is_refused(ingress: Ingress, js: JetStreamContext) -> None:
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound", data={"from": "a@b.c"}, headers=SENDGRID_AUTH
    ) as resp:
        assert resp.status == 415
    await stored(js, expect=0)


async def test_concurrent_requests_all_stored(ingress: Ingress, js: JetStreamContext) -> None:
    async def one(n: int) -> int:
        async with ingress.http.post(
            f"{ingress.url}/v1/messages",
            json={"text": f"n{n}"},
            headers={**bearer(), "Idempotency-Key": f"k{n}"},
        ) as resp:
            return resp.status

    statuses = await asyncio.gather(*(one(n) for n in range(50)))
    assert statuses == [202] * 50
    await stored(js, expect=50)
