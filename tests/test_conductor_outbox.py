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
from podium.common.bus import publish
from podium.common.kv import Store
from podium.conductor.config import ConductorSettings
from podium.conductor.service import ConductorService
from podium.contracts import streams, subjects
from podium.contracts.events import ApiReply, InboundMessage, TaskRequested, TaskResult, decode
from podium.contracts.ids import conversation_id
from podium.contracts.state import Conversation, Pending, TaskInfo
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


async def test_decisions_left_unpublished_survive_a_turn_on_another_event(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    # The replica that saved message 2's turn died before publishing its task; the new
    # owner gets the result of message 1's task first (RESULTS before INBOUND). Found
    # by tests/test_conductor_scale.py: that turn replaced the pending task, lost.
    conv_id = conversation_id("api", "acme", "th2")
    lost = TaskRequested(
        event_id="fx2", correlation_id="ev2", conversation_id=conv_id, task_id="t000000000002",
        instructions="do the second thing",
    )  # fmt: skip
    store = await Store.open(js, streams.CONVERSATIONS.name, Conversation)
    await store.create(
        conv_id,
        Conversation(
            conversation_id=conv_id,
            channel="api",
            client="acme",
            thread_id="th2",
            original_request="[API]\nFrom: acme\nMessage: do it\n---",
            handled=["ev1", "ev2"],
            turns=2,
            tasks={
                "t000000000001": TaskInfo(task_id="t000000000001", instructions="do it"),
                "t000000000002": TaskInfo(task_id="t000000000002", instructions="do it again"),
            },
            pending=[Pending(subject=subjects.task("t000000000002"), event=lost)],
        ),
    )
    first_result = TaskResult(
        event_id="r1", correlation_id="ev1", conversation_id=conv_id, task_id="t000000000001",
        status="COMPLETE", summary="done", details="It is done.",
    )  # fmt: skip
    settings = ConductorSettings(
        nats_url=nats_server.url, health_port=0, agent="offline",
        state_dir=str(tmp_path / "state"), workspace_root=str(tmp_path / "ws"),
    )  # fmt: skip
    async with in_process(ConductorService(settings), settings):
        await publish(js, subjects.result(conv_id, "t000000000001"), first_result)
        for _ in range(200):
            found = await store.get(conv_id)
            if found is not None and "r1" in found[0].handled and not found[0].pending:
                break
            await asyncio.sleep(0.05)
    assert found is not None and "r1" in found[0].handled
    tasks = [decode((await js.get_msg("TASKS", seq)).data or b"") for seq in (1,)]
    assert tasks == [lost]
    # And the result's own turn answered the requester as usual.
    command = await js.get_msg("COMMANDS", 1)
    assert isinstance(decode(command.data or b""), ApiReply)
