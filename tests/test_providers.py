"""Notifier against Twilio's and SendGrid's wire formats (fakes driven by the real client
libraries): one send per command, retries only when nothing left, permanent refusals
and unknown outcomes reported to the conductor, the suppression list obeyed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.config import Secret
from podium.common.kv import Store
from podium.contracts import streams, subjects
from podium.contracts.events import DeliveryFailed, SendEmail, SendSms, decode
from podium.contracts.ids import conversation_id
from podium.contracts.state import OutboxRecord, Suppression, suppression_key
from podium.notifier.config import NotifierSettings
from podium.notifier.service import NotifierService
from podium.notifier.transports import split_sms, utf16_len
from podium.testing.bus import settled
from podium.testing.sendgrid import FakeSendGrid
from podium.testing.services import in_process
from podium.testing.twilio import FakeTwilio

ACCOUNT = "AC" + "0" * 32
AUTH = "twilio-auth-token-0123456789abcdef"
SENDGRID_KEY = "SG.fake-key.for-tests"
OURS = "+15550100999"
PERSON = "+15550100001"
CONV = conversation_id("email", "<abc123@example.org>")


def sms(n: int = 1, body: str = "Your room is booked.", to: str = PERSON) -> SendSms:
    return SendSms(
        event_id=f"sms{n}",
        correlation_id="corr",
        conversation_id="sms-1",
        command_id=f"sms{n}",
        to=to,
        body=body,
        sender=OURS,
    )


def email(n: int = 1, **extra: Any) -> SendEmail:
    values: dict[str, Any] = {
        "event_id": f"mail{n}",
        "correlation_id": "corr",
        "conversation_id": CONV,
        "command_id": f"mail{n}",
        "to": ["grace@example.org"],
        "subject": "Quarterly numbers",
        "body": "Here they are.",
        "in_reply_to": "<abc123@example.org>",
        "references": ["<abc123@example.org>"],
    }
    values.update(extra)
    return SendEmail(**values)


async def outbox_state(js: JetStreamContext, command_id: str, *want: str) -> OutboxRecord:
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    found = None
    for _ in range(300):
        found = await store.get(command_id)
        if found and found[0].state in want:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{command_id} never reached {want}: {found}")


async def reports(js: JetStreamContext, expect: int) -> list[DeliveryFailed]:
    """DeliveryFailed events on RESULTS (what the conductor will see)."""
    out: list[DeliveryFailed] = []
    for _ in range(100):
        info = await js.stream_info("RESULTS")
        if info.state.messages >= expect:
            break
        await asyncio.sleep(0.05)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if not info.state.messages:
            break
        msg = await js.get_msg("RESULTS", seq)
        assert msg.data is not None
        event = decode(msg.data)
        assert isinstance(event, DeliveryFailed)
        out.append(event)
    assert len(out) == expect, out
    return out


def notifier_settings(nats: NatsServer, **extra: Any) -> NotifierSettings:
    values: dict[str, Any] = {
        "nats_url": nats.url,
        "health_port": 0,
        "email_from": "podium@acme.test",
        "sms_from": OURS,
        "retry_base_s": 0.2,
        "send_timeout_s": 2.0,
    }
    values.update(extra)
    return NotifierSettings(**values)


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    fake = await FakeTwilio(ACCOUNT, AUTH).start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def twilio_notifier(
    nats_server: NatsServer, js: JetStreamContext, twilio: FakeTwilio
) -> AsyncIterator[None]:
    settings = notifier_settings(
        nats_server,
        sms_transport="twilio",
        twilio_account_sid=ACCOUNT,
        twilio_auth_token=Secret(AUTH),
        twilio_api_base=twilio.url,
        twilio_status_callback_url="https://podium.example.com/webhooks/twilio/status",
    )
    async with in_process(NotifierService(settings), settings):
        yield


# --- Twilio ---------------------------------------------------------------------


async def test_sms_goes_through_twilio_once_with_a_status_callback(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext
) -> None:
    await publish(js, subjects.command("sms", "sms-1"), sms())
    record = await outbox_state(js, "sms1", "sent")
    (sent,) = twilio.sent
    assert (sent.to, sent.from_, sent.body) == (PERSON, OURS, "Your room is booked.")
    assert record.provider_id == sent.sid and sent.sid.startswith("SM")
    assert sent.status_callback == "https://podium.example.com/webhooks/twilio/status?cid=sms1"
    # Replayed under another Nats-Msg-Id: the outbox stops a second send.
    await publish(js, subjects.command("sms", "sms-1"), sms(), msg_id="replay")
    await publish(js, subjects.command("sms", "sms-1"), sms(2))
    await outbox_state(js, "sms2", "sent")
    assert [m.body for m in twilio.sent] == ["Your room is booked.", "Your room is booked."]
    assert twilio.requests == 2


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_429_and_5xx_are_retried_by_us_not_reposted_by_the_library(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext, status: int
) -> None:
    twilio.script.replies = [status]
    await publish(js, subjects.command("sms", "sms-1"), sms())
    record = await outbox_state(js, "sms1", "sent")
    # One refused request, one accepted: the client library never re-POSTed by itself.
    assert twilio.requests == 2
    assert len(twilio.sent) == 1
    assert record.attempts == 2


async def test_opted_out_recipient_is_suppressed_and_reported(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext
) -> None:
    twilio.opted_out.add(PERSON)
    await publish(js, subjects.command("sms", "sms-1"), sms())
    record = await outbox_state(js, "sms1", "failed")
    assert "21610" in record.error
    (report,) = await reports(js, 1)
    assert (report.outcome, report.provider_code, report.command_id) == (
        "suppressed",
        "21610",
        "sms1",
    )
    store = await Store.open(js, streams.SUPPRESSIONS.name, Suppression)
    found = await store.get(suppression_key("sms", PERSON))
    assert found is not None and found[0].suppressed
    assert found[0].reason == "provider-opt-out"
    # The next command to that number never reaches Twilio.
    await publish(js, subjects.command("sms", "sms-1"), sms(2))
    await outbox_state(js, "sms2", "failed")
    assert twilio.requests == 1
    second = (await reports(js, 2))[1]
    assert second.outcome == "suppressed"


async def test_invalid_number_is_rejected_for_good(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext
) -> None:
    await publish(js, subjects.command("sms", "sms-1"), sms(to="+1"))
    record = await outbox_state(js, "sms1", "failed")
    assert "21211" in record.error
    (report,) = await reports(js, 1)
    assert (report.outcome, report.provider_code) == ("rejected", "21211")
    assert twilio.requests == 1


async def test_a_timeout_after_the_request_left_is_ambiguous_not_retried(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext
) -> None:
    twilio.script.replies = ["hang"]
    await publish(js, subjects.command("sms", "sms-1"), sms())
    record = await outbox_state(js, "sms1", "ambiguous")
    assert "Timeout" in record.error
    (report,) = await reports(js, 1)
    assert report.outcome == "ambiguous"
    twilio.release()
    # The command was given up (not retried): its consumer holds nothing any more.
    await settled(js, streams.NOTIFIER_COMMANDS)
    assert len(twilio.sent) == 1
    assert twilio.requests == 1


async def test_long_sms_is_split_into_numbered_parts(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext
) -> None:
    paragraph = "The quarterly report is attached to the email we sent. " * 12
    body = "\n\n".join([paragraph.strip()] * 5)
    await publish(js, subjects.command("sms", "sms-1"), sms(body=body))
    record = await outbox_state(js, "sms1", "sent")
    bodies = [m.body for m in twilio.sent]
    assert len(bodies) == len(record.provider_ids) == 3
    assert all(utf16_len(b) <= 1600 for b in bodies)
    assert [b[-5:] for b in bodies] == ["(1/3)", "(2/3)", "(3/3)"]
    assert record.provider_id == record.provider_ids[0]


async def test_suppressed_number_is_never_texted(
    twilio_notifier: None, twilio: FakeTwilio, js: JetStreamContext
) -> None:
    store = await Store.open(js, streams.SUPPRESSIONS.name, Suppression)
    await store.create(
        suppression_key("sms", PERSON),
        Suppression(channel="sms", address=PERSON, suppressed=True, reason="opt-out"),
    )
    await publish(js, subjects.command("sms", "sms-1"), sms())
    await outbox_state(js, "sms1", "failed")
    (report,) = await reports(js, 1)
    assert report.outcome == "suppressed"
    assert twilio.requests == 0


def test_split_sms_cuts_at_sensible_places() -> None:
    assert split_sms("short") == ["short"]
    words = " ".join(["word"] * 1000)
    parts = split_sms(words, 1600)
    assert all(utf16_len(p) <= 1600 for p in parts)
    assert all(not p.split(" (")[0].endswith("wor") for p in parts)
    # Emoji count as two UTF-16 code units, as Twilio counts them.
    emoji = "😀" * 900
    assert all(utf16_len(p) <= 1600 for p in split_sms(emoji, 1600))
    assert "".join(p.rsplit(" (", 1)[0] for p in split_sms(emoji, 1600)) == emoji


# --- SendGrid -------------------------------------------------------------------


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeSendGrid]:
    fake = await FakeSendGrid(SENDGRID_KEY).start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def sendgrid_notifier(
    nats_server: NatsServer, js: JetStreamContext, sendgrid: FakeSendGrid
) -> AsyncIterator[None]:
    settings = notifier_settings(
        nats_server,
        email_transport="sendgrid",
        sendgrid_api_key=Secret(SENDGRID_KEY),
        sendgrid_api_base=sendgrid.url,
        email_reply_to="podium@inbound.acme.test",
    )
    async with in_process(NotifierService(settings), settings):
        yield


async def test_email_through_sendgrid_is_threaded_and_automatic(
    sendgrid_notifier: None, sendgrid: FakeSendGrid, js: JetStreamContext
) -> None:
    await publish(js, subjects.command("email", CONV), email())
    record = await outbox_state(js, "mail1", "sent")
    (mail,) = sendgrid.accepted
    assert record.provider_id == mail.message_id
    assert mail.to == ["grace@example.org"]
    assert mail.body["subject"] == "Re: Quarterly numbers"
    assert mail.body["from"]["email"] == "podium@acme.test"
    token = CONV.removeprefix("email-")
    assert mail.body["reply_to"]["email"] == f"podium+{token}@inbound.acme.test"
    assert mail.headers["In-Reply-To"] == "<abc123@example.org>"
    assert mail.headers["References"] == "<abc123@example.org>"
    assert mail.headers["Auto-Submitted"] == "auto-replied"
    assert mail.headers["Message-ID"] == f"<mail1.{CONV}@acme.test>"
    assert mail.body["custom_args"]["command_id"] == "mail1"
    assert mail.text == "Here they are."


async def test_sendgrid_429_is_retried_and_400_is_final(
    sendgrid_notifier: None, sendgrid: FakeSendGrid, js: JetStreamContext
) -> None:
    sendgrid.script = [429]
    await publish(js, subjects.command("email", CONV), email())
    record = await outbox_state(js, "mail1", "sent")
    assert (record.attempts, len(sendgrid.accepted), sendgrid.requests) == (2, 1, 2)

    await publish(js, subjects.command("email", CONV), email(2, to=["grace@nowhere"]))
    failed = await outbox_state(js, "mail2", "failed")
    assert "400" in failed.error
    # An address the library cannot even parse never leaves, and is final too.
    await publish(js, subjects.command("email", CONV), email(3, to=["not an address"]))
    assert "cannot build" in (await outbox_state(js, "mail3", "failed")).error
    first, second = await reports(js, 2)
    assert (first.outcome, first.command_id, first.channel) == ("rejected", "mail2", "email")
    assert (second.outcome, second.command_id) == ("rejected", "mail3")
    assert sendgrid.requests == 3


async def test_sendgrid_does_not_block_the_event_loop(
    sendgrid_notifier: None, sendgrid: FakeSendGrid, js: JetStreamContext
) -> None:
    # The first mail hangs inside the (synchronous) client; the loop goes on serving
    # the second one meanwhile, and the first ends ambiguous, not re-sent.
    sendgrid.script = ["hang"]
    await publish(js, subjects.command("email", CONV), email(1))
    await publish(js, subjects.command("email", CONV), email(2))
    await outbox_state(js, "mail2", "sent")
    sendgrid.release()
    await outbox_state(js, "mail1", "ambiguous", "sent")
    assert sorted(m.body["custom_args"]["command_id"] for m in sendgrid.accepted) == [
        "mail1",
        "mail2",
    ]
