"""Notifier: a worker's files go with the message, as MIME parts (SMTP through aiosmtpd,
SendGrid through its v3 wire format) or as signed download links (SMS, API replies,
email past its size limit), and a message never leaves a file out silently."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import nats
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from prometheus_client import CollectorRegistry

from podium.cli.natsserver import NatsServer
from podium.common import links
from podium.common.bus import publish
from podium.common.config import Secret, load
from podium.common.errors import ConfigError
from podium.common.kv import Store
from podium.common.provision import provision
from podium.contracts import access, streams, subjects
from podium.contracts.events import ApiReply, Artifact, SendEmail, SendSms
from podium.contracts.ids import message_id_for
from podium.contracts.state import ConversationReplies, OutboxRecord
from podium.notifier.config import NotifierSettings
from podium.notifier.files import Files, Linker
from podium.notifier.service import NotifierService
from podium.notifier.transports import OutgoingFile, split_sms
from podium.testing.bus import settled
from podium.testing.sendgrid import FakeSendGrid
from podium.testing.services import Process, Running, base_env, in_process
from podium.testing.smtp import Recorder, SmtpServer
from podium.testing.twilio import FakeTwilio
from tests.conftest import NATS_PASSWORDS, nats_password_env
from tests.test_notifier_crash import provision_fast_redelivery

PUBLIC = "https://podium.example.com"
SECRET = "link-secret-for-notifier-tests-0123"
TTL_S = 3 * 24 * 3600.0
SENDGRID_KEY = "SG.fake-key.for-attachment-tests"
ACCOUNT = "AC" + "2" * 32
AUTH = "twilio-auth-token-attachments-0123"
CONV = "email-files"
TOKEN = re.compile(re.escape(PUBLIC + links.PATH) + r"([A-Za-z0-9_.=-]+)")
#: Every byte value, so an encoding that is not byte for byte shows.
BINARY = bytes(range(256)) * 40
CSV = b"region,q3\r\nnorth,1200\r\nsouth,980\r\n"


async def put_artifact(
    js: JetStreamContext, name: str, data: bytes, content_type: str, task_id: str = "t-abc123"
) -> Artifact:
    """Store ``data`` as a worker stores an output file; the Artifact that names it."""
    store = await js.object_store(streams.ARTIFACTS)
    obj = f"{task_id}/{name}"
    await store.put(obj, data, meta=ObjectMeta(name=obj, description=content_type))
    return Artifact(
        task_id=task_id,
        name=name,
        size=len(data),
        content_type=content_type,
        sha256=hashlib.sha256(data).hexdigest(),
        object=obj,
    )


def email(n: int = 1, attachments: list[Artifact] | None = None, **extra: Any) -> SendEmail:
    values: dict[str, Any] = {
        "event_id": f"mail{n}",
        "correlation_id": "corr",
        "conversation_id": CONV,
        "command_id": f"mail{n}",
        "to": ["grace@example.org"],
        "subject": "Quarterly numbers",
        "body": "Here they are.",
        "attachments": attachments or [],
    }
    values.update(extra)
    return SendEmail(**values)


def sms(attachments: list[Artifact], body: str = "Your report is ready.") -> SendSms:
    return SendSms(
        event_id="sms1",
        correlation_id="corr",
        conversation_id="sms-files",
        command_id="sms1",
        to="+15550100001",
        body=body,
        sender="+15550100999",
        attachments=attachments,
    )


def settings_for(nats: NatsServer, tmp_path: Path, **extra: Any) -> NotifierSettings:
    values: dict[str, Any] = {
        "nats_url": nats.url,
        "health_port": 0,
        "email_from": "podium@acme.test",
        "sms_from": "+15550100999",
        "outbox_path": str(tmp_path / "outbox.jsonl"),
        "public_url": PUBLIC,
        "link_secret": Secret(SECRET),
        "link_ttl_s": TTL_S,
        "retry_base_s": 0.2,
        "send_timeout_s": 5.0,
    }
    values.update(extra)
    return NotifierSettings(**values)


async def sent(js: JetStreamContext, command_id: str) -> OutboxRecord:
    """The outbox record once it says sent, and the notifier holds no command any more."""
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    deadline = time.monotonic() + 30
    while (found := await store.get(command_id)) is None or found[0].state != "sent":
        assert time.monotonic() < deadline, f"{command_id} never sent: {found}"
        await asyncio.sleep(0.05)
    await settled(js, streams.NOTIFIER_COMMANDS)
    return found[0]


def files_counted(running: Running, channel: str, outcome: str) -> float:
    registry: CollectorRegistry = running.health.registry
    value = registry.get_sample_value(
        "podium_notifier_files_total", {"channel": channel, "outcome": outcome}
    )
    return value or 0.0


def checked(url: str) -> str:
    """The object a download link names (``links.check`` refuses any other)."""
    match = TOKEN.fullmatch(url) or TOKEN.search(url)
    assert match, url
    return links.check(match.group(1), SECRET)


def attachments_of(msg: EmailMessage) -> dict[str, tuple[str, bytes]]:
    """{filename: (content type, bytes)} of a message as its recipient's client parses it."""
    parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    out: dict[str, tuple[str, bytes]] = {}
    for part in parsed.iter_attachments():
        assert isinstance(part, EmailMessage)
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        out[str(part.get_filename())] = (part.get_content_type(), data)
    return out


