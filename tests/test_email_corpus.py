"""Email hygiene against a corpus of real-world-shaped messages (tests/data/email).

Each message goes through the running ingress twice, as SendGrid would post it:
raw mode (the whole MIME message) and parsed mode (fields SendGrid extracts,
text in its original charset named in ``charsets``, files as ``attachmentN``).
Replies must reach the agent without quoted history or signatures, in the right
conversation; automatic mail must be recognised and never forwarded (counted).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.contracts import streams
from podium.contracts.events import InboundMessage
from podium.ingress import mail
from podium.ingress.service import IngressService
from podium.testing.sendgrid import Part, multipart_body
from podium.testing.services import in_process
from tests.test_ingress import SENDGRID_AUTH, Ingress, settings, stored

CORPUS = Path(__file__).parent / "data" / "email"
OWN = ["podium@example.com"]

# file: (ignored reason or "", text the agent sees, subject, attachments)
EXPECTED: dict[str, tuple[str, str, str, list[tuple[str, str]]]] = {
    "01-gmail-reply.eml": ("", "Yes, please book it for 10am.", "Re: Meeting room for Tuesday", []),
    "02-outlook-reply.eml": (
        "",
        "Please add the Q2 figures as well.\n\nThanks,\nAlan",
        "RE: Quarterly numbers",
        [],
    ),
    "03-outlook-html-only.eml": (
        "",
        "Looks good \u2013 please move item 3 to the top.\n\nAda",
        "RE: Draft agenda",
        [],
    ),
    "04-apple-mail-reply.eml": (
        "",
        "Recompute it for a 14:05 launch instead.",
        "Re: Launch window",
        [],
    ),
    "05-thunderbird-signature.eml": (
        "",
        "Go ahead with the migration on Saturday.",
        "Re: Server migration",
        [],
    ),
    "06-french-latin1.eml": (
        "",
        "Merci, réservez la salle pour jeudi à 14h.",
        "Re: Réservation",
        [],
    ),
    "07-german-outlook-cp1252.eml": (
        "",
        "Bitte schicken Sie mir die Übersicht \u2013 bis Freitag."
        "\n\nMit freundlichen Grüßen\nJürgen",
        "AW: Übersicht",
        [],
    ),
    "08-vacation-autoreply.eml": ("auto-submitted", "", "", []),
    "09-x-autoreply.eml": ("auto-reply", "", "", []),
    "10-bounce-dsn.eml": ("bounce", "", "", []),
    "11-mailing-list.eml": ("mailing-list", "", "", []),
    "12-newsletter-bulk.eml": ("precedence-bulk", "", "", []),
    "13-own-address.eml": ("own-address", "", "", []),
    "14-our-message-back.eml": ("own-message", "", "", []),
    "15-noreply-sender.eml": ("automated-sender", "", "", []),
    "16-html-only-new-request.eml": (
        "",
        "Hi Podium,\n\nPlease write a one-page summary of Project Endeavour & its risks."
        "\n\nBudget\n\nTimeline",
        "Summarise the attached-less brief",
        [],
    ),
    "17-attachments.eml": (
        "",
        "Please check the attached spreadsheet and chart.",
        "Numbers attached",
        [("q3.csv", "text/csv"), ("charté.png", "image/png")],
    ),
    "18-japanese-iso2022jp.eml": (
        "",
        "会議室を火曜日の十時に予約してください。",
        "会議室の予約",
        [],
    ),
    "19-russian-koi8r.eml": (
        "",
        "Подготовьте, пожалуйста, отчёт за третий квартал.",
        "Отчёт",
        [],
    ),
    # An unknown charset label: the bytes are read as UTF-8, bad ones replaced, never a failure.
    "20-bogus-charset.eml": (
        "",
        "Two coffees for the 3pm meeting, please.",
        "Caf\ufffd order",
        [],
    ),
}


def test_the_corpus_is_complete() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.eml")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 15


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_facts_of_each_message(name: str) -> None:
    reason, text, subject, attachments = EXPECTED[name]
    facts = mail.raw_email_facts((CORPUS / name).read_bytes(), OWN)
    assert facts.ignore_reason == reason
    if not reason:
        assert facts.text == text
        assert facts.subject == subject
        assert [(a.filename, a.content_type) for a in facts.attachments] == attachments


def raw_form(data: bytes) -> tuple[bytes, str]:
    """What SendGrid's raw mode posts for this message."""
    return multipart_body(
        [
            ("email", data, None, None),
            ("envelope", json.dumps({"from": "x@example.org", "to": OWN}), None, None),
        ]
    )


def parsed_form(data: bytes) -> tuple[bytes, str]:
    """What SendGrid's parsed mode posts for this message."""
    msg = BytesParser(policy=policy.default).parsebytes(data)
    header_block = data.split(b"\n\n", 1)[0].decode("latin-1")
    charsets: dict[str, str] = {"to": "UTF-8", "from": "UTF-8", "subject": "UTF-8"}
    parts: list[Part] = []
    files: list[Message] = []
    bodies: dict[str, bytes] = {}
    for part in msg.walk():
        if part.is_multipart():
            continue
        if part.get_filename():
            files.append(part)
            continue
        kind = {"text/plain": "text", "text/html": "html"}.get(part.get_content_type())
        if kind and kind not in bodies:
            payload = part.get_payload(decode=True)
            bodies[kind] = payload if isinstance(payload, bytes) else b""
            charsets[kind] = part.get_content_charset() or "us-ascii"
    fields: dict[str, Any] = {
        "headers": header_block,
        # SendGrid posts these decoded, as policy.default reads them.
        "from": str(msg["From"] or ""),
        "to": str(msg["To"] or ""),
        "subject": str(msg["Subject"] or ""),
        "envelope": json.dumps({"from": "x@example.org", "to": OWN}),
        "charsets": json.dumps(charsets),
        "attachments": str(len(files)),
    }
    if files:
        info = {
            f"attachment{i}": {
                "filename": p.get_filename() or "",
                "type": p.get_content_type(),
            }
            for i, p in enumerate(files, 1)
        }
        fields["attachment-info"] = json.dumps(info)
    parts.extend((name, value, None, None) for name, value in fields.items())
    parts.extend((kind, payload, None, None) for kind, payload in bodies.items())
    for i, file in enumerate(files, 1):
        payload = file.get_payload(decode=True)
        parts.append(
            (
                f"attachment{i}",
                payload if isinstance(payload, bytes) else b"",
                f"attachment{i}",
                file.get_content_type(),
            )
        )
    return multipart_body(parts)


