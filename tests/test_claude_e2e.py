"""The whole loop with the real Claude Code CLI, against a scripted Messages API server.

Services run through their real entry points with ``PODIUM_AGENT=claude``; the
fake API (``podium.testing.anthropic``) plays the model for the conductor and
the worker. The CLI really runs: it resumes sessions, and a scripted ``Write``
really writes the worker's file.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from podium.testing.services import Process, base_env

pytestmark = [pytest.mark.claude, pytest.mark.e2e]

TOKEN = "claude-e2e-token-0123456789"
SERVICES = ("ingress", "conductor", "worker", "notifier")
WORKER_ROLE = "You are a Podium worker agent"


def is_worker(call: MessagesCall) -> bool:
    return WORKER_ROLE in call.system


def task_id_in(text: str) -> str:
    match = re.search(r"\[WORKER:([A-Za-z0-9_-]+)\]", text)
    assert match, text
    return match.group(1)


class Platform:
    def __init__(self, nats: NatsServer, root: Path, api: FakeAnthropic, claude_bin: str):
        self.root = root
        self.processes: dict[str, Process] = {}
        for name in SERVICES:
            extra = {
                "PODIUM_AGENT": "claude",
                "PODIUM_CLAUDE_BIN": claude_bin,
                "ANTHROPIC_BASE_URL": api.base_url,
                "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
                "PODIUM_AGENT_TIMEOUT_S": "60",
            }
            if name == "ingress":
                extra |= {
                    "PODIUM_PORT": "0",
                    "PODIUM_HOST": "127.0.0.1",
                    "PODIUM_API_TOKENS": f"e2e:{TOKEN}",
                }
            self.processes[name] = Process(
                name, base_env(nats.url, root, **extra), root / "logs"
            ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.processes['ingress'].logged_port('ingress listening')}"

    async def ready(self) -> None:
        for p in self.processes.values():
            await p.wait_ready()

    def stop(self) -> None:
        for p in self.processes.values():
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log()[-5000:]}" for n, p in self.processes.items())

    async def send(self, text: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.url}/v1/messages",
                json={"text": text},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            assert resp.status == 202
            body: dict[str, Any] = await resp.json()
            return body

    async def reply(self, timeout_s: float = 60) -> dict[str, Any]:
        path = self.root / "outbox.jsonl"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                line: dict[str, Any] = json.loads(path.read_text().splitlines()[0])
                return line
            await asyncio.sleep(0.1)
        raise AssertionError("no reply in the outbox\n" + self.logs())


@pytest.fixture
def platform_root(tmp_path: Path) -> Path:
    return tmp_path / "platform"


async def test_full_loop_with_the_real_cli(
    nats_server: NatsServer, js: JetStreamContext, platform_root: Path, claude_bin: str
) -> None:
    def respond(call: MessagesCall) -> Reply:
        if is_worker(call):
            if call.tool_results:
                return Reply.text(
                    "Done.\n\nStatus: COMPLETE\nSummary: Wrote hello.txt\n"
                    "Details:\nhello.txt contains the word hello."
                )
            return Reply.write(f"{call.cwd}/hello.txt", "hello\n", text="Writing the file.")
        if "[WORKER:" in call.last_user_text:
            return Reply.text("The worker did it.\nREPLY: Done: hello.txt contains hello.")
        return Reply.text(
            "I will delegate this.\n\nSPAWN_WORKER: Create hello.txt containing the word hello"
        )

    async with FakeAnthropic(respond) as api:
        platform = Platform(nats_server, platform_root, api, claude_bin)
        try:
            await platform.ready()
            sent = await platform.send("Please create hello.txt with the word hello in it.")
            reply = await platform.reply()
        finally:
            platform.stop()
    assert reply["channel"] == "api"
    assert reply["conversation_id"] == sent["conversation_id"]
    assert reply["body"] == "Done: hello.txt contains hello."

    # The worker's scripted Write really ran, in the task's own directory.
    (written,) = (platform_root / "workspaces").glob("tasks/*/hello.txt")
    assert written.read_text() == "hello\n"

    # The conductor's second turn resumed its session: same session, full history.
    conductor = [c for c in api.main_calls if not is_worker(c)]
    assert len(conductor) == 2
    first, second = conductor
    assert "[API]" in first.last_user_text
    assert "[WORKER:" in second.last_user_text
    assert any("[API]" in text for text in second.all_user_texts)
    assert second.session_id == first.session_id
    # Each agent got its role prompt (--append-system-prompt).
    assert "You are the conductor of Podium" in first.system


async def test_worker_question_is_answered_and_the_same_session_resumes(
    nats_server: NatsServer, js: JetStreamContext, platform_root: Path, claude_bin: str
) -> None:
    def respond(call: MessagesCall) -> Reply:
        text = call.last_user_text
        if is_worker(call):
            if "Message from the conductor" in text:
                return Reply.text(
                    "Status: COMPLETE\nSummary: Greeting chosen\nDetails:\nI used: Good morning"
                )
            return Reply.text(
                "Status: NEEDS_INPUT\nSummary: Which greeting?\nDetails:\nFormal or casual?"
            )
        if "Status: NEEDS_INPUT" in text:
            return Reply.text(f"TELL_WORKER: {task_id_in(text)} | Formal, please.")
        if "[WORKER:" in text:
            return Reply.text("REPLY: Your greeting: Good morning")
        return Reply.text("SPAWN_WORKER: Pick a greeting for the newsletter")

    async with FakeAnthropic(respond) as api:
        platform = Platform(nats_server, platform_root, api, claude_bin)
        try:
            await platform.ready()
            await platform.send("Pick a greeting for our newsletter.")
            reply = await platform.reply()
        finally:
            platform.stop()
    assert reply["body"] == "Your greeting: Good morning"
    worker = [c for c in api.main_calls if is_worker(c)]
    assert len(worker) == 2
    question, resumed = worker
    # The follow-up resumed the worker's own session, in the same working directory.
    assert resumed.session_id == question.session_id
    assert resumed.cwd == question.cwd
    assert "Formal, please." in resumed.last_user_text
    assert any("<task>" in text for text in resumed.all_user_texts)
