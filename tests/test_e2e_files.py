"""Files through the whole loop, through the services' real entry points (offline agent).

An email with a CSV and a PDF → the worker's ``inputs/`` holds them byte for byte →
the offline worker writes ``outputs/inputs.csv`` (one row per input, with its sha256) →
the platform keeps it as an artifact → the offline conductor answers with ``ATTACH`` →
the reply reaches a real SMTP server with the file as a MIME attachment.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest
from nats.js import JetStreamContext
from twilio.request_validator import RequestValidator

from podium.cli.natsserver import NatsServer, free_port
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from podium.testing.platform import Platform
from podium.testing.smtp import SmtpServer
from tests.test_claude_e2e import claude_platform, is_worker
from tests.test_ingress import TWILIO_TOKEN, twilio_form
from tests.test_mms_media import ACCOUNT, PNG, FakeTwilioMedia, Item

pytestmark = pytest.mark.e2e

LINK_SECRET = "test-link-secret-0123456789abcdef"
CSV = b"sku,price\nA-1,10.00\nB-2,12.50\n"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.fixture
async def platform(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, smtp: SmtpServer
) -> AsyncIterator[Platform]:
    port = free_port()
    platform = Platform(
        nats_server.url,
        tmp_path,
        env={
            "PODIUM_LINK_SECRET": LINK_SECRET,
            "PODIUM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        },
        per_service={
            "ingress": {"PODIUM_PORT": str(port)},
            "notifier": {
                "PODIUM_EMAIL_TRANSPORT": "smtp",
                "PODIUM_SMTP_HOST": "127.0.0.1",
                "PODIUM_SMTP_PORT": str(smtp.port),
                "PODIUM_SMTP_SECURITY": "none",
            },
        },
    ).start()
    try:
        await platform.ready()
        yield platform
    finally:
        platform.stop()


async def delivered(smtp: SmtpServer, platform: Platform, timeout_s: float = 60.0) -> EmailMessage:
    deadline = time.monotonic() + timeout_s
    while not smtp.recorder.messages:
        assert time.monotonic() < deadline, platform.logs()
        await asyncio.sleep(0.05)
    return smtp.recorder.messages[0]


async def test_an_emailed_file_reaches_the_worker_and_its_output_comes_back_attached(
    platform: Platform, smtp: SmtpServer, tmp_path: Path
) -> None:
    await platform.email(
        "Ann <ann@example.com>",
        "New prices",
        "Please list the files I sent.",
        message_id="<prices-1@example.com>",
        files=[("prices.csv", "text/csv", CSV), ("spec.pdf", "application/pdf", PDF)],
    )
    reply = await delivered(smtp, platform)
    assert reply["To"] == "ann@example.com"
    assert reply["In-Reply-To"] == "<prices-1@example.com>"

    (inputs,) = (tmp_path / "workspaces").glob("tasks/*/inputs")
    assert (inputs / "prices.csv").read_bytes() == CSV
    assert (inputs / "spec.pdf").read_bytes() == PDF

    files = {part.get_filename(): part for part in reply.iter_attachments()}
    assert list(files) == ["inputs.csv"]
    part = files["inputs.csv"]
    assert part.get_content_type() == "text/csv"
    sent = part.get_payload(decode=True)
    assert isinstance(sent, bytes)
    (made,) = (tmp_path / "workspaces").glob("tasks/*/outputs/inputs.csv")
    assert sent == made.read_bytes()
    assert f"prices.csv,{len(CSV)},{hashlib.sha256(CSV).hexdigest()}" in sent.decode()
    assert f"spec.pdf,{len(PDF)},{hashlib.sha256(PDF).hexdigest()}" in sent.decode()


@pytest.mark.claude
async def test_the_file_round_trip_with_the_real_cli(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    claude_bin: str,
    smtp: SmtpServer,
) -> None:
    report = b"sku,old,new\nA-1,10.00,11.00\n"

    def respond(call: MessagesCall) -> Reply:
        text = call.last_user_text
        if is_worker(call):
            if call.tool_results:
                return Reply.text(
                    "Status: COMPLETE\nSummary: Wrote outputs/report.csv\n"
                    "Details:\nNew prices, 10% up, in outputs/report.csv."
                )
            assert f"inputs/prices.csv (text/csv, {len(CSV)} bytes)" in text, text
            return Reply.write(f"{call.cwd}/outputs/report.csv", report.decode())
        if "[WORKER:" in text:
            ref = re.search(r"^Artifact: (\S+) \(", text, re.MULTILINE)
            assert ref, text
            return Reply.text(f"REPLY: Here are the new prices.\nATTACH: {ref.group(1)}")
        assert "Attachment: prices.csv (text/csv" in text, text
        return Reply.text("SPAWN_WORKER: Raise every price in inputs/prices.csv by 10%")

    async with FakeAnthropic(respond) as api:
        platform = claude_platform(
            nats_server,
            tmp_path,
            api,
            claude_bin,
            PODIUM_EMAIL_TRANSPORT="smtp",
            PODIUM_SMTP_HOST="127.0.0.1",
            PODIUM_SMTP_PORT=str(smtp.port),
        )
        try:
            await platform.ready()
            await platform.email(
                "Ann <ann@example.com>",
                "Prices",
                "Raise them all by 10%.",
                message_id="<prices-2@example.com>",
                files=[("prices.csv", "text/csv", CSV)],
            )
            reply = await delivered(smtp, platform)
        finally:
            platform.stop()
    assert "Here are the new prices." in reply.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    (part,) = reply.iter_attachments()
    assert part.get_filename() == "report.csv"
    assert part.get_payload(decode=True) == report
    (inputs,) = (tmp_path / "workspaces").glob("tasks/*/inputs")
    assert (inputs / "prices.csv").read_bytes() == CSV


async def test_an_mms_image_reaches_the_worker_and_the_sms_reply_links_its_output(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    media = await FakeTwilioMedia(ACCOUNT, TWILIO_TOKEN).start()
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    platform = Platform(
        nats_server.url,
        tmp_path,
        env={
            "PODIUM_LINK_SECRET": LINK_SECRET,
            "PODIUM_PUBLIC_URL": public,
        },
        per_service={
            "ingress": {
                "PODIUM_PORT": str(port),
                "PODIUM_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
                "PODIUM_TWILIO_ACCOUNT_SID": ACCOUNT,
                "PODIUM_TWILIO_MEDIA_HOSTS": media.api_host,
            }
        },
    ).start()
    try:
        await platform.ready()
        form = twilio_form(
            Body="What is in this picture?",
            NumMedia="1",
            MediaUrl0=media.add(Item("image/png", PNG)),
            MediaContentType0="image/png",
        )
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(
            f"{public}/webhooks/twilio/sms", form
        )
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{public}/webhooks/twilio/sms",
                data=form,
                headers={"X-Twilio-Signature": signature},
            ) as resp:
                assert resp.status == 200, await resp.text()
            (reply,) = await platform.wait_outbox(1)
            (inputs,) = (tmp_path / "workspaces").glob("tasks/*/inputs")
            assert [p.read_bytes() for p in inputs.iterdir()] == [PNG]
            assert reply["channel"] == "sms" and reply["to"] == ["+15550100001"]
            link = re.search(rf"{re.escape(public)}/v1/files/\S+", reply["body"])
            assert link, reply
            async with http.get(link.group(0)) as resp:
                assert resp.status == 200
                served = await resp.read()
        (made,) = (tmp_path / "workspaces").glob("tasks/*/outputs/inputs.csv")
        assert served == made.read_bytes()
        assert hashlib.sha256(PNG).hexdigest() in served.decode()
        # The credentials went to Twilio's host only, never to the CDN it redirected to.
        assert media.api_seen and all(s.authorization for s in media.api_seen)
        assert all(not s.authorization for s in media.cdn_seen)
    finally:
        platform.stop()
        await media.stop()
