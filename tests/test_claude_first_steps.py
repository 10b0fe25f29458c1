"""First steps and agent faults with the real Claude Code CLI (against a local Messages API).

- ``make up``'s path with only ``ANTHROPIC_API_KEY`` (and the local API's URL) set: the
  pinned CLI is found without ``PODIUM_CLAUDE_BIN`` and ``podium demo`` gets its reply.
- A CLI that disappears after start: a worker's task ends FAILED and the requester is
  told; a conductor's turn ends with the operator told. Nothing is stranded.
- Shell commands for workers: refused by default, allowed by name as docs/agents.md says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from podium.agents import AgentCall
from podium.agents.claude import ClaudeRuntime
from podium.cli.natsserver import NatsServer, free_port
from podium.common.config import load
from podium.common.kv import Store
from podium.conductor.partitions import Lease
from podium.contracts import streams
from podium.contracts.ids import conversation_id
from podium.contracts.state import Conversation, TaskRecord
from podium.contracts.subjects import partition_of
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply, ToolResult
from podium.testing.platform import Platform
from podium.testing.services import Process
from podium.worker.config import WorkerSettings
from tests.conftest import ROOT
from tests.test_claude_e2e import is_worker

pytestmark = [pytest.mark.claude, pytest.mark.e2e]


def pinned_version() -> str:
    """The CLI version tools/claude pins."""
    package = json.loads((ROOT / "tools" / "claude" / "package.json").read_text())
    return str(package["dependencies"]["@anthropic-ai/claude-code"])


def path_without_claude() -> str:
    """PATH with every directory that holds a ``claude`` left out."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "claude").exists())