@pytest.fixture
async def ingress(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Ingress]:
    service = IngressService(settings(nats_server, own_addresses=OWN))
    async with (
        in_process(service, service.settings) as running,
        aiohttp.ClientSession() as http,
    ):
        yield Ingress(running, service, http)


@pytest.mark.parametrize("mode", ["raw", "parsed"])
async def test_the_corpus_through_the_webhook(
    ingress: Ingress, js: JetStreamContext, mode: str
) -> None:
    forwarded: dict[str, str] = {}
    for name, (reason, _, _, _) in sorted(EXPECTED.items()):
        data = (CORPUS / name).read_bytes()
        body, content_type = raw_form(data) if mode == "raw" else parsed_form(data)
        async with ingress.http.post(
            f"{ingress.url}/webhooks/sendgrid/inbound",
            data=body,
            headers={**SENDGRID_AUTH, "Content-Type": content_type},
        ) as resp:
            assert resp.status == 200, (name, await resp.text())
            answer = await resp.json()
        if reason:
            assert answer == {"ignored": reason}, name
        else:
            forwarded[answer["event_id"]] = name
    events: list[InboundMessage] = await stored(js, expect=len(forwarded))
    objects = await js.object_store(streams.ATTACHMENTS)
    for event in events:
        name = forwarded[event.event_id]
        _, text, subject, attachments = EXPECTED[name]
        assert (event.text, event.subject) == (text, subject), name
        assert [(m.filename, m.content_type) for m in event.media] == attachments
        for media in event.media:
            stored_object = await objects.get(media.object)
            assert len(stored_object.data or b"") == media.size > 0
    # The Gmail reply names one of our Message-IDs: it joins that conversation.
    gmail = next(e for e in events if forwarded[e.event_id] == "01-gmail-reply.eml")
    assert gmail.conversation_id == "email-aaaaaaaaaaaaaaaaaaaaaaaa"
    # Everything automatic was counted, by reason.
    metrics = await (await ingress.http.get(f"{ingress.running.health_url}/metrics")).text()
    assert 'podium_ingress_ignored_total{channel="email",reason="bounce"} 1.0' in metrics


def test_broken_encoded_words_never_fail_the_message() -> None:
    # Seen by the webhook fuzzer: a NUL inside a base64 encoded word made the email
    # package raise HeaderParseError (not a ValueError) and the ingress answer 500.
    # policy.default decodes what it can; control characters never reach the event.
    raw = (
        b"From: Olga <olga@example.ru>\nTo: podium@example.com\n"
        b"Subject: =?KOI8-R?B?\x009Teo9Q=?=\nMessage-ID: <ru-1@example.ru>\n"
        b'Content-Type: application/octet-stream; name="=?UTF-8?B?\x00x=?="\n'
        b"Content-Disposition: attachment\n\nhello\n"
    )
    facts = mail.raw_email_facts(raw, OWN)
    assert facts.subject and "\x00" not in facts.subject
    (attachment,) = facts.attachments
    assert attachment.data == b"hello\n" and "\x00" not in attachment.filename


@pytest.mark.parametrize(
    "header",
    [
        # Seen in review: policy.default's address parser raised AttributeError on these.
        b"Cc: .:f@Q)?=<\n",
        b"Cc: a:;-\n b;c\n",
    ],
)
def test_malformed_address_headers_are_read_as_absent(header: bytes) -> None:
    raw = (
        b"From: Grace <grace@example.org>\nTo: podium@example.com\n" + header + b"Subject: Hi\n"
        b"Message-ID: <m-1@example.org>\n\nPlease count these words.\n"
    )
    facts = mail.raw_email_facts(raw, OWN)
    assert (facts.sender, facts.text) == ("grace@example.org", "Please count these words.")
    parsed = mail.email_facts(
        sender_field="Grace <grace@example.org>",
        to_field="podium@example.com",
        subject="Hi",
        text="Please count these words.",
        html="",
        raw_headers=(b"From: grace@example.org\n" + header).decode(),
        own_addresses=OWN,
    )
    assert parsed.sender == "grace@example.org"


def test_a_body_outside_the_rfc_candidates_is_still_found() -> None:
    # multipart/related without a start parameter, an image first: get_body finds no
    # text; the first text part is what a mail client shows.
    raw = (
        b"From: grace@example.org\nTo: podium@example.com\nSubject: Chart\n"
        b"Message-ID: <m-2@example.org>\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/related; boundary="b"\n\n'
        b"--b\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n"
        b"--b\nContent-Type: text/plain\n\nSee the chart.\n--b--\n"
    )
    facts = mail.raw_email_facts(raw, OWN)
    assert facts.text == "See the chart."
    (image,) = facts.attachments
    assert image.content_type == "image/png"
