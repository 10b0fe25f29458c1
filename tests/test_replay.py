"""Replay is safe, end to end: real service processes, least-privileged NATS users, the real CLI.

Re-publishing an inbound event that was already answered, re-publishing a
command that was already sent, and rewinding the notifier's consumer to the
start send nothing twice; a dead letter replayed after its cause is fixed is
handled once, and replaying it again does nothing more. The server's log shows
no permission violation through all of it: the users of deploy/nats/accounts.conf
are enough to run the platform.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.cli.replay import original_subject
from podium.common.bus import publish
from podium.contracts import access, events, streams, subjects
from podium.testing.bus import quiescent
from podium.testing.platform import SERVICES, Platform
from podium.testing.services import base_env
from tests.conftest import user_env

pytestmark = pytest.mark.e2e


class SecurePlatform(Platform):
    """The four services as processes, each connected as its own NATS user."""

    def __init__(self, nats: NatsServer, root: Path) -> None:
        super().__init__(
            nats.url,
            root,
            env={"PODIUM_PROVISION": "false"},
            per_service={name: user_env(name) for name in SERVICES},
        )
        self.nats = nats

    async def metric(self, service: str, name: str) -> float:
        """The sum of a metric's samples on ``service``'s /metrics."""
        text = await self.metrics(service)
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + "{", name + " "))
        )

    def violations(self) -> list[str]:
        log = self.nats.log_file.read_text(errors="replace")
        return [line for line in log.splitlines() if "Violation" in line]


@pytest.fixture
async def platform(
    secure_nats: NatsServer, admin_js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[SecurePlatform]:
    platform = SecurePlatform(secure_nats, tmp_path / "platform")
    platform.start()
    try:
        await platform.ready()
        yield platform
    finally:
        platform.stop()


async def podium_cli(nats: NatsServer, *args: str) -> str:
    """Run the real ``podium`` command as the admin user; its output."""
    env = base_env(nats.url, Path("/nonexistent"), **user_env(access.ADMIN))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "podium.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


async def eventually(check: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert callable(check)
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_replaying_handled_events_sends_nothing_twice(
    platform: SecurePlatform, admin_js: JetStreamContext
) -> None:
    sent = await platform.send("Count the words in this request, please.")
    (reply,) = await platform.wait_outbox(1)
    assert reply["conversation_id"] == sent["conversation_id"]
    tasks_before = (await admin_js.stream_info("TASKS")).state.messages
    commands = (await admin_js.stream_info("COMMANDS")).state
    assert commands.messages == 1

    # 1. The inbound event again: the conductor has handled its id, so no new turn.
    out = await podium_cli(platform.nats, "replay", "stream", "INBOUND", "1")
    assert "replayed 1 of 1" in out, out
    # 2. The command again: the notifier's outbox shows it sent.
    out = await podium_cli(platform.nats, "replay", "stream", "COMMANDS", str(commands.last_seq))
    assert "replayed 1 of 1" in out, out
    # 3. The notifier's consumer rewound to the start: both commands come again.
    out = await podium_cli(platform.nats, "replay", "reset", "COMMANDS", "notifier-*", "--seq", "1")
    assert "notifier-commands: next delivery at stream sequence >= 1" in out, out

    async def conductor_skipped() -> bool:
        return await platform.metric("conductor", "podium_conductor_duplicates_total") >= 1

    async def notifier_skipped_all() -> bool:
        # The replayed copy, then after the reset the original and the copy again.
        dupes = await platform.metric("notifier", "podium_notifier_duplicates_total")
        return dupes >= 3

    await eventually(conductor_skipped, "the conductor to skip the replayed inbound event")
    await eventually(notifier_skipped_all, "the notifier to skip every replayed command")
    # Every consumer settled: anything that would be sent twice has been by now.
    await quiescent(admin_js)
    assert len(await platform.wait_outbox(1)) == 1
    assert (await admin_js.stream_info("TASKS")).state.messages == tasks_before
    # Only the replayed copy was added: the conductor published no new command.
    assert (await admin_js.stream_info("COMMANDS")).state.messages == 2
    assert platform.violations() == []


async def test_a_dead_letter_is_replayed_once(
    platform: SecurePlatform, admin_js: JetStreamContext
) -> None:
    # A message that was dead-lettered (say, while a bug was deployed), fixed since.
    inbound = events.InboundMessage(
        event_id="evt-dead-1",
        correlation_id="evt-dead-1",
        conversation_id="api-deadletter-1",
        channel="api",
        sender="e2e",
        text="Please count these five words.",
        client="e2e",
        thread_id="thread-dead-1",
    )
    partition = subjects.partition_of(inbound.conversation_id, streams.PARTITIONS)
    stored = f"{subjects.inbound('api', inbound.conversation_id)}.{partition}"
    letter = events.DeadLetter(
        event_id="dl-1",
        correlation_id=inbound.correlation_id,
        conversation_id="",
        service="conductor",
        stream="INBOUND",
        consumer=f"conductor-inbound-p{partition}",
        subject=stored,
        stream_seq=41,
        deliveries=10,
        reason="gave up: a bug, since fixed",
        headers={subjects.HDR_MSG_ID: inbound.event_id, subjects.HDR_EVENT_TYPE: "inbound.message"},
        payload=events.encode(inbound).decode(),
    )
    await publish(admin_js, subjects.dead_letter("conductor", "INBOUND"), letter)

    listing = await podium_cli(platform.nats, "replay", "deadletter", "--list")
    assert re.search(r"^1\s+conductor\s+INBOUND:41\s+" + re.escape(stored), listing, re.M)
    out = await podium_cli(platform.nats, "replay", "deadletter", "1")
    assert f"-> {subjects.inbound('api', inbound.conversation_id)} " in out
    (reply,) = await platform.wait_outbox(1)
    assert reply["conversation_id"] == inbound.conversation_id
    assert reply["correlation_id"] == inbound.event_id

    # Replaying it a second time: stored again, handled never again.
    before = await platform.metric("conductor", "podium_conductor_duplicates_total")
    await podium_cli(platform.nats, "replay", "deadletter", "--all")

    async def skipped() -> bool:
        return await platform.metric("conductor", "podium_conductor_duplicates_total") > before

    await eventually(skipped, "the conductor to skip the second replay")
    await quiescent(admin_js)
    assert len(await platform.wait_outbox(1)) == 1
    assert platform.violations() == []


def test_replays_are_published_without_the_partition_token() -> None:
    assert original_subject("INBOUND", "inbound.api.c1.7") == "inbound.api.c1"
    assert original_subject("RESULTS", "results.c1.t1.3") == "results.c1.t1"
    assert original_subject("INBOUND", "inbound.api.c1") == "inbound.api.c1"
    assert original_subject("TASKS", "tasks.t1.followup") == "tasks.t1.followup"
    assert original_subject("COMMANDS", "commands.email.c1") == "commands.email.c1"


def test_replay_headers_keep_the_event_and_change_the_msg_id() -> None:
    from podium.cli.replay import HDR_REPLAY_OF, replay_headers  # noqa: PLC0415

    original = {"Nats-Msg-Id": "evt-1", "Podium-Event": "inbound.message", "Nats-Stream": "X"}
    headers = replay_headers(original, "INBOUND:3", "evt-1")
    assert headers["Podium-Event"] == "inbound.message"
    assert headers[HDR_REPLAY_OF] == "INBOUND:3"
    assert headers["Nats-Msg-Id"] != "evt-1"
    assert headers["Nats-Msg-Id"].endswith("-evt-1")
    assert "Nats-Stream" not in headers
    assert json.dumps(headers)  # plain strings only
