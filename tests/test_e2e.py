"""The whole loop through the real entry points (python -m podium.<service>), offline agent.

API or email in → ingress → conductor → worker → result → conductor → reply in the outbox.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.events import DeadLetter, decode
from podium.testing.platform import Platform as ProcessPlatform
from podium.testing.services import Process, base_env

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-0123456789abcdef"
SERVICES = ("ingress", "conductor", "worker", "notifier")


@dataclass
class Platform:
    """Four service processes against one nats-server."""

    processes: dict[str, Process]
    root: Path

    @property
    def outbox(self) -> Path:
        return self.root / "outbox.jsonl"

    @property
    def url(self) -> str:
        port = self.processes["ingress"].logged_port("ingress listening")
        return f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log()[-4000:]}" for n, p in self.processes.items())


def start_platform(nats: NatsServer, root: Path, **env: str) -> Platform:
    processes = {}
    for name in SERVICES:
        extra = dict(env)
        if name == "ingress":
            extra.update(PODIUM_PORT="0", PODIUM_HOST="127.0.0.1", PODIUM_API_TOKENS=f"e2e:{TOKEN}")
        processes[name] = Process(name, base_env(nats.url, root, **extra), root / "logs").start()
    return Platform(processes, root)


@pytest.fixture
def platform_root(tmp_path: Path) -> Path:
    return tmp_path / "platform"


@pytest.fixture
async def platform(
    nats_server: NatsServer, js: JetStreamContext, platform_root: Path
) -> AsyncIterator[Platform]:
    platform = start_platform(nats_server, platform_root)
    try:
        for process in platform.processes.values():
            await process.wait_ready()
        yield platform
    finally:
        for process in platform.processes.values():
            process.stop()


async def outbox_lines(path: Path, expect: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            found = [json.loads(line) for line in path.read_text().splitlines()]
            if len(found) >= expect:
                return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"outbox has fewer than {expect} lines")


async def post_api(url: str, text: str, **extra: Any) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/messages",
            json={"text": text, **extra},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        assert resp.status == 202, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_api_message_travels_the_whole_loop(platform: Platform, platform_root: Path) -> None:
    sent = await post_api(platform.url, "Count the words in this request, please.")
    try:
        (reply,) = await outbox_lines(platform.outbox, 1)
    except AssertionError:
        pytest.fail(platform.logs())
    assert reply["channel"] == "api"
    assert reply["conversation_id"] == sent["conversation_id"]
    assert reply["correlation_id"] == sent["event_id"]
    assert "Words in the request: 7" in reply["body"]
    # The worker really ran in its own working directory and wrote its result there.
    (result,) = (platform_root / "workspaces").glob("tasks/*/result.md")
    assert "Count the words in this request" in result.read_text()

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{platform.url}/v1/conversations/{sent['conversation_id']}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        state = await resp.json()
    assert [t["state"] for t in state["tasks"]] == ["complete"]
    assert [r["delivery"] for r in state["replies"]] == ["sent"]
    assert state["turns"] == 2


async def test_email_reply_is_threaded(platform: Platform) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in {
        "from": "Grace <grace@example.org>",
        "to": "podium@example.com",
        "subject": "Numbers",
        "text": "Please compile the numbers.",
        "headers": "Message-ID: <q3@example.org>\nSubject: Numbers\n",
    }.items():
        form.add_field(name, value)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{platform.url}/webhooks/sendgrid/inbound", data=form) as resp,
    ):
        assert resp.status == 200
    (reply,) = await outbox_lines(platform.outbox, 1)
    assert reply["channel"] == "email"
    assert reply["to"] == ["grace@example.org"]
    assert reply["subject"] == "Re: Numbers"
    assert reply["headers"]["In-Reply-To"] == "<q3@example.org>"
    assert reply["headers"]["Auto-Submitted"] == "auto-replied"


async def test_poison_inbound_event_is_dead_lettered_and_the_conductor_keeps_serving(
    platform: Platform, js: JetStreamContext
) -> None:
    await js.publish("inbound.api.api-poison", b"{not json", headers={"Nats-Msg-Id": "poison-1"})
    await post_api(platform.url, "Still there?")
    (reply,) = await outbox_lines(platform.outbox, 1)
    assert reply["channel"] == "api"
    msg = await js.get_msg("DEADLETTER", 1)
    assert msg.data is not None
    letter = decode(msg.data)
    assert isinstance(letter, DeadLetter)
    assert (letter.service, letter.stream) == ("conductor", "INBOUND")
    # Stored with its partition token appended by the stream.
    assert letter.subject.startswith("inbound.api.api-poison.")
    assert letter.payload == "{not json"


async def test_sigterm_mid_task_loses_nothing(
    nats_server: NatsServer, js: JetStreamContext, platform_root: Path
) -> None:
    # A worker whose agent takes 30 s, with a 1 s drain: SIGTERM lands mid-task.
    slow_worker_env = {"PODIUM_OFFLINE_DELAY_S": "30", "PODIUM_DRAIN_TIMEOUT_S": "1"}
    processes = {
        name: Process(
            name,
            base_env(
                nats_server.url,
                platform_root,
                **(
                    {
                        "PODIUM_PORT": "0",
                        "PODIUM_HOST": "127.0.0.1",
                        "PODIUM_API_TOKENS": f"e2e:{TOKEN}",
                    }
                    if name == "ingress"
                    else {}
                ),
                **(slow_worker_env if name == "worker" else {}),
            ),
            platform_root / "logs",
        ).start()
        for name in SERVICES
    }
    platform = Platform(processes, platform_root)
    try:
        for process in processes.values():
            await process.wait_ready()
        await post_api(platform.url, "A long job")
        worker = processes["worker"]
        deadline = time.monotonic() + 20
        while "task started" not in worker.log():
            assert time.monotonic() < deadline, platform.logs()
            await asyncio.sleep(0.05)
        stopped_at = time.monotonic()
        assert worker.stop(timeout_s=15) == 0
        assert time.monotonic() - stopped_at < 8  # drain (1 s) + kill + NATS drain
        assert "task result published" not in worker.log()
        assert not platform.outbox.exists()

        # A fresh worker picks the task up again and the loop completes.
        replacement = Process(
            "worker", base_env(nats_server.url, platform_root), platform_root / "logs2"
        ).start()
        processes["worker-2"] = replacement
        (reply,) = await outbox_lines(platform.outbox, 1, timeout_s=30)
        assert reply["channel"] == "api"
        assert "task started" in replacement.log()
    finally:
        for process in processes.values():
            process.stop()


async def test_sigterm_lets_a_short_task_finish(
    nats_server: NatsServer, js: JetStreamContext, platform_root: Path
) -> None:
    processes = {}
    for name in SERVICES:
        extra: dict[str, str] = {}
        if name == "ingress":
            extra = {
                "PODIUM_PORT": "0",
                "PODIUM_HOST": "127.0.0.1",
                "PODIUM_API_TOKENS": f"e2e:{TOKEN}",
            }
        if name == "worker":
            extra = {"PODIUM_OFFLINE_DELAY_S": "2", "PODIUM_DRAIN_TIMEOUT_S": "20"}
        processes[name] = Process(
            name, base_env(nats_server.url, platform_root, **extra), platform_root / "logs"
        ).start()
    platform = Platform(processes, platform_root)
    try:
        for process in processes.values():
            await process.wait_ready()
        await post_api(platform.url, "A short job")
        worker = processes["worker"]
        while "task started" not in worker.log():
            await asyncio.sleep(0.05)
        assert worker.stop(timeout_s=25) == 0
        # The worker finished the task before it exited.
        assert "task result published" in worker.log()
        (reply,) = await outbox_lines(platform.outbox, 1)
        assert reply["channel"] == "api"
    finally:
        for process in processes.values():
            process.stop()


@pytest.mark.parametrize("mode", ["refuse", "ignore"])
async def test_senders_outside_the_allowlist_get_no_agent(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, mode: str
) -> None:
    platform = ProcessPlatform(
        nats_server.url,
        tmp_path,
        per_service={
            "conductor": {
                "PODIUM_SENDER_ALLOWLIST": "@example.org, +15550100001",
                "PODIUM_UNKNOWN_SENDERS": mode,
            }
        },
    ).start()
    try:
        await platform.ready()
        await platform.email(
            "Mallory <mallory@evil.example>", "Hi", "Do work.", message_id="<m1@x>"
        )
        await platform.email(
            "Mallory <mallory@evil.example>", "Re: Hi", "Please?", message_id="<m2@x>",
            headers="In-Reply-To: <m1@x>\nReferences: <m1@x>\n",
        )  # fmt: skip
        await platform.email("Grace <grace@example.org>", "Numbers", "Count.", message_id="<g1@x>")
        replies = await platform.wait_outbox(2 if mode == "refuse" else 1)
        await asyncio.sleep(1)
        replies = platform.outbox()
        metrics = await platform.metrics("conductor")
    finally:
        platform.stop()
    by_recipient = {tuple(r["to"]): r for r in replies}
    assert set(by_recipient) == (
        {("mallory@evil.example",), ("grace@example.org",)}
        if mode == "refuse"
        else {("grace@example.org",)}
    )
    if mode == "refuse":
        refusal = by_recipient[("mallory@evil.example",)]
        assert "only takes requests from registered senders" in refusal["body"]
        assert refusal["headers"]["Auto-Submitted"] == "auto-replied"
    # Mallory's two messages never reached an agent: one task only, Grace's.
    assert (await js.stream_info("TASKS")).state.messages == 1
    assert (
        'podium_policy_blocked_total{action="inbound",reason="sender not allowed"} 2.0' in metrics
    )
