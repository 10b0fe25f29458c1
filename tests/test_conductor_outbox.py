"""The conductor's transactional outbox: a turn's decisions survive a crash before publishing.

A turn saves the conversation with its decisions first and publishes them after.
Here the conversation is left exactly as a conductor killed between the two
leaves it; the redelivered event must publish the decisions and run no turn.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common import streams, subjects
from podium.common.bus import publish
from podium.common.events import InboundMessage, TaskRequested, decode
from podium.common.ids import conversation_id
from podium.common.kv import Store
from podium.common.state import Conversation, Pending, TaskInfo
from podium.conductor.config import ConductorSettings
from podium.conductor.service import ConductorService
from podium.testing.services import in_process


async def test_decisions_saved_but_not_published_are_published_on_redelivery(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    conv_id = conversation_id("api", "acme", "th1")
    inbound = InboundMessage(
        event_id="ev1", correlation_id="ev1", conversation_id=conv_id, channel="api",
        sender="acme", text="do it", client="acme", thread_id="th1",
    )  # fmt: skip
    task = TaskRequested(
        event_id="fx1", correlation_id="ev1", conversation_id=conv_id, task_id="t000000000001",
        instructions="do it",
    )  # fmt: skip
    store = await Store.open(js, streams.CONVERSATIONS.name, Conversation)
    await store.create(
        conv_id,
        Conversation(
            conversation_id=conv_id,
            channel="api",
            client="acme",
            thread_id="th1",
            handled=["ev1"],
            turns=1,
            tasks={"t000000000001": TaskInfo(task_id="t000000000001", instructions="do it")},
            pending=[Pending(subject=subjects.task("t000000000001"), event=task)],
        ),
    )
    settings = ConductorSettings(
        nats_url=nats_server.url, health_port=0, agent="offline",
        state_dir=str(tmp_path / "state"), workspace_root=str(tmp_path / "ws"),
    )  # fmt: skip
    async with in_process(ConductorService(settings), settings):
        await publish(js, subjects.inbound("api", conv_id), inbound)
        for _ in range(100):
            if (await js.stream_info("TASKS")).state.messages:
                break
            await asyncio.sleep(0.05)
        for _ in range(100):
            found = await store.get(conv_id)
            if found is not None and not found[0].pending:
                break
            await asyncio.sleep(0.05)
    msg = await js.get_msg("TASKS", 1)
    assert msg.data is not None
    assert decode(msg.data) == task
    assert found is not None
    conv = found[0]
    assert conv.pending == []
    assert conv.turns == 1  # no second turn for the same event
