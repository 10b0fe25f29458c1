"""A worker rollout: SIGTERM mid-task, as Kubernetes sends it, and a new worker beside it.

The worker stops taking tasks and finishes the one it runs (its drain timeout covers
a task, as the manifests set it), so the task is delivered once and its agent work
is not done again by the new worker.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.kv import Store
from podium.contracts import streams
from podium.contracts.state import TaskRecord
from podium.testing.platform import Platform

pytestmark = pytest.mark.e2e


async def running_task(js: JetStreamContext, timeout_s: float = 30.0) -> TaskRecord:
    """The first task whose worker has started it."""
    tasks = await Store.open(js, streams.TASK_STATE.name, TaskRecord)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            keys = await tasks.kv.keys()
        except Exception:  # noqa: BLE001 - no keys yet
            keys = []
        for key in keys:
            found = await tasks.get(key)
            if found is not None and found[0].state == "running":
                return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no task started")


async def test_a_worker_stopped_mid_task_finishes_it_and_it_is_not_run_again(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    platform = Platform(
        nats_server.url,
        tmp_path,
        per_service={
            # A task takes 3 s of agent time; the drain covers it (as the manifests do).
            "worker": {"PODIUM_OFFLINE_DELAY_S": "3", "PODIUM_DRAIN_TIMEOUT_S": "30"}
        },
    ).start()
    try:
        await platform.ready()
        await platform.send("Count the words in this sentence, slowly.")
        await running_task(js)
        old = platform.processes["worker"]
        old.signal(signal.SIGTERM)
        # The rollout's new pod comes up meanwhile.
        new = platform.add("worker", name="worker-new", PODIUM_OFFLINE_DELAY_S="3")
        await new.wait_ready()
        (reply,) = await platform.wait_outbox(1, timeout_s=60)
        code = await asyncio.to_thread(old.wait, 30)
        info = await js.consumer_info(streams.TASKS.name, streams.WORKER_TASKS.durable)
    finally:
        platform.stop()
    assert code == 0, platform.logs()
    assert "Words in the request" in reply["body"]
    # One task, delivered once (a cancelled one would be delivered again, to the new
    # worker, and its agent run again), and acknowledged by the worker that ran it.
    assert info.delivered.stream_seq == 1
    assert info.delivered.consumer_seq == 1
    assert info.num_ack_pending == 0
