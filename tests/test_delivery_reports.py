"""The conductor sees the notifier's delivery failures: a note for the agent's next turn,
recorded once, no turn of its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.kv import Store
from podium.conductor.config import ConductorSettings
from podium.conductor.service import ConductorService
from podium.contracts import streams, subjects
from podium.contracts.events import DeliveryFailed, InboundMessage
from podium.contracts.state import Conversation
from podium.testing.bus import settled
from podium.testing.services import in_process


async def conversation(js: JetStreamContext, key: str, done: str) -> Conversation:
    store = await Store.open(js, streams.CONVERSATIONS.name, Conversation)
    found = None
    for _ in range(300):
        found = await store.get(key)
        if found and done in found[0].handled:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{done} never handled in {key}: {found}")


async def test_a_delivery_failure_becomes_a_note_for_the_next_turn(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    settings = ConductorSettings(
        nats_url=nats_server.url,
        health_port=0,
        agent="offline",
        state_dir=str(tmp_path / "state"),
        workspace_root=str(tmp_path / "ws"),
    )
    async with in_process(ConductorService(settings), settings):
        inbound = InboundMessage(
            event_id="in1",
            correlation_id="in1",
            conversation_id="sms-c1",
            channel="sms",
            sender="+15550100001",
            recipients=["+15550100999"],
            text="What time is it?",
            message_id="SM1",
        )
        await publish(js, subjects.inbound("sms", "sms-c1"), inbound)
        before = await conversation(js, "sms-c1", "in1")
        report = DeliveryFailed(
            event_id="df1",
            correlation_id="in1",
            conversation_id="sms-c1",
            command_id="cmd-9",
            channel="sms",
            to=["+15550100001"],
            outcome="suppressed",
            reason="the recipient opted out",
            provider_code="21610",
        )
        await publish(js, subjects.delivery_report("sms-c1", "cmd-9"), report)
        after = await conversation(js, "sms-c1", "df1")
        assert any("cmd-9" in n and "suppressed" in n for n in after.notes)
        # No agent turn ran for it.
        assert after.turns == before.turns
        # Told again (a redelivery, a replay): still one note.
        await publish(js, subjects.delivery_report("sms-c1", "cmd-9"), report, msg_id="again")
        await settled(
            js, streams.conductor_results(subjects.partition_of("sms-c1", streams.PARTITIONS))
        )
        store = await Store.open(js, streams.CONVERSATIONS.name, Conversation)
        found = await store.get("sms-c1")
        assert found is not None
        assert sum("cmd-9" in n for n in found[0].notes) == 1
        assert (await js.stream_info("DEADLETTER")).state.messages == 0
