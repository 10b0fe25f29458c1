"""Start-up faults stop a service with one line naming the cause; readiness means able to work.

Each service runs through its real entry point (``python -m podium.<service>``), as
``podium up``, compose and Kubernetes start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.cli.natsserver import NatsServer, free_port
from podium.common import provision
from podium.common.bus import publish
from podium.common.errors import EXIT_STARTUP
from podium.common.kv import Store
from podium.common.provision import ensure_stream
from podium.common.runtime import CLOSE_GRACE_S, HealthServer, run
from podium.conductor.partitions import Lease, PartitionManager
from podium.contracts import streams, subjects
from podium.contracts.events import DeadLetter, TaskResult, decode
from podium.contracts.ids import new_id
from podium.notifier.config import NotifierSettings
from podium.notifier.service import NotifierService
from podium.testing.platform import Platform
from podium.testing.services import Process, base_env

pytestmark = pytest.mark.e2e

SERVICES = ("ingress", "conductor", "worker", "notifier")


def service_env(service: str, nats_url: str, root: Path, **extra: str) -> dict[str, str]:
    """What a service needs to start on its own, besides ``extra``."""
    own = {}
    if service == "ingress":
        own = {
            "PODIUM_PORT": "0",
            "PODIUM_HOST": "127.0.0.1",
            "PODIUM_API_TOKENS": "test:start-up-token-0123456789",
        }
    return base_env(nats_url, root, PODIUM_LOG_LEVEL="INFO", **{**own, **extra})


def run_service(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"podium.{service}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("service", SERVICES)
def test_a_server_too_old_for_podium_stops_the_service_naming_it(
    service: str, old_nats: str, tmp_path: Path
) -> None:
    done = run_service(service, service_env(service, old_nats, tmp_path))
    assert done.returncode == EXIT_STARTUP, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"podium-{service}: cannot start: the NATS server at {old_nats} is nats-server 2.9.10; "
        "Podium needs 2.14.0 or newer (JetStream consumer reset, subject transforms)"
    )


def test_podium_verbs_refuse_a_server_too_old_and_say_so(old_nats: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "podium.cli", "status"],
        env={**base_env(old_nats, Path("/nonexistent")), "NATS_URL": old_nats},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"podium status: the NATS server at {old_nats} is nats-server 2.9.10; Podium needs "
        "2.14.0 or newer (JetStream consumer reset, subject transforms)"
    ]


def test_podium_status_against_a_dead_port_gives_up_in_time_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "podium.cli", "status"],
        env={**base_env(url, Path("/nonexistent")), "PODIUM_NATS_CONNECT_TIMEOUT_S": "2"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    # One line, naming the URL and what happened; not "nats error" twice a second.
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"podium status: cannot connect to NATS at {url}: ")
    assert "Connect call failed" in line
    assert done.stdout == ""
    # Interpreter start-up plus at most the connect timeout.
    assert elapsed < 2 + 8


@pytest.mark.parametrize("service", ["conductor", "worker"])
@pytest.mark.parametrize("fault", ["missing", "not executable", "auto, role variable"])
def test_an_agent_cli_that_cannot_run_stops_the_service_at_start(
    service: str, fault: str, tmp_path: Path
) -> None:
    cli = tmp_path / "bin" / "claude"
    env = {"PODIUM_AGENT": "claude", "PODIUM_CLAUDE_BIN": str(cli)}
    expected = f"PODIUM_CLAUDE_BIN (or PODIUM_{service.upper()}_CLAUDE_BIN)='{cli}'"
    error = "No such file or directory"
    if fault == "not executable":
        cli.parent.mkdir()
        cli.write_text("#!/bin/sh\necho 2.1.197\n")
        cli.chmod(0o644)
        error = "Permission denied"
    if fault == "auto, role variable":
        # auto picks claude when an API key is set; the role's own variable wins.
        env = {
            "PODIUM_AGENT": "auto",
            "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
            "PODIUM_CLAUDE_BIN": "/usr/bin/true",
            f"PODIUM_{service.upper()}_CLAUDE_BIN": str(cli),
        }
    # NATS is not even there: the agent is checked first, and that is the fault named.
    dead = f"nats://127.0.0.1:{free_port()}"
    done = run_service(service, service_env(service, dead, tmp_path, **env))
    assert done.returncode == EXIT_STARTUP, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"podium-{service}: cannot start: the Claude Code CLI cannot be run: ")
    assert expected in last
    assert error in last


@pytest.mark.parametrize("service", SERVICES)
def test_sigterm_while_nats_never_answered_stops_within_the_drain_timeout(
    service: str, tmp_path: Path
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    env = service_env(service, dead, tmp_path, PODIUM_DRAIN_TIMEOUT_S="3")
    process = Process(service, env, tmp_path / "logs").start()
    try:
        # Up, and still trying to reach NATS.
        deadline = time.monotonic() + 30
        while True:
            assert process.proc is not None and process.proc.poll() is None, process.log()
            with contextlib.suppress(RuntimeError, aiohttp.ClientError):
                _, body = asyncio.run(process.readyz())
                if body["reason"] == "connecting to NATS":
                    break
            assert time.monotonic() < deadline, process.log()
            time.sleep(0.05)
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        code = process.wait(timeout_s=3)
        elapsed = time.monotonic() - started
    finally:
        process.stop(timeout_s=5)
    assert code == 0, process.log()
    assert elapsed < 3
    assert "stopped before NATS answered" in process.log()


async def test_sigterm_after_nats_went_away_stops_every_service_in_time(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    drain_s = 3.0
    platform = Platform(
        nats_server.url, tmp_path, env={"PODIUM_DRAIN_TIMEOUT_S": str(drain_s)}
    ).start()
    try:
        await platform.ready()
        nats_server.stop(kill=True)
        started = time.monotonic()
        for process in platform.processes.values():
            process.signal(signal.SIGTERM)
        codes = {
            name: await asyncio.to_thread(process.wait, drain_s + CLOSE_GRACE_S + 5)
            for name, process in platform.processes.items()
        }
        elapsed = time.monotonic() - started
    finally:
        platform.stop()
    assert codes == dict.fromkeys(platform.processes, 0), platform.logs()
    # Nothing was in flight and no service waits on requests a dead server cannot
    # answer: well within the drain timeout plus the close grace the code allows.
    assert elapsed < drain_s + 2, platform.logs()


async def test_a_service_whose_consumer_cannot_fetch_is_not_ready_and_says_why(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    # The stream exists, its consumer does not (provisioning was skipped).
    await ensure_stream(js, streams.COMMANDS)
    await ensure_stream(js, streams.DELIVERY)
    await js.add_consumer("DELIVERY", provision.consumer_config(streams.NOTIFIER_DELIVERY))
    await provision_buckets(js)
    settings = NotifierSettings(
        nats_url=nats_server.url,
        provision=False,
        outbox_path=str(tmp_path / "outbox.jsonl"),
        health_port=0,
    )
    service = NotifierService(settings)
    health = HealthServer(service, CollectorRegistry(), "127.0.0.1", 0)
    stop = asyncio.Event()
    task = asyncio.create_task(run(service, settings, stop=stop, signals=False, health=health))
    try:
        ready, reason = await until(health.readiness, lambda r: "cannot fetch" in r[1])
        assert not ready
        assert reason.startswith("consumer COMMANDS/notifier-commands cannot fetch: ")
        await js.add_consumer("COMMANDS", provision.consumer_config(streams.NOTIFIER_COMMANDS))
        ready, reason = await until(health.readiness, lambda r: r[0])
        assert reason == "email via outbox, SMS via outbox"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def provision_buckets(js: JetStreamContext) -> None:
    """Only the notifier's buckets (no streams or consumers besides)."""
    topology = streams.Topology(
        streams=(), consumers=(), buckets=(streams.OUTBOX, streams.SUPPRESSIONS, streams.REPLIES)
    )
    await provision.provision(js, topology)