def body_of(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert isinstance(part, EmailMessage)
    return str(part.get_content())


@contextlib.asynccontextmanager
async def smtp_notifier(
    nats: NatsServer, tmp_path: Path, smtp: SmtpServer, **extra: Any
) -> AsyncIterator[Running]:
    settings = settings_for(
        nats, tmp_path, email_transport="smtp", smtp_host="127.0.0.1", smtp_port=smtp.port, **extra
    )
    async with in_process(NotifierService(settings), settings) as running:
        yield running


@pytest.fixture
async def over_smtp(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, smtp: SmtpServer
) -> AsyncIterator[Running]:
    async with smtp_notifier(nats_server, tmp_path, smtp) as running:
        yield running


# --- email: MIME parts ----------------------------------------------------------------


async def test_smtp_email_carries_its_files_as_mime_attachments_byte_for_byte(
    over_smtp: Running, smtp: SmtpServer, js: JetStreamContext
) -> None:
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    chart = await put_artifact(js, "charts/q3.png", BINARY, "image/png")
    await publish(js, subjects.command("email", CONV), email(attachments=[report, chart]))
    await sent(js, "mail1")
    (msg,) = smtp.recorder.messages
    assert attachments_of(msg) == {
        "report.csv": ("text/csv", CSV),
        # The name without the folders it had under outputs/.
        "q3.png": ("image/png", BINARY),
    }
    assert body_of(msg).strip() == "Here they are."
    assert msg["Message-ID"] == message_id_for("mail1", CONV, "podium@acme.test")
    assert files_counted(over_smtp, "email", "attached") == 2


async def test_sendgrid_email_carries_its_files_as_v3_attachments(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    sendgrid = await FakeSendGrid(SENDGRID_KEY).start()
    settings = settings_for(
        nats_server,
        tmp_path,
        email_transport="sendgrid",
        sendgrid_api_key=Secret(SENDGRID_KEY),
        sendgrid_api_base=sendgrid.url,
    )
    try:
        report = await put_artifact(js, "report.csv", CSV, "text/csv")
        chart = await put_artifact(js, "charts/q3.png", BINARY, "image/png")
        async with in_process(NotifierService(settings), settings):
            await publish(js, subjects.command("email", CONV), email(attachments=[report, chart]))
            done = await sent(js, "mail1")
    finally:
        await sendgrid.stop()
    (mail,) = sendgrid.accepted
    assert done.provider_id == mail.message_id
    got = [
        (a["filename"], a["type"], a["disposition"], base64.b64decode(a["content"]))
        for a in mail.body["attachments"]
    ]
    assert got == [
        ("report.csv", "text/csv", "attachment", CSV),
        ("q3.png", "image/png", "attachment", BINARY),
    ]
    assert mail.text == "Here they are."


async def test_files_past_the_email_limit_go_as_links_in_order(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, smtp: SmtpServer
) -> None:
    first = await put_artifact(js, "a.bin", b"a" * 600, "application/octet-stream")
    second = await put_artifact(js, "b.bin", b"b" * 600, "application/octet-stream")
    third = await put_artifact(js, "c.txt", b"c" * 300, "text/plain")
    async with smtp_notifier(
        nats_server, tmp_path, smtp, email_attachments_max_bytes=1000
    ) as running:
        await publish(
            js, subjects.command("email", CONV), email(attachments=[first, second, third])
        )
        await sent(js, "mail1")
        linked = files_counted(running, "email", "linked")
    (msg,) = smtp.recorder.messages
    # 600 fits, 600 more would pass 1000: a link; 300 more still fits.
    assert set(attachments_of(msg)) == {"a.bin", "c.txt"}
    body = body_of(msg)
    (line,) = [line for line in body.splitlines() if "b.bin" in line]
    assert "too large to attach" in line
    assert checked(line) == second.object
    assert linked == 1


async def test_a_file_missing_from_the_store_is_named_and_the_email_still_goes(
    over_smtp: Running, smtp: SmtpServer, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    gone = Artifact(
        task_id="t-abc123",
        name="gone.pdf",
        size=10,
        content_type="application/pdf",
        sha256="0" * 64,
        object="t-abc123/gone.pdf",
    )
    with caplog.at_level(logging.WARNING, logger="podium.notifier.files"):
        await publish(js, subjects.command("email", CONV), email(attachments=[gone, report]))
        await sent(js, "mail1")
    (msg,) = smtp.recorder.messages
    assert set(attachments_of(msg)) == {"report.csv"}
    assert "gone.pdf could not be found, so it is not attached." in body_of(msg)
    assert any("not in the store" in r.getMessage() for r in caplog.records)
    assert files_counted(over_smtp, "email", "missing") == 1


async def test_an_email_with_files_redelivered_or_retried_is_sent_once(
    over_smtp: Running, smtp: SmtpServer, js: JetStreamContext
) -> None:
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    # Greylisted first: nothing left, so the files are fetched again and it goes once.
    smtp.recorder.rcpt_replies.append("451 4.7.1 Greylisted, try again")
    command = email(attachments=[report])
    await publish(js, subjects.command("email", CONV), command)
    assert (await sent(js, "mail1")).attempts == 2
    # A replay of the same command (another Nats-Msg-Id) gets past stream de-duplication...
    await publish(js, subjects.command("email", CONV), command, msg_id="replayed-mail1")
    await publish(js, subjects.command("email", CONV), email(2, attachments=[report]))
    await sent(js, "mail2")
    # ...but the outbox record stops a second send.
    assert [m["Message-ID"] for m in smtp.recorder.messages] == [
        message_id_for(f"mail{n}", CONV, "podium@acme.test") for n in (1, 2)
    ]
    assert all(
        attachments_of(m) == {"report.csv": ("text/csv", CSV)} for m in smtp.recorder.messages
    )


# --- SMS and API replies: links ------------------------------------------------------


async def test_an_sms_carries_a_signed_link_to_each_file(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    twilio = await FakeTwilio(ACCOUNT, AUTH).start()
    settings = settings_for(
        nats_server,
        tmp_path,
        sms_transport="twilio",
        twilio_account_sid=ACCOUNT,
        twilio_auth_token=Secret(AUTH),
        twilio_api_base=twilio.url,
    )
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    command = sms([report])
    try:
        async with in_process(NotifierService(settings), settings):
            await publish(js, subjects.command("sms", "sms-files"), command)
            await sent(js, "sms1")
    finally:
        await twilio.stop()
    (message,) = twilio.sent
    text, line = message.body.rsplit("\n", 1)
    assert text.strip() == "Your report is ready."
    assert line.startswith("report.csv: " + PUBLIC + links.PATH)
    assert checked(line.removeprefix("report.csv: ")) == report.object
    expires = int(line.rsplit(".", 2)[1])
    assert expires == int((command.at + timedelta(seconds=TTL_S)).timestamp())


async def test_an_api_reply_lists_its_files_with_links_in_the_read_model_and_outbox(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    reply = ApiReply(
        event_id="api1",
        correlation_id="corr",
        conversation_id="api-files",
        command_id="api1",
        client="acme-app",
        thread_id="th-1",
        body="Done: the report is attached.",
        attachments=[report],
    )
    settings = settings_for(nats_server, tmp_path)
    async with in_process(NotifierService(settings), settings):
        await publish(js, subjects.command("api", "api-files"), reply)
        await sent(js, "api1")
    replies = await Store.open(js, streams.REPLIES.name, ConversationReplies)
    found = await replies.get("api-files")
    assert found is not None
    (view,) = found[0].replies
    (file,) = view.files
    assert (file.name, file.size, file.content_type) == ("report.csv", len(CSV), "text/csv")
    assert checked(file.url) == report.object
    assert file.expires_at == reply.at.replace(microsecond=0) + timedelta(seconds=TTL_S)
    assert view.body == "Done: the report is attached."
    (line,) = [json.loads(x) for x in (tmp_path / "outbox.jsonl").read_text().splitlines()]
    (listed,) = line["attachments"]
    assert listed["link"] == file.url
    assert {k: listed[k] for k in ("name", "size", "type", "sha256", "sent_as")} == {
        "name": "report.csv",
        "size": len(CSV),
        "type": "text/csv",
        "sha256": report.sha256,
        "sent_as": "linked",
    }


async def test_without_link_settings_messages_say_which_files_were_not_linked(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    big = await put_artifact(js, "big.bin", BINARY, "application/octet-stream")
    settings = settings_for(
        nats_server,
        tmp_path,
        public_url="",
        link_secret=Secret(""),
        email_attachments_max_bytes=100,
    )
    with caplog.at_level(logging.WARNING, logger="podium.notifier.service"):
        async with in_process(NotifierService(settings), settings) as running:
            await publish(js, subjects.command("sms", "sms-files"), sms([report]))
            await publish(js, subjects.command("email", CONV), email(attachments=[report, big]))
            await sent(js, "sms1")
            await sent(js, "mail1")
            unlinked = (
                files_counted(running, "sms", "unlinked"),
                files_counted(running, "email", "unlinked"),
            )
    (warning,) = [r for r in caplog.records if "download links cannot be made" in r.getMessage()]
    assert "PODIUM_PUBLIC_URL" in warning.getMessage()
    assert "PODIUM_LINK_SECRET" in warning.getMessage()
    lines = (tmp_path / "outbox.jsonl").read_text().splitlines()
    out = {line["command_id"]: line for line in map(json.loads, lines)}
    why = "download links are not set up on this server (no public URL and no link secret)"
    assert out["sms1"]["body"].endswith(f"\n\nreport.csv: could not be linked ({why})")
    assert (
        f"big.bin (10.2 KB) is too large to attach and could not be linked: {why}."
        in (out["mail1"]["body"])
    )
    assert [a["sent_as"] for a in out["mail1"]["attachments"]] == ["attached", "unlinked"]
    assert all("link" not in a for a in out["mail1"]["attachments"])
    assert unlinked == (1, 1)


async def test_an_sms_renders_the_same_text_on_every_attempt() -> None:
    # A long SMS resumes after its last recorded part: its parts must not change between
    # attempts, so a link's expiry counts from the command, not from the attempt.
    artifact = Artifact(
        task_id="t-1",
        name="report.csv",
        size=3,
        content_type="text/csv",
        sha256="0" * 64,
        object="t-1/report.csv",
    )
    files = Files(None, None, Linker(PUBLIC, Secret(SECRET), TTL_S), email_max_bytes=0)
    command = sms([artifact], body="word " * 700)
    first, again = files.text(command), files.text(command)
    assert first == again
    parts = split_sms(first.body)
    assert len(parts) == 3
    assert checked(parts[-1]) == artifact.object


async def test_email_with_files_waits_for_the_artifacts_store_when_it_is_not_provisioned(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, smtp: SmtpServer
) -> None:
    await js.delete_object_store(streams.ARTIFACTS)
    report = Artifact(
        task_id="t-abc123",
        name="report.csv",
        size=len(CSV),
        content_type="text/csv",
        sha256=hashlib.sha256(CSV).hexdigest(),
        object="t-abc123/report.csv",
    )
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    async with smtp_notifier(nats_server, tmp_path, smtp, provision=False):
        await publish(js, subjects.command("email", CONV), email(attachments=[report]))
        # Not sent without its file, and not failed: tried again.
        deadline = time.monotonic() + 30
        while (found := await store.get("mail1")) is None or found[0].state != "retry":
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.05)
        assert "object store does not exist" in found[0].error
        assert smtp.recorder.messages == []
        await provision(js)
        assert await put_artifact(js, "report.csv", CSV, "text/csv") == report
        await sent(js, "mail1")
    (msg,) = smtp.recorder.messages
    assert attachments_of(msg) == {"report.csv": ("text/csv", CSV)}


@dataclass
class HoldingRecorder(Recorder):
    """Takes each message, then holds its answer until released: a notifier killed
    meanwhile never learns that the server has it."""

    got: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.got.set()
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        return reply


@pytest.mark.e2e
async def test_killed_while_sending_an_email_with_files_it_is_never_sent_twice(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    await provision_fast_redelivery(js)
    report = await put_artifact(js, "report.csv", CSV, "text/csv")
    server = SmtpServer()
    holding = HoldingRecorder()
    server.recorder = holding
    server._controller.handler = holding
    server.start()
    env = base_env(
        nats_server.url,
        tmp_path,
        PODIUM_PROVISION="false",
        PODIUM_EMAIL_TRANSPORT="smtp",
        PODIUM_SMTP_HOST="127.0.0.1",
        PODIUM_SMTP_PORT=str(server.port),
        PODIUM_EMAIL_FROM="podium@acme.test",
        PODIUM_PUBLIC_URL=PUBLIC,
        PODIUM_LINK_SECRET=SECRET,
    )
    try:
        first = Process("notifier", env, tmp_path / "logs-1").start()
        try:
            await first.wait_ready()
            await publish(js, subjects.command("email", CONV), email(attachments=[report]))
            assert await asyncio.to_thread(holding.got.wait, 20)
            first.signal(signal.SIGKILL)
            first.wait(10)
        finally:
            first.stop()
        holding.release.set()
        second = Process("notifier", env, tmp_path / "logs-2").start()
        try:
            await second.wait_ready()
            # Redelivered once the first one's ack wait ran out, then given up on.
            await settled(js, streams.NOTIFIER_COMMANDS)
        finally:
            second.stop()
    finally:
        server.stop()
    (msg,) = holding.messages
    assert attachments_of(msg) == {"report.csv": ("text/csv", CSV)}
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    found = await store.get("mail1")
    assert found is not None and found[0].state == "ambiguous"
    assert (await js.stream_info("DEADLETTER")).state.messages == 1


async def test_the_notifier_reads_artifacts_with_its_own_least_privileged_user(
    tmp_path: Path, smtp: SmtpServer
) -> None:
    # The permissions derived from the registry (the notifier reads ``artifacts``), as
    # the server enforces them: the fetch needs stream info, a message get and an
    # ordered consumer delivering to the notifier's own inbox.
    directory = tmp_path / "secure"
    directory.mkdir()
    (directory / "accounts.conf").write_text(access.render_accounts())
    (directory / "nats.conf").write_text("include ./accounts.conf\n")
    env = {**os.environ, **nats_password_env()}
    server = NatsServer(
        directory / "jetstream", config_file=directory / "nats.conf", env=env
    ).start()
    admin = await nats.connect(server.url, user=access.ADMIN, password=NATS_PASSWORDS[access.ADMIN])
    try:
        js = admin.jetstream()
        await provision(js)
        report = await put_artifact(js, "report.csv", CSV, "text/csv")
        async with smtp_notifier(
            server,
            tmp_path,
            smtp,
            provision=False,
            nats_user="notifier",
            nats_password=Secret(NATS_PASSWORDS["notifier"]),
        ):
            await publish(js, subjects.command("email", CONV), email(attachments=[report]))
            await sent(js, "mail1")
    finally:
        await admin.close()
        server.stop()
    (msg,) = smtp.recorder.messages
    assert attachments_of(msg) == {"report.csv": ("text/csv", CSV)}


def test_link_settings_are_read_from_the_environment_and_checked() -> None:
    settings = load(
        NotifierSettings,
        {
            "PODIUM_PUBLIC_URL": PUBLIC,
            "PODIUM_LINK_SECRET": SECRET,
            "PODIUM_LINK_TTL_S": "3600",
            "PODIUM_EMAIL_ATTACHMENTS_MAX_BYTES": "0",
        },
    )
    assert (settings.public_url, settings.link_secret.reveal()) == (PUBLIC, SECRET)
    assert (settings.link_ttl_s, settings.email_attachments_max_bytes) == (3600.0, 0)
    defaults = load(NotifierSettings, {})
    assert (defaults.public_url, bool(defaults.link_secret)) == ("", False)
    assert defaults.link_ttl_s == 7 * 24 * 3600
    assert defaults.email_attachments_max_bytes == 10 * 1024 * 1024
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load(NotifierSettings, {"PODIUM_LINK_SECRET": "short"})
    with pytest.raises(ConfigError, match="PODIUM_PUBLIC_URL"):
        load(NotifierSettings, {"PODIUM_PUBLIC_URL": "podium.example.com"})
    with pytest.raises(ConfigError, match="PODIUM_LINK_TTL_S"):
        load(NotifierSettings, {"PODIUM_LINK_TTL_S": str(31 * 24 * 3600)})


def test_a_file_goes_under_its_own_name_and_a_usable_media_type() -> None:
    def file(name: str, content_type: str) -> OutgoingFile:
        artifact = Artifact(
            task_id="t-1",
            name=name,
            size=1,
            content_type=content_type,
            sha256="0" * 64,
            object=f"t-1/{name}",
        )
        return OutgoingFile(artifact, "attached", data=b"x")

    assert file("charts/2026/q3.png", "image/png").filename == "q3.png"
    assert file("notes.txt", "Text/Plain; charset=utf-8").media_type == ("text", "plain")
    for odd in ("", "nonsense", "multipart/mixed", "message/rfc822"):
        assert file("x", odd).media_type == ("application", "octet-stream")
