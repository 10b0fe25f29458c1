"""A kill reaches a task that has not started yet: the stored cancel (``tasks.<id>.cancel``).

The conductor stores each kill on TASKS; a worker records it in the task's own
state (the workers own the ``tasks`` bucket), so whichever worker later takes
the task ends it CANCELLED without running its agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.kv import Store
from podium.contracts import streams, subjects
from podium.contracts.events import EventIds, KillTask, TaskRequested, TaskResult, decode
from podium.contracts.state import TaskRecord
from podium.testing.bus import settled
from podium.testing.services import Running, in_process
from podium.worker.config import WorkerSettings
from podium.worker.service import WorkerService


@pytest.fixture
async def worker(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Running]:
    settings = WorkerSettings(
        nats_url=nats_server.url,
        health_port=0,
        agent="offline",
        workspace_root=str(tmp_path / "workspaces"),
    )
    async with in_process(WorkerService(settings), settings) as running:
        yield running


@pytest.fixture
async def slow_worker(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Running]:
    settings = WorkerSettings(
        nats_url=nats_server.url,
        health_port=0,
        agent="offline",
        offline_delay_s=60.0,
        worker_slots=2,
        workspace_root=str(tmp_path / "workspaces"),
    )
    async with in_process(WorkerService(settings), settings) as running:
        yield running


async def results(js: JetStreamContext) -> list[TaskResult]:
    info = await js.stream_info("RESULTS")
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        event = decode((await js.get_msg("RESULTS", seq)).data or b"")
        if isinstance(event, TaskResult):
            found.append(event)
    return found


async def test_a_task_cancelled_before_it_starts_never_runs(
    worker: Running, js: JetStreamContext, tmp_path: Path
) -> None:
    ids = EventIds(event_id="", correlation_id="corr", conversation_id="api-c1")
    kill = KillTask(**(ids | {"event_id": "k1"}), task_id="t1", reason="KILL_WORKER")
    await publish(js, subjects.task_cancel("t1"), kill)
    await settled(js, streams.WORKER_TASKS)
    tasks = await Store.open(js, streams.TASK_STATE.name, TaskRecord)
    found = await tasks.get("t1")
    assert found is not None and found[0].cancel_requested

    task = TaskRequested(**(ids | {"event_id": "e1"}), task_id="t1", instructions="Count to three")
    await publish(js, subjects.task("t1"), task)
    for _ in range(300):
        done = await results(js)
        if done:
            break
        await asyncio.sleep(0.02)
    (result,) = done
    assert (result.task_id, result.status) == ("t1", "CANCELLED")
    assert result.summary == "cancelled before it ran"
    await settled(js, streams.WORKER_TASKS)

    # The agent never ran: no working directory was made for the task, though one is
    # for a task that runs.
    ran = TaskRequested(**(ids | {"event_id": "e2"}), task_id="t2", instructions="Count to three")
    await publish(js, subjects.task("t2"), ran)
    for _ in range(300):
        if len(done := await results(js)) == 2:
            break
        await asyncio.sleep(0.02)
    assert done[1].status == "COMPLETE"
    workdirs = tmp_path / "workspaces" / "tasks"
    assert (workdirs / "t2").is_dir()
    assert not (workdirs / "t1").exists()


async def test_a_stored_cancel_stops_a_running_task_at_once(
    slow_worker: Running, js: JetStreamContext
) -> None:
    # Only the stored cancel, no core kill: the worker that takes it (here the one
    # running the task) must not queue it behind the turn it stops.
    ids = EventIds(event_id="", correlation_id="corr", conversation_id="api-c2")
    task = TaskRequested(**(ids | {"event_id": "e3"}), task_id="t3", instructions="Take a minute")
    await publish(js, subjects.task("t3"), task)
    for _ in range(300):
        progress = await js.stream_info("RESULTS")
        if progress.state.messages:
            break  # its progress event: the agent runs
        await asyncio.sleep(0.02)
    kill = KillTask(**(ids | {"event_id": "k3"}), task_id="t3", reason="KILL_WORKER")
    await publish(js, subjects.task_cancel("t3"), kill)
    for _ in range(500):
        done = await results(js)
        if done:
            break
        await asyncio.sleep(0.02)
    (result,) = done
    assert (result.task_id, result.status) == ("t3", "CANCELLED")
