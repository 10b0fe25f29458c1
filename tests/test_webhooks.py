"""Ingress webhooks as the providers really call them: Twilio opt-out keywords and
status callbacks (signed by Twilio's own RequestValidator), SendGrid's signed
Inbound Parse (ECDSA keys in SendGrid's format, checked against its own
EventWebhook helper), attachments, reply threading and API idempotency.

Keywords and status callbacks are facts the ingress stores; the notifier, owner
of the outbox and the suppression list, applies them. So those tests run both,
and look at the notifier's state once its DELIVERY consumer has settled."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.js import JetStreamContext
from sendgrid.helpers.eventwebhook import EventWebhook

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.config import Secret
from podium.common.kv import Store
from podium.contracts import streams, subjects
from podium.contracts.events import DeliveryFailed, RecipientPreference, decode
from podium.contracts.ids import conversation_id, message_id_for, reply_address
from podium.contracts.state import OutboxRecord, Suppression, suppression_key
from podium.ingress.service import IngressService
from podium.notifier.config import NotifierSettings
from podium.notifier.service import NotifierService
from podium.testing.bus import settled
from podium.testing.sendgrid import multipart_body
from podium.testing.services import in_process
from podium.testing.twilio import FakeTwilio, Sent
from tests.test_ingress import (
    PUBLIC,
    SENDGRID_AUTH,
    TWILIO_TOKEN,
    Ingress,
    bearer,
    post_twilio,
    settings,
    stored,
    twilio_form,
)

PERSON = "+15550100001"
OURS = "+15550100999"


@pytest.fixture
async def ingress(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[Ingress]:
    service = IngressService(settings(nats_server, attachment_max_bytes=2048))
    notifier = NotifierService(
        NotifierSettings(
            nats_url=nats_server.url, health_port=0, outbox_path=str(tmp_path / "out.jsonl")
        )
    )
    async with (
        in_process(notifier, notifier.settings),
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


async def applied(js: JetStreamContext) -> None:
    """Wait until the notifier has applied every fact the ingress stored."""
    await settled(js, streams.NOTIFIER_DELIVERY)


async def suppression(js: JetStreamContext, number: str = PERSON) -> Suppression | None:
    await applied(js)
    store = await Store.open(js, streams.SUPPRESSIONS.name, Suppression)
    found = await store.get(suppression_key("sms", number))
    return found[0] if found else None


# --- SMS opt-out keywords --------------------------------------------------------


async def test_stop_and_start_are_recorded_not_forwarded(
    ingress: Ingress, js: JetStreamContext
) -> None:
    stop = twilio_form("SM" + "1" * 32, Body=" stop ")
    assert (await post_twilio(ingress, stop)).status == 200
    record = await suppression(js)
    assert record is not None and record.suppressed
    assert (record.keyword, record.our_address) == ("STOP", OURS)

    start = twilio_form("SM" + "2" * 32, Body="START")
    assert (await post_twilio(ingress, start)).status == 200
    record = await suppression(js)
    assert record is not None and not record.suppressed

    # Twilio retries the old STOP: it cannot undo the later START.
    assert (await post_twilio(ingress, stop)).status == 200
    record = await suppression(js)
    assert record is not None and not record.suppressed

    assert (await post_twilio(ingress, twilio_form("SM" + "3" * 32, Body="HELP"))).status == 200
    # None of the keywords reached the conductor; an ordinary message does.
    await stored(js, expect=0)
    assert (
        await post_twilio(ingress, twilio_form("SM" + "4" * 32, Body="stop by at 5"))
    ).status == 200
    (event,) = await stored(js, expect=1)
    assert event.text == "stop by at 5"


async def test_an_older_keyword_applied_late_cannot_undo_a_newer_one(
    ingress: Ingress, js: JetStreamContext
) -> None:
    # STOP said first but applied after START (a retry, another notifier replica).
    said = datetime.now(UTC)

    def keyword(sid: str, opted_out: bool, seconds: float) -> RecipientPreference:
        return RecipientPreference(
            event_id=sid,
            correlation_id=sid,
            conversation_id=conversation_id("sms", PERSON, OURS),
            channel="sms",
            address=PERSON,
            opted_out=opted_out,
            keyword="STOP" if opted_out else "START",
            our_address=OURS,
            source_id=sid,
            at=said + timedelta(seconds=seconds),
        )

    subject = subjects.preference(conversation_id("sms", PERSON, OURS))
    await publish(js, subject, keyword("SM-start", False, 2))
    await publish(js, subject, keyword("SM-stop-old", True, 1))
    record = await suppression(js)
    assert record is not None and not record.suppressed
    await publish(js, subject, keyword("SM-stop-new", True, 3))
    record = await suppression(js)
    assert record is not None and record.suppressed and record.source_id == "SM-stop-new"


async def test_a_keyword_with_a_bad_signature_changes_nothing(
    ingress: Ingress, js: JetStreamContext
) -> None:
    resp = await post_twilio(ingress, twilio_form(Body="STOP"), signature="bm9wZQ==")
    assert resp.status == 403
    assert await suppression(js) is None


# --- Twilio status callbacks ------------------------------------------------------


async def outbox_record(js: JetStreamContext, command_id: str, **fields: Any) -> None:
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    values: dict[str, Any] = {
        "command_id": command_id,
        "state": "sent",
        "transport": "twilio",
        "channel": "sms",
        "conversation_id": "sms-1",
        "correlation_id": "corr",
        "to": [PERSON],
    }
    values.update(fields)
    await store.create(command_id, OutboxRecord(**values))


async def record_of(js: JetStreamContext, command_id: str) -> OutboxRecord:
    await applied(js)
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    found = await store.get(command_id)
    assert found is not None
    return found[0]


def sent_message(sid: str, command_id: str) -> Sent:
    return Sent(
        sid=sid,
        to=PERSON,
        from_=OURS,
        body="Booked.",
        messaging_service_sid="",
        status_callback=f"{PUBLIC}/webhooks/twilio/status?cid={command_id}",
        form={},
    )


async def test_status_callbacks_only_move_forward(ingress: Ingress, js: JetStreamContext) -> None:
    twilio = FakeTwilio("AC" + "0" * 32, TWILIO_TOKEN)
    sid = "SM" + "a" * 32
    await outbox_record(js, "cmd1", provider_id=sid, provider_ids=[sid])
    message = sent_message(sid, "cmd1")
    reach = (PUBLIC, ingress.url)
    assert await twilio.callback(message, "sent", reach=reach) == 200
    assert (await record_of(js, "cmd1")).delivery == "sent"
    assert await twilio.callback(message, "delivered", reach=reach) == 200
    # Out of order: a late "sent" does not take "delivered" back.
    assert await twilio.callback(message, "sent", reach=reach) == 200
    record = await record_of(js, "cmd1")
    assert (record.state, record.delivery, record.parts) == (
        "sent",
        "delivered",
        {sid: "delivered"},
    )


async def test_a_status_callback_must_be_signed_for_its_own_url(
    ingress: Ingress, js: JetStreamContext
) -> None:
    twilio = FakeTwilio("AC" + "0" * 32, TWILIO_TOKEN)
    await outbox_record(js, "cmd1")
    # Signed for cmd1, then pointed at cmd2: the command id is part of what is signed.
    message = sent_message("SM" + "b" * 32, "cmd1")
    forged = sent_message("SM" + "b" * 32, "cmd2")
    forged.status_callback = message.status_callback
    status = await twilio.callback(
        forged,
        "undelivered",
        reach=(
            f"{PUBLIC}/webhooks/twilio/status?cid=cmd1",
            f"{ingress.url}/webhooks/twilio/status?cid=cmd2",
        ),
    )
    assert status == 403
    assert (await record_of(js, "cmd1")).delivery == ""


async def test_undelivered_sms_is_reported_and_an_opt_out_suppressed(
    ingress: Ingress, js: JetStreamContext
) -> None:
    twilio = FakeTwilio("AC" + "0" * 32, TWILIO_TOKEN)
    sid = "SM" + "c" * 32
    await outbox_record(js, "cmd3", provider_id=sid, provider_ids=[sid])
    reach = (PUBLIC, ingress.url)
    status = await twilio.callback(
        sent_message(sid, "cmd3"), "undelivered", error_code="21610", reach=reach
    )
    assert status == 200
    record = await record_of(js, "cmd3")
    assert (record.delivery, record.delivery_error) == ("undelivered", "undelivered 21610")
    assert record.reported and record.outcome == "undelivered"
    info = await js.stream_info("RESULTS")
    assert info.state.messages == 1
    msg = await js.get_msg("RESULTS", info.state.last_seq)
    report = decode(msg.data or b"")
    assert isinstance(report, DeliveryFailed)
    assert (report.outcome, report.command_id, report.conversation_id, report.provider_code) == (
        "undelivered",
        "cmd3",
        "sms-1",
        "21610",
    )
    found = await suppression(js)
    assert found is not None and found.suppressed and found.reason == "provider-opt-out"
    # Twilio retries the callback: reported once.
    await twilio.callback(sent_message(sid, "cmd3"), "undelivered", error_code="21610", reach=reach)
    await applied(js)
    assert (await js.stream_info("RESULTS")).state.messages == 1


async def test_an_ambiguous_send_is_resolved_by_its_status_callback(
    ingress: Ingress, js: JetStreamContext
) -> None:
    twilio = FakeTwilio("AC" + "0" * 32, TWILIO_TOKEN)
    sid = "SM" + "d" * 32
    await outbox_record(js, "cmd4", state="ambiguous", error="TimeoutError()")
    assert (
        await twilio.callback(sent_message(sid, "cmd4"), "delivered", reach=(PUBLIC, ingress.url))
        == 200
    )
    record = await record_of(js, "cmd4")
    assert (record.state, record.provider_id, record.delivery) == ("sent", sid, "delivered")


async def test_unknown_commands_and_statuses_are_acknowledged_and_ignored(
    ingress: Ingress, js: JetStreamContext
) -> None:
    twilio = FakeTwilio("AC" + "0" * 32, TWILIO_TOKEN)
    reach = (PUBLIC, ingress.url)
    assert await twilio.callback(sent_message("SM" + "e" * 32, "nope"), "sent", reach=reach) == 200
    await applied(js)
    outbox = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    assert await outbox.get("nope") is None
    await outbox_record(js, "cmd5")
    facts = (await js.stream_info("DELIVERY")).state.messages
    assert (
        await twilio.callback(sent_message("SM" + "e" * 32, "cmd5"), "teleported", reach=reach)
        == 200
    )
    # A status Twilio does not document is not even stored.
    assert (await js.stream_info("DELIVERY")).state.messages == facts
    assert (await record_of(js, "cmd5")).delivery == ""


# --- SendGrid signed webhooks ------------------------------------------------------


@pytest.fixture
def sendgrid_keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key pair; the public half in the format SendGrid shows (base64 DER)."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


def sign(private: ec.EllipticCurvePrivateKey, public: str, body: bytes, timestamp: str) -> str:
    signature = base64.b64encode(
        private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()
    # SendGrid's own helper must accept what we send (text payloads only: it works on str).
    if body.isascii():
        assert EventWebhook(public).verify_signature(body.decode(), signature, timestamp)
    return signature


@pytest.fixture
async def signed_ingress(
    nats_server: NatsServer, js: JetStreamContext, sendgrid_keys: tuple[Any, str]
) -> AsyncIterator[Ingress]:
    service = IngressService(
        settings(
            nats_server,
            sendgrid_basic_auth=Secret(""),
            sendgrid_webhook_public_key=sendgrid_keys[1],
            sendgrid_webhook_max_age_s=120.0,
        )
    )
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


def parsed(
    text: str = "Please file the report.", message_id: str = "<s1@example.org>"
) -> tuple[bytes, str]:
    return multipart_body(
        [
            ("from", "Grace <grace@example.org>", None, None),
            ("to", "podium@example.com", None, None),
            ("subject", "Report", None, None),
            ("text", text, None, None),
            ("headers", f"Message-ID: {message_id}\nFrom: grace@example.org\n", None, None),
            (
                "envelope",
                json.dumps({"from": "grace@example.org", "to": ["podium@example.com"]}),
                None,
                None,
            ),
            ("charsets", json.dumps({"text": "UTF-8"}), None, None),
        ]
    )


@pytest.mark.parametrize("case", ["valid", "invalid", "missing", "tampered", "replayed", "future"])
async def test_signed_inbound_parse(
    signed_ingress: Ingress,
    js: JetStreamContext,
    sendgrid_keys: tuple[ec.EllipticCurvePrivateKey, str],
    case: str,
) -> None:
    private, public = sendgrid_keys
    body, content_type = parsed()
    now = int(time.time())
    timestamp = str({"replayed": now - 600, "future": now + 600}.get(case, now))
    signature = sign(private, public, body, timestamp)
    headers = {
        "Content-Type": content_type,
        "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }
    if case == "invalid":
        other = ec.generate_private_key(ec.SECP256R1())
        headers["X-Twilio-Email-Event-Webhook-Signature"] = base64.b64encode(
            other.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        ).decode()
    elif case == "missing":
        del headers["X-Twilio-Email-Event-Webhook-Signature"]
    elif case == "tampered":
        body = body.replace(b"Please file the report.", b"Please wire the money.!")
    async with signed_ingress.http.post(
        f"{signed_ingress.url}/webhooks/sendgrid/inbound", data=body, headers=headers
    ) as resp:
        answer = await resp.json()
        if case == "valid":
            assert resp.status == 200, answer
        else:
            assert resp.status == 403
            expected = {
                "missing": "missing_signature",
                "replayed": "stale_signature",
                "future": "stale_signature",
            }.get(case, "bad_signature")
            assert answer["error"]["code"] == expected
    await stored(js, expect=1 if case == "valid" else 0)


# --- attachments and threading --------------------------------------------------------


async def test_attachments_are_stored_within_the_limit(
    ingress: Ingress, js: JetStreamContext
) -> None:
    small, big = b"quarter,revenue\nQ3,1\n", bytes(range(256)) * 16
    body, content_type = multipart_body(
        [
            ("from", "grace@example.org", None, None),
            ("to", "podium@example.com", None, None),
            ("subject", "Files", None, None),
            ("text", "See attached.", None, None),
            ("headers", "Message-ID: <files@example.org>\n", None, None),
            ("attachments", "2", None, None),
            (
                "attachment-info",
                json.dumps(
                    {
                        "attachment1": {"filename": "q3.csv", "type": "text/csv"},
                        "attachment2": {"filename": "blob.bin", "type": "application/octet-stream"},
                    }
                ),
                None,
                None,
            ),
            ("attachment1", small, "q3.csv", "text/csv"),
            ("attachment2", big, "blob.bin", "application/octet-stream"),
        ]
    )
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound",
        data=body,
        headers={**SENDGRID_AUTH, "Content-Type": content_type},
    ) as resp:
        assert resp.status == 200
    (event,) = await stored(js, expect=1)
    kept, skipped = event.media
    assert (kept.filename, kept.content_type, kept.size) == ("q3.csv", "text/csv", len(small))
    objects = await js.object_store(streams.ATTACHMENTS)
    assert (await objects.get(kept.object)).data == small
    assert (skipped.filename, skipped.size, skipped.object) == ("blob.bin", 4096, "")
    assert "limit" in skipped.note


async def test_an_email_still_goes_through_when_the_attachment_store_is_full(
    ingress: Ingress, js: JetStreamContext
) -> None:
    # The attachments store's share of the storage budget, used up.
    info = await js.stream_info(f"OBJ_{streams.ATTACHMENTS}")
    await js.update_stream(info.config.evolve(max_bytes=1500))
    objects = await js.object_store(streams.ATTACHMENTS)
    await objects.put("earlier", b"x" * 1000)
    body, content_type = multipart_body(
        [
            ("from", "grace@example.org", None, None),
            ("to", "podium@example.com", None, None),
            ("subject", "Files", None, None),
            ("text", "See attached.", None, None),
            ("headers", "Message-ID: <full@example.org>\n", None, None),
            ("attachments", "1", None, None),
            ("attachment-info", json.dumps({"attachment1": {"filename": "q3.csv"}}), None, None),
            ("attachment1", b"q" * 1000, "q3.csv", "text/csv"),
        ]
    )
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound",
        data=body,
        headers={**SENDGRID_AUTH, "Content-Type": content_type},
    ) as resp:
        assert resp.status == 200
    (event,) = await stored(js, expect=1)
    assert event.text.startswith("See attached.")
    (left_out,) = event.media
    assert (left_out.filename, left_out.object) == ("q3.csv", "")
    assert left_out.note == "not stored: the attachment store is full"


async def post_email(ingress: Ingress, **fields: str) -> dict[str, Any]:
    base = {
        "from": "grace@example.org",
        "to": "podium@example.com",
        "subject": "Re: Report",
        "text": "Thanks!",
        "headers": "Message-ID: <r1@example.org>\n",
    }
    base.update(fields)
    body, content_type = multipart_body([(k, v, None, None) for k, v in base.items()])
    async with ingress.http.post(
        f"{ingress.url}/webhooks/sendgrid/inbound",
        data=body,
        headers={**SENDGRID_AUTH, "Content-Type": content_type},
    ) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


async def test_replies_find_their_conversation(ingress: Ingress, js: JetStreamContext) -> None:
    conv = conversation_id("email", "<root@example.org>")
    # A client that keeps nothing but the plus-addressed Reply-To.
    token_reply = await post_email(
        ingress, to=reply_address("podium@example.com", conv), headers="Message-ID: <r1@x.org>\n"
    )
    assert token_reply["conversation_id"] == conv
    # A client that keeps only In-Reply-To (one of our Message-IDs).
    ours = message_id_for("cmd7", conv, "podium@example.com")
    irt = await post_email(ingress, headers=f"Message-ID: <r2@x.org>\nIn-Reply-To: {ours}\n")
    assert irt["conversation_id"] == conv
    # A token on someone else's base address is not ours: a new conversation.
    other = await post_email(
        ingress,
        to=reply_address("someone@else.org", conv),
        headers="Message-ID: <r3@x.org>\n",
    )
    assert other["conversation_id"] != conv
    await stored(js, expect=3)


# --- API ---------------------------------------------------------------------------


async def test_an_idempotency_key_reused_for_another_message_is_refused(
    ingress: Ingress, js: JetStreamContext
) -> None:
    headers = {**bearer(), "Idempotency-Key": "order-7"}
    async with ingress.http.post(
        f"{ingress.url}/v1/messages", json={"text": "first"}, headers=headers
    ) as resp:
        assert resp.status == 202
    async with ingress.http.post(
        f"{ingress.url}/v1/messages", json={"text": "first"}, headers=headers
    ) as resp:
        assert resp.status == 202
        assert (await resp.json())["duplicate"] is True
    async with ingress.http.post(
        f"{ingress.url}/v1/messages", json={"text": "second"}, headers=headers
    ) as resp:
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "idempotency_key_reused"
    (event,) = await stored(js, expect=1)
    assert event.text == "first"
