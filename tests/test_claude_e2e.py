"""The whole loop with the real Claude Code CLI, against a scripted Messages API server.

Services run through their real entry points with ``PODIUM_AGENT=claude``; the
fake API (``podium.testing.anthropic``) plays the model for the conductor and
the worker. The CLI really runs: it resumes sessions, and a scripted ``Write``
really writes the worker's file.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from podium.cli.natsserver import NatsServer
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from podium.testing.platform import Platform

pytestmark = [pytest.mark.claude, pytest.mark.e2e]

WORKER_ROLE = "You are a Podium worker agent"


def is_worker(call: MessagesCall) -> bool:
    """Whether the call is a worker's (by its role prompt)."""
    return WORKER_ROLE in call.system


def task_id_in(text: str) -> str:
    """The task id of a [WORKER:<id>] block."""
    match = re.search(r"\[WORKER:([A-Za-z0-9_-]+)\]", text)
    assert match, text
    return match.group(1)


def claude_platform(
    nats: NatsServer, root: Path, api: FakeAnthropic, claude_bin: str, **env: str
) -> Platform:
    """The four services with the real CLI pointed at ``api``."""
    return Platform(
        nats.url,
        root,
        env={
            "PODIUM_AGENT": "claude",
            "PODIUM_CLAUDE_BIN": claude_bin,
            "ANTHROPIC_BASE_URL": api.base_url,
            "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
            "PODIUM_AGENT_TIMEOUT_S": "60",
            **env,
        },
    ).start()


async def metric(platform: Platform, service: str, name: str) -> dict[str, float]:
    """A service's samples of ``name`` by their ``mode`` or ``state`` label (non-zero)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(await platform.metrics(service)):
        for sample in family.samples:
            if sample.name == name and sample.value:
                label = sample.labels.get("mode") or sample.labels.get("state", "")
                found[label] = found.get(label, 0) + sample.value
    return found


async def until_metric(
    platform: Platform, service: str, name: str, label: str, value: float
) -> None:
    """Wait until a service's ``name{mode|state=label}`` reads ``value``."""
    deadline = time.monotonic() + 30
    while (await metric(platform, service, name)).get(label) != value:
        assert time.monotonic() < deadline, f"{service}: {name}{{{label}}} never {value}"
        await asyncio.sleep(0.1)


async def test_full_loop_with_the_real_cli(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
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
        platform = claude_platform(nats_server, tmp_path, api, claude_bin)
        try:
            await platform.ready()
            # Each agent service has a spare started (a new conversation and a new task
            # will adopt one instead of waiting for a start-up).
            for service in ("conductor", "worker"):
                await until_metric(platform, service, "podium_agent_processes", "spare", 1)
            sent = await platform.send("Please create hello.txt with the word hello in it.")
            (reply,) = await platform.wait_outbox(1)
            adopted = {
                service: await metric(platform, service, "podium_agent_turn_seconds_count")
                for service in ("conductor", "worker")
            }
        finally:
            platform.stop()
    # The conversation's first turn and the task's ran on spares; the conductor's second
    # turn on the same process, warm.
    assert adopted == {"conductor": {"spare": 1, "warm": 1}, "worker": {"spare": 1}}
    assert reply["channel"] == "api"
    assert reply["conversation_id"] == sent["conversation_id"]
    assert reply["body"] == "Done: hello.txt contains hello."

    # The worker's scripted Write really ran, in the task's own directory.
    (written,) = (tmp_path / "workspaces").glob("tasks/*/hello.txt")
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
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
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
        platform = claude_platform(nats_server, tmp_path, api, claude_bin)
        try:
            await platform.ready()
            await platform.send("Pick a greeting for our newsletter.")
            (reply,) = await platform.wait_outbox(1)
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