def start(command: list[str], env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output going to ``output``."""
    with output.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """Wait until the file at ``path`` holds ``text`` (the process must keep running)."""
    deadline = time.monotonic() + timeout_s
    while text not in (output := path.read_text(errors="replace")):
        assert proc.poll() is None, output
        assert time.monotonic() < deadline, output
        time.sleep(0.1)
    return output


async def test_make_up_with_an_api_key_answers_the_demo_with_the_real_cli(
    tmp_path: Path, claude_bin: str
) -> None:
    def respond(call: MessagesCall) -> Reply:
        if "[EMAIL]" in call.last_user_text:
            return Reply.text("REPLY: Launch checklist:\n1. Freeze the code\n2. Tell support")
        return Reply.text("NO_ACTION: nothing to do")

    async with FakeAnthropic(respond) as api:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PODIUM_", "ANTHROPIC_"))}
        env.update(
            PATH=path_without_claude(),
            ANTHROPIC_API_KEY="sk-test-not-a-real-key",
            ANTHROPIC_BASE_URL=api.base_url,
            NATS_URL=f"nats://127.0.0.1:{free_port()}",
        )
        home = tmp_path / "home"
        output = tmp_path / "up.log"
        # Exactly `make up`'s command (scripts/dev.sh up), with ports of the test's own.
        command = [str(ROOT / "scripts" / "dev.sh"), "up", "--home", str(home)]
        up = start([*command, "--port", str(free_port()), "--health-base", "0"], env, output)
        try:
            text = await asyncio.to_thread(wait_for, output, "Podium is up.", up, 120)
            assert "Agent:     claude" in text
            pinned = str(ROOT / "tools" / "claude" / "node_modules" / ".bin" / "claude")
            assert f"agent: {pinned_version()} (Claude Code) at {pinned}" in text
            demo = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "podium.cli", "demo", "--timeout", "60"],
                env={**env, "PODIUM_HOME": str(home)},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            up.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(up.wait, 60)
    assert demo.returncode == 0, demo.stdout + demo.stderr + output.read_text()
    assert "  Launch checklist:\n  1. Freeze the code\n  2. Tell support" in demo.stdout
    # The real CLI asked the model, in the conductor's own working directory.
    (turn,) = [c for c in api.main_calls if "[EMAIL]" in c.last_user_text]
    assert "/workspaces/conversations/email-" in turn.cwd
    assert code == 0, output.read_text()


def claude_platform(
    nats: NatsServer,
    root: Path,
    api: FakeAnthropic,
    claude_bin: str,
    services: tuple[str, ...] = ("ingress", "conductor", "worker", "notifier"),
    **per_service: str,
) -> Platform:
    """The services with the real CLI (``PODIUM_<ROLE>_CLAUDE_BIN`` may point one role at
    its own copy of the CLI, which the test may take away).

    Without spares: a spare started before the CLI was taken away would still serve the
    first session (tests/test_spares.py); these tests are about starting one.
    """
    return Platform(
        nats.url,
        root,
        env={
            "PODIUM_AGENT_SPARES": "0",
            "PODIUM_AGENT": "claude",
            "PODIUM_CLAUDE_BIN": claude_bin,
            "ANTHROPIC_BASE_URL": api.base_url,
            "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
            "PODIUM_AGENT_TIMEOUT_S": "60",
            "PODIUM_OPERATOR_EMAIL": "ops@example.com",
            **per_service,
        },
        services=services,
    ).start()


def own_copy(claude_bin: str, folder: Path) -> Path:
    """A link to the CLI that the test can remove while the services run."""
    folder.mkdir(parents=True)
    link = folder / "claude"
    link.symlink_to(Path(claude_bin).resolve())
    return link


async def test_a_worker_cli_that_disappears_fails_the_task_and_the_requester_is_told(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
) -> None:
    def respond(call: MessagesCall) -> Reply:
        text = call.last_user_text
        if "Status: FAILED" in text:
            return Reply.text("REPLY: Sorry, I could not get that done; a person will look.")
        if "[API]" in text:
            return Reply.text("SPAWN_WORKER: Write the report")
        return Reply.text("NO_ACTION: nothing to do")

    link = own_copy(claude_bin, tmp_path / "worker-cli")
    async with FakeAnthropic(respond) as api:
        platform = claude_platform(
            nats_server, tmp_path, api, claude_bin, PODIUM_WORKER_CLAUDE_BIN=str(link)
        )
        try:
            await platform.ready()
            link.unlink()
            sent = await platform.send("Please write the quarterly report.")
            (reply,) = await platform.wait_outbox(1, timeout_s=90)
            status, ready = await platform.processes["worker"].readyz()
        finally:
            platform.stop()
    assert reply["conversation_id"] == sent["conversation_id"]
    assert reply["body"] == "Sorry, I could not get that done; a person will look."
    # The conductor was told why, in the worker's block.
    (judged,) = [c for c in api.main_calls if "Status: FAILED" in c.last_user_text]
    assert "the task could not be run and was given up" in judged.last_user_text
    assert f"cannot be started: PODIUM_CLAUDE_BIN (or PODIUM_WORKER_CLAUDE_BIN)='{link}'" in (
        judged.last_user_text
    )
    assert not [c for c in api.main_calls if is_worker(c)]
    # The worker says it is not ready, and why.
    assert status == 503
    assert f"'{link}': No such file or directory" in ready["reason"]
    # The task is over, not "running" for ever.
    tasks = await Store.open(js, streams.TASK_STATE.name, TaskRecord)
    (key,) = await tasks.kv.keys()
    found = await tasks.get(key)
    assert found is not None and found[0].state == "failed"


async def test_a_conductor_cli_that_disappears_tells_the_operator(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
) -> None:
    link = own_copy(claude_bin, tmp_path / "conductor-cli")
    async with FakeAnthropic(lambda _: Reply.text("NO_ACTION: nothing")) as api:
        platform = claude_platform(
            nats_server,
            tmp_path,
            api,
            claude_bin,
            PODIUM_CONDUCTOR_CLAUDE_BIN=str(link),
            PODIUM_TURN_RETRY_DELAY_S="0.05",
        )
        try:
            await platform.ready()
            link.unlink()
            sent = await platform.send("Please write the quarterly report.")
            (mail,) = await platform.wait_outbox(1, timeout_s=90)
            status, ready = await platform.processes["conductor"].readyz()
        finally:
            platform.stop()
    assert mail["to"] == ["ops@example.com"]
    assert mail["conversation_id"] == sent["conversation_id"]
    assert mail["subject"] == (
        f"[Podium] escalation: a message was not handled ({sent['conversation_id']})"
    )
    assert "gave up: the conductor agent failed (cannot_start)" in mail["body"]
    assert "Please write the quarterly report." in mail["body"]
    assert "podium replay deadletter" in mail["body"]
    assert api.main_calls == []
    assert status == 503
    assert f"'{link}': No such file or directory" in ready["reason"]


async def shell_result(
    tmp_path: Path,
    command: str,
    env: dict[str, str],
    claude_bin: str,
    monkeypatch: pytest.MonkeyPatch,
) -> ToolResult:
    """What the worker's CLI answers when the model runs ``command`` with the Bash tool."""
    results: list[ToolResult] = []

    def respond(call: MessagesCall) -> Reply:
        if call.tool_results:
            results.extend(call.tool_results)
            return Reply.text("Status: COMPLETE\nSummary: ran it\nDetails:\n-")
        return Reply.tool("Bash", {"command": command, "description": "run it"})

    async with FakeAnthropic(respond) as api:
        # Read as the worker service reads its settings (PODIUM_WORKER_* included).
        settings = load(
            WorkerSettings,
            {
                "PODIUM_CLAUDE_BIN": claude_bin,
                "PODIUM_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
                **env,
            },
        )
        monkeypatch.setenv("ANTHROPIC_BASE_URL", api.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
        runtime = ClaudeRuntime(settings, tmp_path / "config")
        try:
            answer = await runtime.run(
                AgentCall(
                    role="worker",
                    key="t1",
                    prompt="Run it.",
                    workdir=tmp_path / "workspaces" / "tasks" / "t1",
                    timeout_s=60,
                )
            )
        finally:
            await runtime.close()
    assert answer.ok, answer.error
    (result,) = results
    return result


async def test_workers_run_shell_commands_only_where_allowed(
    tmp_path: Path, claude_bin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(folder: str, command: str, env: dict[str, str]) -> Awaitable[ToolResult]:
        return shell_result(tmp_path / folder, command, env, claude_bin, monkeypatch)

    python = "python3 -c 'print(6 * 7)'"
    # The default (acceptEdits) refuses a shell command: nobody is there to approve it.
    refused = await run("a", python, {})
    assert refused.is_error
    assert "requires approval" in refused.text
    # The documented way: allow it by name for workers.
    allowed_env = {"PODIUM_WORKER_CLAUDE_ALLOWED_TOOLS": "Bash(python3:*),Bash(git status)"}
    allowed = await run("b", python, allowed_env)
    assert (allowed.text, allowed.is_error) == ("42", False)
    # Other commands are still refused.
    other = await run("c", "curl -s http://127.0.0.1:9/", allowed_env)
    assert other.is_error
    assert "requires approval" in other.text
    # And an allowed interpreter is not confined: what docs/agents.md warns of.
    outside = tmp_path / "outside.txt"
    escape = f'python3 -c \'open("{outside}", "w").write("x")\''
    ran = await run("d", escape, allowed_env)
    assert not ran.is_error
    assert outside.read_text() == "x"


def done_by_worker(call: MessagesCall) -> Reply:
    """The model for a loop where the worker completes and the conductor replies."""
    text = call.last_user_text
    if is_worker(call):
        return Reply.text("Status: COMPLETE\nSummary: Report written\nDetails:\nThree pages.")
    if "Status: COMPLETE" in text:
        return Reply.text("REPLY: Done: the report is written.")
    if "[API]" in text:
        return Reply.text("SPAWN_WORKER: Write the report")
    return Reply.text("NO_ACTION: nothing to do")


async def test_a_worker_that_cannot_run_its_cli_leaves_tasks_to_a_healthy_one(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
) -> None:
    link = own_copy(claude_bin, tmp_path / "broken-cli")
    async with FakeAnthropic(done_by_worker) as api:
        platform = claude_platform(
            nats_server, tmp_path, api, claude_bin, services=("ingress", "conductor", "notifier")
        )
        try:
            broken = platform.add("worker", name="broken", PODIUM_WORKER_CLAUDE_BIN=str(link))
            await platform.ready()
            link.unlink()
            await platform.send("Please write the report.")
            # The only worker takes the task and finds it cannot run its CLI.
            _, ready = await until_not_ready(broken)
            assert f"'{link}': No such file or directory" in ready["reason"]
            # A healthy worker joins: the task is given back to it, not failed.
            await platform.add("worker").wait_ready()
            (reply,) = await platform.wait_outbox(1, timeout_s=120)
        finally:
            platform.stop()
    assert reply["body"] == "Done: the report is written."
    assert not [c for c in api.main_calls if "Status: FAILED" in c.last_user_text]
    assert len([c for c in api.main_calls if is_worker(c)]) == 1


async def until_not_ready(process: Process, timeout_s: float = 60.0) -> tuple[int, dict[str, Any]]:
    """Wait until the process's /readyz says 503; (status, body)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = await process.readyz()
        if status == 503:
            return status, body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


def owner_pid(holder: str) -> int:
    """The pid in a replica id (``<host>-<pid>-<nonce>``)."""
    return int(holder.rsplit("-", 2)[1])


async def test_a_conductor_that_cannot_run_its_cli_steps_aside_for_a_healthy_one(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
) -> None:
    link = own_copy(claude_bin, tmp_path / "broken-cli")
    async with FakeAnthropic(done_by_worker) as api:
        platform = claude_platform(nats_server, tmp_path, api, claude_bin)
        try:
            broken = platform.add(
                "conductor", name="broken-conductor", PODIUM_CONDUCTOR_CLAUDE_BIN=str(link)
            )
            await platform.ready()
            # A conversation whose partition the broken replica holds (by its lease).
            leases = await Store.open(js, streams.CONDUCTORS.name, Lease)
            assert broken.proc is not None
            thread = await thread_owned_by(leases, broken.proc.pid)
            link.unlink()
            sent = await platform.send("Please write the report.", thread_id=thread)
            (reply,) = await platform.wait_outbox(1, timeout_s=120)
            status, ready = await broken.readyz()
        finally:
            platform.stop()
    # Answered by the healthy replica: no escalation, no dead letter.
    assert reply["conversation_id"] == sent["conversation_id"]
    assert reply["body"] == "Done: the report is written."
    assert status == 503
    assert ready["reason"].startswith("standing aside for the other replicas: ")
    assert f"'{link}': No such file or directory" in ready["reason"]
    info = await js.stream_info(streams.DEADLETTER.name)
    assert info.state.messages == 0


async def thread_owned_by(leases: Store[Lease], pid: int) -> str:
    """An API thread id whose conversation's partition the replica with ``pid`` holds."""
    held = set()
    for partition in range(streams.PARTITIONS):
        found = await leases.get(f"partition.{partition}")
        if found is not None and found[0].holder and owner_pid(found[0].holder) == pid:
            held.add(partition)
    assert held, "the replica holds no partition"
    for n in range(1000):
        thread = f"thread-{n}"
        if partition_of(conversation_id("api", "test", thread), streams.PARTITIONS) in held:
            return thread
    raise AssertionError("no thread maps to the replica's partitions")


async def test_a_worker_result_no_conductor_turn_can_judge_still_ends_its_task(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, claude_bin: str
) -> None:
    def respond(call: MessagesCall) -> Reply:
        text = call.last_user_text
        if is_worker(call):
            return Reply.text("Status: COMPLETE\nSummary: Report written\nDetails:\nThree pages.")
        if "[WORKER:" in text:
            # The model fails every time it is asked to judge the result.
            return Reply.http_error(500, should_retry=False)
        return Reply.text("SPAWN_WORKER: Write the report")

    async with FakeAnthropic(respond) as api:
        platform = claude_platform(
            nats_server,
            tmp_path,
            api,
            claude_bin,
            PODIUM_TURN_RETRY_DELAY_S="0.05",
            PODIUM_CLAUDE_MAX_RETRIES="0",
        )
        try:
            await platform.ready()
            sent = await platform.send("Please write the report.")
            (mail,) = await platform.wait_outbox(1, timeout_s=120)
        finally:
            platform.stop()
    assert mail["to"] == ["ops@example.com"]
    assert "task " in mail["body"] and "COMPLETE result: Report written" in mail["body"]
    # The task is over in the conversation's record: it holds no slot for ever.
    conversations = await Store.open(js, streams.CONVERSATIONS.name, Conversation)
    found = await conversations.get(sent["conversation_id"])
    assert found is not None
    conv = found[0]
    (task,) = conv.tasks.values()
    assert task.state == "complete"
    assert len(conv.accounted) == 1
    assert not set(conv.accounted) & set(conv.handled)
