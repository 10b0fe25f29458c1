"""A worker says a task started only once it has run for PODIUM_TASK_PROGRESS_AFTER_S."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.contracts import streams, subjects
from podium.contracts.events import EventIds, TaskProgress, TaskRequested, TaskResult, decode
from podium.testing.bus import settled
from podium.testing.services import in_process
from podium.worker.config import WorkerSettings
from podium.worker.service import WorkerService


async def reports(js: JetStreamContext) -> list[TaskProgress | TaskResult]:
    """What the worker told the conductor, in the order RESULTS stored it."""
    info = await js.stream_info(streams.RESULTS.name)
    found: list[TaskProgress | TaskResult] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        event = decode((await js.get_msg(streams.RESULTS.name, seq)).data or b"")
        assert isinstance(event, TaskProgress | TaskResult)
        found.append(event)
    return found


@pytest.mark.parametrize(
    ("after_s", "expected"),
    [
        # A turn longer than the wait: "started", then the result.
        (0.0, ["TaskProgress", "TaskResult"]),
        # A turn over before it: its result says all there is to say.
        (60.0, ["TaskResult"]),
    ],
)
async def test_a_turn_reports_it_started_only_once_it_has_run_a_while(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    after_s: float,
    expected: list[str],
) -> None:
    settings = WorkerSettings(
        nats_url=nats_server.url,
        health_port=0,
        agent="offline",
        offline_delay_s=0.5,
        task_progress_after_s=after_s,
        workspace_root=str(tmp_path / "workspaces"),
        state_dir=str(tmp_path / "state"),
    )
    async with in_process(WorkerService(settings), settings):
        ids = EventIds(event_id="e-task", correlation_id="c", conversation_id="api-c1")
        task = TaskRequested(**ids, task_id="tprogress", instructions="Count the words")
        await publish(js, subjects.task("tprogress"), task)
        # Everything the worker was going to report is stored once it acknowledged the task.
        await settled(js, streams.WORKER_TASKS)
    assert [type(event).__name__ for event in await reports(js)] == expected
