"""Session leases tell contention from a bus fault (offline agent, real nats-server)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import nats.errors
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.agents import AgentCall
from podium.agents.offline import OfflineRuntime
from podium.agents.sessions import Agents
from podium.cli.natsserver import NatsServer
from podium.common.config import AgentSettings
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.contracts import streams
from podium.contracts.state import SessionRecord


def agents(tmp_path: Path, js: JetStreamContext, name: str, *, lease_wait_s: float) -> Agents:
    settings = AgentSettings(
        workspace_root=str(tmp_path / "workspaces"), agent_lease_wait_s=lease_wait_s
    )
    return Agents(
        OfflineRuntime(tmp_path / name),
        role="worker",
        settings=settings,
        metrics=Metrics(CollectorRegistry(), name),
        js=js,
        replica=name,
    )


def turn(tmp_path: Path, key: str = "t1") -> AgentCall:
    return AgentCall(
        role="worker",
        key=key,
        prompt="<task>\nCount the words\n</task>",
        workdir=tmp_path / "workspaces" / "tasks" / key,
    )


def busy_count(replica: Agents) -> float:
    value = replica.metrics.registry.get_sample_value(
        "podium_agent_session_events_total", {"role": "worker", "event": "busy"}
    )
    return value or 0.0


async def test_a_session_held_by_another_replica_is_busy(
    tmp_path: Path, js: JetStreamContext
) -> None:
    records = await Store.open(js, streams.SESSIONS.name, SessionRecord)
    # Another replica holds the session's lease, and keeps holding it.
    held = SessionRecord(key="worker.t1", holder="other", lease_until=time.time() + 60)
    await records.create("worker.t1", held)
    replica = agents(tmp_path, js, "r1", lease_wait_s=0.5)
    await replica.start()
    try:
        answer = await replica.run(turn(tmp_path))
    finally:
        await replica.close()
    assert answer.outcome == "busy"
    assert "another replica held session worker.t1" in answer.error
    assert busy_count(replica) == 1


async def test_a_bus_timeout_while_taking_the_lease_is_not_called_contention(
    nats_server: NatsServer, tmp_path: Path, js: JetStreamContext
) -> None:
    replica = agents(tmp_path, js, "r1", lease_wait_s=30)
    await replica.start()
    pid = nats_server.pid
    assert pid is not None
    # The server stops answering (as a stream leader does while it is re-elected).
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await replica.run(turn(tmp_path))
    finally:
        os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(replica.close(), 30)
    assert busy_count(replica) == 0
