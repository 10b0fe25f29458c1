"""The side port: liveness, readiness (NATS and streams), Prometheus metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.contracts import subjects
from podium.contracts.events import SendSms
from podium.notifier.config import NotifierSettings
from podium.notifier.service import NotifierService
from podium.testing.services import in_process

SENT = 'podium_notifier_sends_total{channel="sms",outcome="sent",transport="outbox"} 1.0'
HANDLED = 'podium_events_in_total{consumer="notifier-commands",outcome="ok",type="command.sms"} 1.0'


async def test_health_ready_metrics(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    settings = NotifierSettings(
        nats_url=nats_server.url, health_port=0, outbox_path=str(tmp_path / "o.jsonl")
    )
    async with (
        in_process(NotifierService(settings), settings) as running,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{running.health_url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{running.health_url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True

        sms = SendSms(
            event_id="m1",
            correlation_id="m1",
            conversation_id="sms-1",
            command_id="m1",
            to="+15550100001",
            body="hi",
        )
        await publish(js, subjects.command("sms", "sms-1"), sms)
        text = ""
        for _ in range(100):
            async with http.get(f"{running.health_url}/metrics") as resp:
                text = await resp.text()
            if SENT in text and HANDLED in text:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(text)

        await js.delete_stream("COMMANDS")
        # Streams are checked every few seconds (a request per stream): wait for it.
        for _ in range(200):
            async with http.get(f"{running.health_url}/readyz") as resp:
                status, reason = resp.status, (await resp.json())["reason"]
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503
        assert "COMMANDS" in reason