async def until(
    probe: Callable[[], Awaitable[tuple[bool, str]]],
    good: Callable[[tuple[bool, str]], bool],
    timeout_s: float = 20.0,
) -> tuple[bool, str]:
    """Poll ``probe`` until ``good`` holds for its answer; that answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await probe()
        if good(answer):
            return answer
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.05)


async def test_a_partition_that_cannot_be_consumed_is_freed_and_the_replica_not_ready(
    js: JetStreamContext,
) -> None:
    store = await Store.open(js, streams.CONDUCTORS.name, Lease)
    broken = asyncio.Event()
    broken.set()
    started: list[int] = []

    async def start(partition: int) -> None:
        if broken.is_set():
            raise RuntimeError("consumer reset timed out")
        started.append(partition)

    async def stop(partition: int, urgent: bool) -> None:
        started.remove(partition)

    # Rounds every 3 s (a third of the TTL): the leases are read between two of them.
    manager = PartitionManager(store, replica="r1", partitions=4, ttl_s=9.0, start=start, stop=stop)
    assert manager.readiness() == (False, "balancing partitions")
    manager.start()
    try:
        ready, reason = await until(
            lambda: asyncio.sleep(0, manager.readiness()), lambda r: "failing" in r[1]
        )
        assert not ready
        # Every partition was tried, each failure named.
        assert reason == "partition rebalance failing: " + "; ".join(
            f"partition {p}: RuntimeError('consumer reset timed out')" for p in range(4)
        )
        # Not held by a replica that does not consume it.
        assert manager.owned == set()
        for partition in range(4):
            found = await store.get(f"partition.{partition}")
            assert found is not None and found[0].holder == ""
        broken.clear()
        ready, reason = await until(lambda: asyncio.sleep(0, manager.readiness()), lambda r: r[0])
        assert reason == "owns 4 of 4 partitions"
        assert sorted(started) == [0, 1, 2, 3]
    finally:
        await manager.close()


async def test_a_rejected_result_escalates_to_the_operator(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    platform = Platform(
        nats_server.url,
        tmp_path,
        per_service={"conductor": {"PODIUM_OPERATOR_EMAIL": "ops@example.com"}},
        services=("conductor", "notifier"),
    ).start()
    try:
        await platform.ready()
        conversation, task = f"api-{new_id()}", new_id()
        # A result for a conversation the conductor has no record of: no turn can take it.
        result = TaskResult(
            event_id=new_id(),
            correlation_id="c-1",
            conversation_id=conversation,
            task_id=task,
            status="COMPLETE",
            summary="Wrote the report",
        )
        await publish(js, subjects.result(conversation, task), result)
        (mail,) = await platform.wait_outbox(1)
    finally:
        platform.stop()
    assert mail["to"] == ["ops@example.com"]
    assert mail["subject"] == f"[Podium] escalation: a message was not handled ({conversation})"
    assert f"result for unknown conversation {conversation}" in mail["body"]
    assert f"task {task}'s COMPLETE result: Wrote the report" in mail["body"]
    # And it is kept for a replay.
    info = await js.stream_info(streams.DEADLETTER.name)
    assert info.state.messages == 1
    stored = await js.get_msg(streams.DEADLETTER.name, info.state.last_seq)
    letter = decode(stored.data or b"")
    assert isinstance(letter, DeadLetter)
    assert letter.consumer.startswith("conductor-results-p")


async def test_a_service_reconnects_after_nats_was_gone_longer_than_its_first_connect(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    # The first connection tries each server twice; after that a lost connection must
    # be retried for ever (bus.connect switches nats-py over once connected).
    process = Process("notifier", service_env("notifier", nats_server.url, tmp_path), tmp_path)
    process.start()
    try:
        await process.wait_ready()
        nats_server.stop()
        _, body = await until_readyz(process, lambda s, _: s == 503)
        assert body["reason"] == "NATS disconnected"
        # Down for several reconnect attempts (0.5 s apart), then back on the same port.
        await asyncio.sleep(3)
        nats_server.start()
        _, body = await until_readyz(process, lambda s, _: s == 200, timeout_s=30)
        assert body["reason"] == "email via outbox, SMS via outbox"
    finally:
        process.stop()


async def until_readyz(
    process: Process,
    good: Callable[[int, dict[str, object]], bool],
    timeout_s: float = 20.0,
) -> tuple[int, dict[str, object]]:
    """Poll the process's /readyz until ``good`` holds for its (status, body)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = await process.readyz()
        if good(status, body):
            return status, body
        assert time.monotonic() < deadline, (status, body, process.log()[-3000:])
        await asyncio.sleep(0.1)
