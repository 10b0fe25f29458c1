"""Warm spares with the real Claude Code CLI: a new session adopts a process started
ahead, and its session lives on as any other (warm, cold, on another replica, after a
restart); a spare whose process died is never handed out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.agents import AgentCall, Role
from podium.agents.claude import SPARE_PREFIX, ClaudeRuntime, project_dir_name
from podium.agents.sessions import Agents
from podium.common.config import AgentSettings
from podium.common.metrics import Metrics
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply

pytestmark = pytest.mark.claude

ROLE_PROMPT = "You are a test agent."


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    def echo(c: MessagesCall) -> Reply:
        return Reply.text(f"turn {len(c.all_user_texts)}: {c.last_user_text}")

    async with FakeAnthropic(echo) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        yield server


def agent_settings(claude_bin: str, tmp_path: Path, **extra: Any) -> AgentSettings:
    return AgentSettings(
        claude_bin=claude_bin,
        workspace_root=str(tmp_path / "workspaces"),
        claude_max_retries=0,
        **({"agent_spares": 1, "agent_pool_size": 4} | extra),
    )


def replica(
    claude_bin: str,
    tmp_path: Path,
    js: JetStreamContext | None,
    name: str,
    role: Role = "worker",
) -> Agents:
    """A replica: its own config dir, the shared workspace path (and bus)."""
    settings = agent_settings(claude_bin, tmp_path)
    runtime = ClaudeRuntime(settings, tmp_path / f"replica-{name}")
    return Agents(
        runtime, role=role, settings=settings,
        metrics=Metrics(CollectorRegistry(), name), js=js, replica=name,
    )  # fmt: skip


def task(agents: Agents, key: str, prompt: str, session: str | None) -> AgentCall:
    return AgentCall(
        role=agents.role,
        key=key,
        prompt=prompt,
        workdir=agents.workdir(key),
        session_id=session,
        system_prompt=ROLE_PROMPT,
        timeout_s=60.0,
    )


async def until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def runtime_of(agents: Agents) -> ClaudeRuntime:
    assert isinstance(agents.runtime, ClaudeRuntime)
    return agents.runtime


async def spare_ready(agents: Agents) -> str:
    """Ask for spares and wait for one: its session id."""
    agents.keep_spares(ROLE_PROMPT)
    runtime = runtime_of(agents)
    await until(lambda: bool(runtime.spares), "a spare")
    return runtime.spares[0].warm.session_id


@pytest.mark.parametrize("role", ["worker", "conductor"])
async def test_a_new_task_or_conversation_adopts_a_spare_and_its_session_lives_on(
    api: FakeAnthropic,
    claude_bin: str,
    tmp_path: Path,
    js: JetStreamContext,
    role: Role,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = replica(claude_bin, tmp_path, js, "a", role)
    await a.start()
    try:
        spare_session = await spare_ready(a)
        spare_dir = runtime_of(a).spares[0].workdir
        # What the worker put in the task's directory before the turn (its inputs).
        inputs = a.workdir("t1") / "inputs"
        inputs.mkdir(parents=True)
        (inputs / "brief.txt").write_text("the brief")
        first = await a.run(task(a, "t1", "remember the word TULIP", None))
        assert first.ok, first.error
        assert (first.mode, first.session_id) == ("spare", spare_session)
        # The spare's directory is the task's now, with what the task had in it.
        assert a.workdir("t1").is_dir() and not a.workdir("t1").is_symlink()
        assert (a.workdir("t1") / "inputs" / "brief.txt").read_text() == "the brief"
        assert spare_dir.is_symlink()
        # Its transcript is looked for where the process files it (by the spare's name,
        # or the task's if the CLI read its directory after the rename), so storing the
        # session waits for the turn's line there, not for a timeout.
        call = task(a, "t1", "", spare_session)
        await a.settled("t1")
        path = runtime_of(a).transcript_path(call, spare_session)
        assert path.parent.name in (project_dir_name(spare_dir), project_dir_name(call.workdir))
        assert "TULIP" in path.read_text()
        assert "transcript not flushed in time" not in caplog.text
        (a.workdir("t1") / "notes.txt").write_text("made on a")
        second = await a.run(task(a, "t1", "second turn", first.session_id))
        assert (second.ok, second.mode, second.session_id) == (True, "warm", spare_session)
        # A replacement spare was started for the next new task.
        await until(lambda: bool(runtime_of(a).spares), "a replacement spare")
        assert runtime_of(a).spares[0].warm.session_id != spare_session

    finally:
        await a.close()
    # Spares cleaned up: their directories, links and logs.
    assert not list(a.workdir("t1").parent.glob(f"{SPARE_PREFIX}*"))
    assert not list((tmp_path / "replica-a").rglob(f"{SPARE_PREFIX}*"))

    # After a restart (a new runtime over the same directories; the transcript is still
    # filed under the spare's directory name): resumed.
    again = replica(claude_bin, tmp_path, js, "a", role)
    await again.start()
    try:
        third = await again.run(task(again, "t1", "after a restart", first.session_id))
        assert (third.ok, third.mode) == (True, "cold"), third.error
        # Cold on the same replica: the process gone, the session resumes again.
        await again.runtime.forget("t1")
        fourth = await again.run(task(again, "t1", "cold again", first.session_id))
        assert (fourth.ok, fourth.mode) == (True, "cold"), fourth.error
    finally:
        await again.close()
    assert api.main_calls[-1].all_user_texts == [
        "remember the word TULIP",
        "second turn",
        "after a restart",
        "cold again",
    ]

    # On another replica that has never seen it (its own config dir, the workspace gone
    # from this disk): restored from the bus, history and files.
    (a.workdir("t1") / "notes.txt").unlink()
    b = replica(claude_bin, tmp_path, js, "b", role)
    await b.start()
    try:
        fifth = await b.run(task(b, "t1", "which word?", first.session_id))
    finally:
        await b.close()
    assert fifth.ok, fifth.error
    assert api.main_calls[-1].all_user_texts == [
        "remember the word TULIP",
        "second turn",
        "after a restart",
        "cold again",
        "which word?",
    ]
    if role == "worker":  # (a conductor has no tools: its directory is not carried)
        assert (b.workdir("t1") / "notes.txt").read_text() == "made on a"


async def test_stale_spares_are_cleaned_up_but_a_live_services_are_not(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path
) -> None:
    # Left by a service that died (a pid no process has), and by one that runs (pid 1)
    # sharing this workspace root on the same host.
    tasks = tmp_path / "workspaces" / "tasks"
    dead, live = tasks / f"{SPARE_PREFIX}4194301-0abc", tasks / f"{SPARE_PREFIX}1-0abc"
    for path in (dead, live):
        path.mkdir(parents=True)
    (tasks / "t9").mkdir()
    (tasks / f"{SPARE_PREFIX}4194301-link").symlink_to(tasks / "t9")
    agents = replica(claude_bin, tmp_path, None, "a")
    await agents.start()
    try:
        await spare_ready(agents)
    finally:
        await agents.close()
    assert not dead.exists() and live.is_dir()
    assert not (tasks / f"{SPARE_PREFIX}4194301-link").is_symlink()
    assert (tasks / "t9").is_dir()  # a link is removed, never followed


async def test_a_spare_whose_process_died_is_replaced_not_handed_out(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path
) -> None:
    agents = replica(claude_bin, tmp_path, None, "a")
    await agents.start()
    runtime = runtime_of(agents)
    try:
        dead_session = await spare_ready(agents)
        dead = runtime.spares[0]
        os.killpg(dead.warm.proc.pid, signal.SIGKILL)
        await dead.warm.proc.wait()
        answer = await agents.run(task(agents, "t2", "hello", None))
        assert answer.ok, answer.error
        assert answer.session_id != dead_session
        assert answer.mode == "cold"  # no live spare to give: started for it
        assert not dead.workdir.exists() and not dead.config.exists()
        # And a live replacement waits for the next new task.
        await until(lambda: any(s.warm.alive for s in runtime.spares), "a replacement spare")
        fresh = runtime.spares[0].warm.session_id
        adopted = await agents.run(task(agents, "t3", "hi", None))
        assert (adopted.ok, adopted.mode, adopted.session_id) == (True, "spare", fresh)
    finally:
        await agents.close()


async def test_spares_made_for_other_settings_are_made_again(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path
) -> None:
    agents = replica(claude_bin, tmp_path, None, "a")
    await agents.start()
    runtime = runtime_of(agents)
    try:
        old = await spare_ready(agents)
        # The role prompt changed (a new PODIUM_CLAUDE_ROLE_PROMPT_FILE, say).
        changed = AgentCall(
            role="worker", key="t4", prompt="hello", workdir=agents.workdir("t4"),
            system_prompt="You are another agent.", timeout_s=60.0,
        )  # fmt: skip
        answer = await agents.run(changed)
        assert (answer.ok, answer.mode) == (True, "cold")
        assert answer.session_id != old
        assert "You are another agent." in api.main_calls[-1].system
        await until(
            lambda: bool(runtime.spares) and runtime.spares[0].warm.session_id != old,
            "a spare for the new settings",
        )
        assert runtime.spares[0].profile[1] == "You are another agent."
        again = await agents.run(replace(changed, key="t5", workdir=agents.workdir("t5")))
        assert (again.ok, again.mode) == (True, "spare")
    finally:
        await agents.close()


async def test_a_spare_saves_the_start_up_of_a_new_session(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path
) -> None:
    # Not a timing test: what is checked is that the new session's turn went to a
    # process that existed before the turn was asked for.
    agents = replica(claude_bin, tmp_path, None, "a")
    await agents.start()
    runtime = runtime_of(agents)
    try:
        await spare_ready(agents)
        pid = runtime.spares[0].warm.proc.pid
        answer = await agents.run(task(agents, "t6", "hello", None))
        assert answer.mode == "spare"
        assert runtime.pool["t6"].proc.pid == pid
    finally:
        await agents.close()
