"""Notifier: each command sent once, over the outbox file or real SMTP (aiosmtpd)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.config import Secret
from podium.common.kv import Store
from podium.contracts import streams, subjects
from podium.contracts.events import ApiReply, DeadLetter, SendEmail, SendSms, decode
from podium.contracts.state import OutboxRecord
from podium.notifier.config import NotifierSettings
from podium.notifier.service import NotifierService
from podium.notifier.transports import OutgoingFile, Transport
from podium.testing.services import Running, in_process
from podium.testing.smtp import SmtpServer, self_signed


def email(n: int = 1, **extra: Any) -> SendEmail:
    values: dict[str, Any] = {
        "event_id": f"cmd{n}",
        "correlation_id": "corr",
        "conversation_id": "email-abc",
        "command_id": f"cmd{n}",
        "to": ["grace@example.org"],
        "subject": "Re: Quarterly numbers",
        "body": "Here they are.",
        "in_reply_to": "<abc123@example.org>",
        "references": ["<abc123@example.org>"],
    }
    values.update(extra)
    return SendEmail(**values)


async def outbox_state(js: JetStreamContext, command_id: str, want: str) -> OutboxRecord:
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    for _ in range(200):
        found = await store.get(command_id)
        if found and found[0].state == want:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{command_id} never reached {want}: {found}")


async def dead_letters(js: JetStreamContext, expect: int) -> list[DeadLetter]:
    for _ in range(100):
        info = await js.stream_info("DEADLETTER")
        if info.state.messages >= expect:
            break
        await asyncio.sleep(0.05)
    out = []
    for seq in range(1, info.state.messages + 1):
        msg = await js.get_msg("DEADLETTER", seq)
        assert msg.data is not None
        event = decode(msg.data)
        assert isinstance(event, DeadLetter)
        out.append(event)
    return out


@pytest.fixture
async def outbox_notifier(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[tuple[Running, Path]]:
    path = tmp_path / "outbox.jsonl"
    settings = NotifierSettings(
        nats_url=nats_server.url,
        health_port=0,
        outbox_path=str(path),
        email_from="podium@acme.test",
    )
    async with in_process(NotifierService(settings), settings) as running:
        yield running, path


async def lines(path: Path, expect: int) -> list[dict[str, Any]]:
    for _ in range(200):
        if path.exists() and len(path.read_text().splitlines()) >= expect:
            break
        await asyncio.sleep(0.05)
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_outbox_email_is_threaded_and_marked_automatic(
    outbox_notifier: tuple[Running, Path], js: JetStreamContext
) -> None:
    _, path = outbox_notifier
    await publish(js, subjects.command("email", "email-abc"), email())
    (line,) = await lines(path, 1)
    headers = line["headers"]
    assert headers["In-Reply-To"] == "<abc123@example.org>"
    assert headers["References"] == "<abc123@example.org>"
    assert headers["Auto-Submitted"] == "auto-replied"
    assert headers["Message-ID"] == "<cmd1@acme.test>"
    record = await outbox_state(js, "cmd1", "sent")
    assert record.provider_id == "outbox:cmd1"


async def test_a_command_seen_twice_is_sent_once(
    outbox_notifier: tuple[Running, Path], js: JetStreamContext
) -> None:
    _, path = outbox_notifier
    sms = SendSms(
        event_id="s1",
        correlation_id="c",
        conversation_id="sms-1",
        command_id="s1",
        to="+15550100001",
        body="Booked.",
    )
    await publish(js, subjects.command("sms", "sms-1"), sms)
    await outbox_state(js, "s1", "sent")
    # A replay (new Nats-Msg-Id, same command id) gets past stream de-duplication...
    await publish(js, subjects.command("sms", "sms-1"), sms, msg_id="replayed-s1")
    await publish(
        js,
        subjects.command("sms", "sms-1"),
        SendSms(
            event_id="s2",
            correlation_id="c",
            conversation_id="sms-1",
            command_id="s2",
            to="+15550100001",
            body="Second message.",
        ),
    )
    await outbox_state(js, "s2", "sent")
    sent = await lines(path, 2)
    # ...but the outbox record stops a second send.
    assert [line["command_id"] for line in sent] == ["s1", "s2"]


async def test_interrupted_send_is_not_retried_blindly(
    outbox_notifier: tuple[Running, Path], js: JetStreamContext
) -> None:
    _, path = outbox_notifier
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    # What a notifier killed between "sending" and "sent" leaves behind.
    await store.create("cmd9", OutboxRecord(command_id="cmd9", state="sending", transport="smtp"))
    await publish(js, subjects.command("email", "email-abc"), email(9))
    (letter,) = await dead_letters(js, 1)
    assert "may already have been sent" in letter.reason
    assert (await outbox_state(js, "cmd9", "ambiguous")).command_id == "cmd9"
    assert not path.exists()


@pytest.fixture
async def smtp_notifier(
    nats_server: NatsServer, js: JetStreamContext, smtp: SmtpServer
) -> AsyncIterator[Running]:
    settings = NotifierSettings(
        nats_url=nats_server.url,
        health_port=0,
        email_transport="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        email_from="podium@acme.test",
    )
    async with in_process(NotifierService(settings), settings) as running:
        yield running


async def test_smtp_delivery(
    smtp_notifier: Running, smtp: SmtpServer, js: JetStreamContext
) -> None:
    await publish(js, subjects.command("email", "email-abc"), email())
    record = await outbox_state(js, "cmd1", "sent")
    (msg,) = smtp.recorder.messages
    assert msg["To"] == "grace@example.org"
    assert msg["From"] == "podium@acme.test"
    assert msg["Subject"] == "Re: Quarterly numbers"
    assert msg["In-Reply-To"] == "<abc123@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == record.provider_id == "<cmd1@acme.test>"
    assert msg.get_content().strip() == "Here they are."


async def test_smtp_temporary_refusal_is_retried(
    smtp_notifier: Running, smtp: SmtpServer, js: JetStreamContext
) -> None:
    smtp.recorder.rcpt_replies.append("451 4.7.1 Greylisted, try again")
    await publish(js, subjects.command("email", "email-abc"), email())
    record = await outbox_state(js, "cmd1", "sent")
    assert record.attempts == 2
    assert len(smtp.recorder.messages) == 1


async def test_smtp_permanent_refusal_is_dead_lettered(
    smtp_notifier: Running, smtp: SmtpServer, js: JetStreamContext
) -> None:
    smtp.recorder.rcpt_replies.append("550 5.1.1 No such user")
    await publish(js, subjects.command("email", "email-abc"), email())
    record = await outbox_state(js, "cmd1", "failed")
    assert "550" in record.error
    (letter,) = await dead_letters(js, 1)
    assert "refused for good" in letter.reason
    assert smtp.recorder.messages == []


async def test_smtp_with_starttls_and_auth(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server = SmtpServer(tls=(cert, key), credentials=("podium", "smtp-pass-123")).start()
    try:
        settings = NotifierSettings(
            nats_url=nats_server.url,
            health_port=0,
            email_transport="smtp",
            smtp_host="127.0.0.1",
            smtp_port=server.port,
            smtp_security="starttls",
            smtp_username="podium",
            smtp_password=Secret("smtp-pass-123"),
            smtp_ca_file=str(cert),
            email_from="podium@acme.test",
        )
        async with in_process(NotifierService(settings), settings):
            await publish(js, subjects.command("email", "email-abc"), email())
            await outbox_state(js, "cmd1", "sent")
        assert server.logins == ["podium"]
        (msg,) = server.recorder.messages
        assert msg["Subject"] == "Re: Quarterly numbers"
    finally:
        server.stop()


async def test_smtp_without_the_tls_the_server_requires_is_retried_not_failed(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server = SmtpServer(tls=(cert, key)).start()
    try:
        settings = NotifierSettings(
            nats_url=nats_server.url,
            health_port=0,
            email_transport="smtp",
            smtp_host="127.0.0.1",
            smtp_port=server.port,
            email_from="podium@acme.test",
            retry_base_s=0.2,
        )
        async with in_process(NotifierService(settings), settings):
            await publish(js, subjects.command("email", "email-abc"), email())
            # 530: our settings are wrong, not the message; it waits for a fix.
            record = await outbox_state(js, "cmd1", "retry")
        assert "530" in record.error
        assert server.recorder.messages == []
    finally:
        server.stop()


class PausingTransport:
    """The outbox transport, after whose first send the NATS server stops answering for
    longer than a request's timeout (as while a JetStream leader is re-elected)."""

    def __init__(self, inner: Transport, server: NatsServer, pause_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.server = server
        self.pause_s = pause_s
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()

    async def send(
        self, command: SendEmail | SendSms | ApiReply, files: Sequence[OutgoingFile] = ()
    ) -> str:
        provider_id = await self.inner.send(command, files)
        pid = self.server.pid
        if not self.paused.is_set() and pid is not None:
            self.paused.set()
            os.kill(pid, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(self.pause_s, self._resume, pid)
        return provider_id

    def _resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.resumed.set()

    async def close(self) -> None:
        await self.inner.close()


async def test_a_send_the_provider_took_is_recorded_sent_when_nats_stalls_after_it(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.jsonl"
    settings = NotifierSettings(nats_url=nats_server.url, health_port=0, outbox_path=str(path))
    service = NotifierService(settings)
    email_transport, sms, api = service.transports()
    # Longer than nats-py's 5 s request timeout: the record update after the send fails.
    pausing = PausingTransport(email_transport, nats_server, pause_s=7.0)
    service.transports = lambda: (pausing, sms, api)  # type: ignore[method-assign]
    async with in_process(service, settings):
        await publish(js, subjects.command("email", "email-abc"), email())
        await asyncio.wait_for(pausing.resumed.wait(), 20)
        record = await outbox_state(js, "cmd1", "sent")
    # Sent once, recorded as sent: not "ambiguous", no DeliveryFailed, no dead letter.
    assert record.provider_ids == ["outbox:cmd1"]
    assert len(await lines(path, 1)) == 1
    info = await js.stream_info("DEADLETTER")
    assert info.state.messages == 0
    results = await js.stream_info("RESULTS")
    assert results.state.messages == 0
