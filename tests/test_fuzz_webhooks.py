"""Property-based fuzzing of every public endpoint (hypothesis).

Whatever arrives — signed or not, well-formed or not — the ingress answers
without a 5xx (503 is the one allowed: JetStream could not store), keeps
running, and stores nothing for a request it refused.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext
from twilio.request_validator import RequestValidator

from podium.cli.natsserver import NatsServer
from podium.contracts import streams
from podium.ingress.service import IngressService
from podium.testing.sendgrid import Part, multipart_body
from podium.testing.services import in_process
from tests.test_ingress import PUBLIC, SENDGRID_AUTH, TOKEN, TWILIO_TOKEN, Ingress
from tests.test_ingress import settings as ingress_settings

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CORPUS = [p.read_bytes() for p in sorted((Path(__file__).parent / "data" / "email").glob("*.eml"))]
TWILIO_FIELDS = [
    "From",
    "To",
    "Body",
    "MessageSid",
    "NumMedia",
    "MediaUrl0",
    "MediaContentType0",
    "MessageStatus",
    "ErrorCode",
    "AccountSid",
    "SmsSid",
]
CHARSETS = [
    "utf-8",
    "UTF-8",
    "iso-8859-1",
    "windows-1252",
    "iso-2022-jp",
    "koi8-r",
    "utf-16",
    "x-bogus",
    "",
    "utf-8\x00",
    "ascii",
]

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
texts = st.text(max_size=60)
words = st.text(alphabet=string.ascii_letters + string.digits + "+-@._ ", max_size=30)
twilio_values = st.one_of(
    texts,
    words,
    st.sampled_from(["STOP", "start", "HELP", "+15550100001", "+15550100999", "-1", "99", "1"]),
    st.from_regex(r"SM[0-9a-f]{32}", fullmatch=True),
    st.sampled_from(["sent", "delivered", "undelivered", "failed", "read", "queued"]),
)
twilio_forms = st.dictionaries(
    st.one_of(st.sampled_from(TWILIO_FIELDS), texts), twilio_values, max_size=8
)


@pytest.fixture
async def ingress(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Ingress]:
    service = IngressService(ingress_settings(nats_server, attachment_max_bytes=4096))
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


async def counts(js: JetStreamContext) -> tuple[int, int, int]:
    """Messages stored in INBOUND and RESULTS, and suppression records."""
    inbound = (await js.stream_info(streams.INBOUND.name)).state.messages
    results = (await js.stream_info(streams.RESULTS.name)).state.messages
    suppressions = (await js.stream_info("KV_" + streams.SUPPRESSIONS.name)).state.messages
    return inbound, results, suppressions


async def check(ingress: Ingress, js: JetStreamContext, path: str, **request: Any) -> int:
    """POST, then the properties every response must have; the status."""
    before = await counts(js)
    async with ingress.http.post(f"{ingress.url}{path}", **request) as resp:
        status = resp.status
        body = await resp.read()
    assert status < 500 or status == 503, (status, body[:500])
    if status >= 400:
        # A refusal has the stable JSON shape and stored nothing.
        assert set(json.loads(body)["error"]) == {"code", "message"}
        assert await counts(js) == before, (status, body[:300])
    assert not ingress.running.task.done()
    return status


@FUZZ
@given(form=twilio_forms, signed=st.booleans(), query=st.sampled_from(["", "?x=1", "?a=%zz"]))
async def test_fuzz_twilio_sms(
    ingress: Ingress, js: JetStreamContext, form: dict[str, str], signed: bool, query: str
) -> None:
    url = f"{PUBLIC}/webhooks/twilio/sms{query}"
    headers = {"X-Twilio-Signature": RequestValidator(TWILIO_TOKEN).compute_signature(url, form)}
    if not signed:
        headers["X-Twilio-Signature"] = headers["X-Twilio-Signature"][::-1]
    await check(
        ingress,
        js,
        f"/webhooks/twilio/sms{query}",
        data=urlencode(form),
        headers={**headers, **FORM},
    )


@FUZZ
@given(form=twilio_forms, cid=st.one_of(words, st.just("cmd1")), signed=st.booleans())
async def test_fuzz_twilio_status(
    ingress: Ingress, js: JetStreamContext, form: dict[str, str], cid: str, signed: bool
) -> None:
    query = f"?cid={quote(cid)}"
    url = f"{PUBLIC}/webhooks/twilio/status{query}"
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, form)
    headers = {"X-Twilio-Signature": signature if signed else "x" + signature, **FORM}
    await check(
        ingress, js, f"/webhooks/twilio/status{query}", data=urlencode(form), headers=headers
    )


header_blocks = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "Message-ID",
                "In-Reply-To",
                "References",
                "From",
                "To",
                "Subject",
                "Auto-Submitted",
                "Precedence",
                "List-Id",
                "Return-Path",
                "Content-Type",
                "X-Autoreply",
                "Cc",
            ]
        ),
        st.one_of(
            texts,
            st.just("<a@b>"),
            st.just("<>"),
            st.just("<x.email-" + "a" * 24 + "@example.com>"),
        ),
    ),
    max_size=6,
).map(lambda pairs: "".join(f"{k}: {v}\n" for k, v in pairs))

parsed_fields = st.fixed_dictionaries(
    {},
    optional={
        "from": st.one_of(texts, st.just("Grace <grace@example.org>")),
        "to": st.one_of(texts, st.just("podium+" + "b" * 24 + "@example.com")),
        "subject": texts,
        "text": st.one_of(st.binary(max_size=200), texts.map(str.encode)),
        "html": st.one_of(st.binary(max_size=200), texts.map(lambda t: f"<div>{t}<blockquote>q")),
        "headers": header_blocks,
        "envelope": st.one_of(
            texts,
            st.just('{"from": "", "to": ["podium@example.com"]}'),
            st.just('{"from": 5, "to": "x"}'),
            st.just("[]"),
        ),
        "charsets": st.dictionaries(
            st.sampled_from(["text", "html", "subject", "from", "to"]), st.sampled_from(CHARSETS)
        ).map(json.dumps),
        "attachment-info": st.one_of(texts, st.just('{"attachment1": {"filename": 3}}')),
    },
)


@FUZZ
@given(fields=parsed_fields, files=st.lists(st.binary(max_size=6000), max_size=3))
async def test_fuzz_sendgrid_parsed(
    ingress: Ingress, js: JetStreamContext, fields: dict[str, Any], files: list[bytes]
) -> None:
    parts: list[Part] = [(k, v, None, None) for k, v in fields.items()]
    parts += [
        (f"attachment{i}", f, f"f{i}.bin", "application/octet-stream")
        for i, f in enumerate(files, 1)
    ]
    body, content_type = multipart_body(parts)
    await check(
        ingress,
        js,
        "/webhooks/sendgrid/inbound",
        data=body,
        headers={**SENDGRID_AUTH, "Content-Type": content_type},
    )


@st.composite
def mutated_emails(draw: st.DrawFn) -> bytes:
    """A corpus message with bytes flipped, cut short or spliced with random bytes."""
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(0, 8))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=50))


@FUZZ
@given(
    email=st.one_of(mutated_emails(), st.binary(max_size=300)),
    envelope=st.sampled_from(
        ["", '{"from": "a@b.c"}', '{"from": ""}', "not json", '{"to": [1, 2]}']
    ),
)
async def test_fuzz_sendgrid_raw(
    ingress: Ingress, js: JetStreamContext, email: bytes, envelope: str
) -> None:
    parts: list[Part] = [("email", email, None, None)]
    if envelope:
        parts.append(("envelope", envelope, None, None))
    body, content_type = multipart_body(parts)
    await check(
        ingress,
        js,
        "/webhooks/sendgrid/inbound",
        data=body,
        headers={**SENDGRID_AUTH, "Content-Type": content_type},
    )


@FUZZ
@given(
    path=st.sampled_from(
        [
            "/webhooks/twilio/sms",
            "/webhooks/twilio/status?cid=c",
            "/webhooks/sendgrid/inbound",
            "/v1/messages",
        ]
    ),
    body=st.binary(max_size=400),
    content_type=st.sampled_from(
        [
            "multipart/form-data; boundary=xYzZY",
            "multipart/form-data",
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=",
        ]
    ),
)
async def test_fuzz_any_body_anywhere(
    ingress: Ingress, js: JetStreamContext, path: str, body: bytes, content_type: str
) -> None:
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    if "sendgrid" in path:
        headers.update(SENDGRID_AUTH)
    await check(ingress, js, path, data=body, headers=headers)


api_bodies = st.one_of(
    st.dictionaries(
        st.sampled_from(["text", "thread_id", "from", "subject", "channel", "extra"]),
        st.one_of(texts, st.integers(), st.none(), st.lists(texts, max_size=2)),
        max_size=5,
    ).map(json.dumps),
    texts,
)


@FUZZ
@given(
    body=api_bodies,
    key=st.one_of(
        st.none(),
        words,
        # Header values: printable ASCII (the client refuses control characters).
        st.text(alphabet=string.printable.strip(), min_size=250, max_size=300),
    ),
)
async def test_fuzz_api(ingress: Ingress, js: JetStreamContext, body: str, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    await check(ingress, js, "/v1/messages", data=body.encode(), headers=headers)


async def raw_request(ingress: Ingress, head: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (clients refuse non-ASCII headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ingress.service.port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


raw_values = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=20).map(str.encode),
    st.just(b"\xff\xfe"),
)


@FUZZ
@given(
    target=st.sampled_from(
        [
            b"/webhooks/twilio/sms",
            b"/webhooks/twilio/status?cid=c",
            b"/webhooks/sendgrid/inbound",
            b"/v1/messages",
            b"/v1/conversations/",
        ]
    ),
    suffix=st.one_of(st.just(b""), raw_values.map(lambda b: b.replace(b" ", b""))),
    header=st.sampled_from(
        [
            b"X-Twilio-Signature",
            b"Authorization",
            b"Idempotency-Key",
            b"X-Twilio-Email-Event-Webhook-Signature",
            b"X-Twilio-Email-Event-Webhook-Timestamp",
            b"Content-Type",
        ]
    ),
    value=raw_values,
)
# Each header where it is read, with bytes that are not UTF-8 (found: 500s and a 503).
@example(b"/webhooks/twilio/sms", b"", b"X-Twilio-Signature", b"\xff\xfe")
@example(b"/v1/messages", b"", b"Authorization", b"Bearer \xff\xfe")
@example(b"/v1/messages", b"", b"Idempotency-Key", b"\xff\xfe")
@example(b"/webhooks/sendgrid/inbound", b"", b"X-Twilio-Email-Event-Webhook-Timestamp", b"\xff")
@example(b"/v1/conversations/", b"\xff", b"Content-Type", b"\xff")
async def test_fuzz_raw_bytes_in_path_and_headers(
    ingress: Ingress,
    js: JetStreamContext,
    target: bytes,
    suffix: bytes,
    header: bytes,
    value: bytes,
) -> None:
    # Bytes that are not UTF-8 reach the handlers as surrogate escapes; whatever they
    # are, the answer is a clean refusal (or success), never a 500.
    before = await counts(js)
    method = b"GET" if target.startswith(b"/v1/conversations") else b"POST"
    form = urlencode({"From": "+15550100001", "To": "+15550100999", "MessageSid": "SM1"})
    head = b"%s %s%s HTTP/1.1\r\nHost: x\r\n%s: %s\r\n" % (method, target, suffix, header, value)
    if header != b"Content-Type":
        head += b"Content-Type: application/x-www-form-urlencoded\r\n"
    if header != b"Authorization":
        head += b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    payload = form.encode()
    if target == b"/v1/messages" and header != b"Content-Type":
        head = head.replace(b"application/x-www-form-urlencoded", b"application/json")
        payload = b'{"text": "hello"}'
    status, body = await raw_request(ingress, head, payload)
    # JetStream is up: nothing here may answer 503 (a client would retry bad input forever).
    assert status < 500, (status, body[:300])
    if status >= 400 and body:
        if status != 400 or body.startswith(b"{"):
            assert set(json.loads(body)["error"]) == {"code", "message"}
        assert await counts(js) == before
    assert not ingress.running.task.done()
