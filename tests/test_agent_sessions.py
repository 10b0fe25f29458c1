"""Agent sessions with the real Claude Code CLI: warm pool, watchdog, limits, leases, portability.

The CLI is the real one (tools/claude, from npm); the model is a scripted local
Messages API server (podium.testing.anthropic).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.agents import AgentAnswer, AgentCall, sessions
from podium.agents.claude import SPARE_PREFIX, ClaudeRuntime
from podium.agents.sessions import Agents
from podium.common.config import AgentSettings
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.contracts import streams, subjects
from podium.contracts.ids import conversation_id
from podium.contracts.state import SessionRecord
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply, Usage
from podium.testing.services import Process, base_env

pytestmark = pytest.mark.claude


async def session_events(process: Process, event: str) -> float:
    """``podium_agent_session_events_total{event=…}`` of a running service."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{process.health_port()}/metrics") as resp,
    ):
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("podium_agent_session_events_total{") and f'event="{event}"' in line
    )


def settings(claude_bin: str, tmp_path: Path, **extra: Any) -> AgentSettings:
    return AgentSettings(
        claude_bin=claude_bin,
        workspace_root=str(tmp_path / "workspaces"),
        claude_max_retries=0,
        **extra,
    )


def call(tmp_path: Path, key: str, prompt: str, session: str | None, **extra: Any) -> AgentCall:
    return AgentCall(
        role="worker",
        key=key,
        prompt=prompt,
        workdir=tmp_path / "workspaces" / "tasks" / key,
        session_id=session,
        timeout_s=extra.pop("timeout_s", 60.0),
        **extra,
    )


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    def echo(c: MessagesCall) -> Reply:
        return Reply.text(f"turn {len(c.all_user_texts)}: {c.last_user_text}")

    async with FakeAnthropic(echo) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        yield server


def processes_in(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is inside ``directory`` (a spare
    waiting in its own directory there is no task's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(directory)) and SPARE_PREFIX not in cwd:
            found.append(int(entry.name))
    return found


async def test_warm_session_keeps_one_process_and_the_history(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path
) -> None:
    runtime = ClaudeRuntime(settings(claude_bin, tmp_path, agent_pool_size=2), tmp_path / "cfg")
    session = None
    answers: list[AgentAnswer] = []
    pids = set()
    try:
        for n in range(4):
            answer = await runtime.run(call(tmp_path, "t1", f"step {n}", session))
            assert answer.ok, answer.error
            session = answer.session_id
            answers.append(answer)
            pids.add(runtime.pool["t1"].proc.pid)
    finally:
        await runtime.close()
    assert [a.mode for a in answers] == ["cold", "warm", "warm", "warm"]
    assert [a.text for a in answers] == [f"turn {n + 1}: step {n}" for n in range(4)]
    assert len(pids) == 1
    assert api.main_calls[-1].all_user_texts == [f"step {n}" for n in range(4)]
    # Per-turn cost, not the process's running total.
    assert answers[3].cost_usd == pytest.approx(answers[0].cost_usd)


async def test_eviction_then_cold_resume_keeps_the_history(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path
) -> None:
    runtime = ClaudeRuntime(settings(claude_bin, tmp_path, agent_pool_size=1), tmp_path / "cfg")
    try:
        a1 = await runtime.run(call(tmp_path, "a", "alpha one", None))
        b1 = await runtime.run(call(tmp_path, "b", "bravo one", None))  # evicts a
        assert list(runtime.pool) == ["b"]
        assert runtime.live() == 1
        a2 = await runtime.run(call(tmp_path, "a", "alpha two", a1.session_id))
    finally:
        await runtime.close()
    assert (a1.mode, b1.mode, a2.mode) == ("cold", "cold", "cold")
    assert a2.ok
    assert a2.session_id == a1.session_id
    assert api.main_calls[-1].all_user_texts == ["alpha one", "alpha two"]
    assert processes_in(tmp_path / "workspaces") == []


@pytest.mark.parametrize("pool", [0, 1], ids=["spawn-per-turn", "warm"])
async def test_watchdog_kills_a_hanging_agent(
    claude_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: int
) -> None:
    async with FakeAnthropic(lambda c: Reply.hanging("mid_stream")) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        runtime = ClaudeRuntime(
            settings(claude_bin, tmp_path, agent_pool_size=pool), tmp_path / "cfg"
        )
        started = time.monotonic()
        answer = await runtime.run(call(tmp_path, "h", "never answered", None, timeout_s=3))
        elapsed = time.monotonic() - started
        await runtime.close()
    assert answer.outcome == "timeout"
    assert "no answer within 3s" in answer.error
    assert 3 <= elapsed < 8
    assert processes_in(tmp_path / "workspaces") == []


@pytest.mark.parametrize("pool", [0, 1], ids=["spawn-per-turn", "warm"])
async def test_turn_and_budget_limits_become_outcomes(
    claude_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: int
) -> None:
    def loop_forever(c: MessagesCall) -> Reply:
        if "budget" in " ".join(c.all_user_texts):
            return Reply.text("expensive", usage=Usage(input_tokens=100_000, output_tokens=10))
        return Reply.tool("Bash", {"command": "echo again", "description": "loop"})

    async with FakeAnthropic(loop_forever) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        limited = settings(
            claude_bin, tmp_path, agent_pool_size=pool, agent_max_turns=2,
            agent_max_budget_usd=0.01, claude_allowed_tools="Bash",
        )  # fmt: skip
        runtime = ClaudeRuntime(limited, tmp_path / "cfg")
        try:
            turns = await runtime.run(call(tmp_path, "m", "loop please", None))
            budget = await runtime.run(call(tmp_path, "n", "budget please", None))
        finally:
            await runtime.close()
    assert turns.outcome == "max_turns"
    assert "maximum number of turns" in turns.error
    assert budget.outcome == "max_budget"
    assert "budget" in budget.error
    assert budget.cost_usd > 0.01


# --- across replicas -----------------------------------------------------------


def replica(
    claude_bin: str, tmp_path: Path, js: JetStreamContext, name: str, **extra: Any
) -> Agents:
    """A 'replica': its own config dir, the shared workspace path, the shared bus."""
    agent_settings = settings(claude_bin, tmp_path, **extra)
    runtime = ClaudeRuntime(agent_settings, tmp_path / f"replica-{name}")
    return Agents(
        runtime, role="worker", settings=agent_settings,
        metrics=Metrics(CollectorRegistry(), name), js=js, replica=name,
    )  # fmt: skip


async def test_two_replicas_never_run_one_session_at_once(
    claude_bin: str, tmp_path: Path, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight: dict[str, int] = {}
    peak = 0

    async def slow(c: MessagesCall) -> Reply:
        nonlocal peak
        sid = c.session_id or "?"
        in_flight[sid] = in_flight.get(sid, 0) + 1
        peak = max(peak, in_flight[sid])
        await asyncio.sleep(1.5)
        in_flight[sid] -= 1
        return Reply.text(f"seen {c.all_user_texts}")

    async with FakeAnthropic(slow) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        a, b = (replica(claude_bin, tmp_path, js, n) for n in ("a", "b"))
        await a.start()
        await b.start()
        first = await a.run(call(tmp_path, "shared", "first", None))
        try:
            two = await asyncio.gather(
                a.run(call(tmp_path, "shared", "from a", first.session_id)),
                b.run(call(tmp_path, "shared", "from b", first.session_id)),
            )
            # A replica that will not wait declines instead of running alongside.
            c = replica(claude_bin, tmp_path, js, "c", agent_lease_wait_s=0.2)
            await c.start()
            racing = asyncio.create_task(a.run(call(tmp_path, "shared", "again", first.session_id)))
            await asyncio.sleep(0.5)
            declined = await c.run(call(tmp_path, "shared", "from c", first.session_id))
            await racing
        finally:
            await a.close()
            await b.close()
    assert peak == 1
    assert all(t.ok for t in two), [t.error for t in two]
    assert declined.outcome == "busy"
    # Whichever ran second saw the other's turn: the history followed the lease.
    texts = sorted(t.text for t in two)
    assert any(
        "'first', 'from a', 'from b'" in t or "'first', 'from b', 'from a'" in t for t in texts
    )


@pytest.mark.parametrize("kept", ["in its record", "in the object store"])
async def test_a_session_moves_to_another_replica_with_its_workspace(
    claude_bin: str, tmp_path: Path, js: JetStreamContext, api: FakeAnthropic, kept: str
) -> None:
    # Small sessions travel in their record (one write a turn); larger ones, here all of
    # them, through the object store.
    inline = {"agent_inline_session_bytes": 0} if kept == "in the object store" else {}
    a = replica(claude_bin, tmp_path, js, "a", **inline)
    await a.start()
    first = await a.run(call(tmp_path, "t9", "remember the word TULIP", None))
    (tmp_path / "workspaces" / "tasks" / "t9" / "notes.txt").write_text("made on a")
    # Store the workspace as it is after a turn (the file above counts as the turn's work).
    await a.run(call(tmp_path, "t9", "second on a", first.session_id))
    await a.close()
    # Replica b has never seen this session: no transcript in its config dir, and
    # the workspace is gone from its disk.
    shutil.rmtree(tmp_path / "workspaces" / "tasks" / "t9")
    records = await Store.open(js, streams.SESSIONS.name, SessionRecord)
    found = await records.get("worker.t9")
    assert found is not None
    record = found[0]
    if inline:
        assert record.transcript and record.workspace
        assert not (record.transcript_inline or record.workspace_inline)
    else:
        assert record.transcript_inline and record.workspace_inline
        assert not (record.transcript or record.workspace)
    b = replica(claude_bin, tmp_path, js, "b", **inline)
    await b.start()
    try:
        third = await b.run(call(tmp_path, "t9", "which word?", first.session_id))
    finally:
        await b.close()
    assert third.ok, third.error
    assert api.main_calls[-1].all_user_texts == [
        "remember the word TULIP",
        "second on a",
        "which word?",
    ]
    assert (tmp_path / "workspaces" / "tasks" / "t9" / "notes.txt").read_text() == "made on a"
    restored = b.metrics.registry.get_sample_value(
        "podium_agent_session_events_total", {"role": "worker", "event": "restored"}
    )
    assert restored == 1


async def test_conductor_replica_killed_then_another_resumes_the_conversation(
    claude_bin: str, tmp_path: Path, js: JetStreamContext, nats_server: Any
) -> None:
    """A turn on conductor A; A gets SIGKILL; the next turn runs on conductor B, which has
    its own config dir, and sees the whole history."""

    def respond(c: MessagesCall) -> Reply:
        return Reply.text(f"REPLY: noted ({len(c.all_user_texts)} messages so far)")

    token = "replica-token-0123456789abcdef"
    async with FakeAnthropic(respond) as server:
        shared = {
            "PODIUM_AGENT": "claude", "PODIUM_CLAUDE_BIN": claude_bin,
            "ANTHROPIC_BASE_URL": server.base_url, "ANTHROPIC_API_KEY": "sk-test",
            "PODIUM_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            # B takes over A's partitions once A's lease lapses.
            "PODIUM_PARTITION_LEASE_TTL_S": "3",
        }  # fmt: skip
        ingress = Process("ingress", base_env(
            nats_server.url, tmp_path, PODIUM_PORT="0", PODIUM_HOST="127.0.0.1",
            PODIUM_API_TOKENS=f"t:{token}",
        ), tmp_path / "logs").start()  # fmt: skip
        notifier = Process("notifier", base_env(nats_server.url, tmp_path), tmp_path / "logs")
        notifier.start()
        conductor_a = Process("conductor", base_env(
            nats_server.url, tmp_path, PODIUM_STATE_DIR=str(tmp_path / "a"), **shared
        ), tmp_path / "logs-a").start()  # fmt: skip
        conductor_b: Process | None = None
        try:
            for p in (ingress, notifier, conductor_a):
                await p.wait_ready()
            url = f"http://127.0.0.1:{ingress.logged_port('ingress listening')}"
            outbox = tmp_path / "outbox.jsonl"

            async def send(text: str, expect: int) -> dict[str, Any]:
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(
                        f"{url}/v1/messages",
                        json={"text": text, "thread_id": "th"},
                        headers={"Authorization": f"Bearer {token}"},
                    ) as resp,
                ):
                    assert resp.status == 202
                for _ in range(300):
                    if outbox.exists() and len(outbox.read_text().splitlines()) >= expect:
                        line: dict[str, Any] = json.loads(outbox.read_text().splitlines()[-1])
                        return line
                    await asyncio.sleep(0.1)
                raise AssertionError("no reply")

            first = await send("Our budget is 40k, remember it.", 1)
            assert first["body"] == "noted (1 messages so far)"
            assert processes_in(tmp_path / "workspaces"), "A keeps its session warm"
            # The turn is over once A has acknowledged the message (after storing the
            # session); kill it then, as a node failure between two turns.
            conversation = conversation_id("api", "t", "th")
            consumer = streams.conductor_inbound(
                subjects.partition_of(conversation, streams.PARTITIONS)
            )
            for _ in range(100):
                info = await js.consumer_info("INBOUND", consumer.durable)
                if info.num_ack_pending == 0:
                    break
                await asyncio.sleep(0.05)
            conductor_a.signal(signal.SIGKILL)
            conductor_a.wait(10)
            await asyncio.sleep(0.5)
            # Its warm CLI process died with it: nothing keeps the session open.
            assert processes_in(tmp_path / "workspaces") == []

            conductor_b = Process("conductor", base_env(
                nats_server.url, tmp_path, PODIUM_STATE_DIR=str(tmp_path / "b"), **shared
            ), tmp_path / "logs-b").start()  # fmt: skip
            await conductor_b.wait_ready()
            second = await send("What is our budget?", 2)
            restored = await session_events(conductor_b, "restored")
        finally:
            for proc in (ingress, notifier, conductor_a, conductor_b):
                if proc is not None:
                    proc.stop()
    assert second["body"] == "noted (2 messages so far)"
    last = server.main_calls[-1]
    assert any("Our budget is 40k" in t for t in last.all_user_texts)
    assert not (tmp_path / "a").samefile(tmp_path / "b")
    # B brought the session over from what A stored (not a fresh session).
    assert restored == 1


async def test_bypass_permissions_runs_as_root(
    claude_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root the CLI refuses bypassPermissions unless IS_SANDBOX=1, which the runtime sets."""

    def respond(c: MessagesCall) -> Reply:
        if c.tool_results:
            return Reply.text("done")
        return Reply.tool("Bash", {"command": "echo ran > bypass.txt", "description": "write"})

    async with FakeAnthropic(respond) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        runtime = ClaudeRuntime(
            settings(claude_bin, tmp_path, agent_pool_size=0,
                     claude_permission_mode="bypassPermissions"),
            tmp_path / "cfg",
        )  # fmt: skip
        answer = await runtime.run(call(tmp_path, "root", "write the file", None))
    assert answer.ok, answer.error
    assert (tmp_path / "workspaces" / "tasks" / "root" / "bypass.txt").read_text() == "ran\n"


@pytest.mark.parametrize("pool", [0, 1], ids=["spawn-per-turn", "warm"])
async def test_api_errors_become_an_execution_error(
    claude_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: int
) -> None:
    """The CLI reports API failures as subtype "success" with is_error set."""
    async with FakeAnthropic(lambda c: Reply.http_error(500, message="upstream broke")) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        runtime = ClaudeRuntime(
            settings(claude_bin, tmp_path, agent_pool_size=pool), tmp_path / "cfg"
        )
        try:
            answer = await runtime.run(call(tmp_path, "e", "anything", None))
        finally:
            await runtime.close()
    assert answer.outcome == "execution_error"
    assert not answer.ok
    assert "500" in answer.error
    assert answer.text == ""


# --- what a sandboxed agent may have planted where its session's files are -------------


def test_a_planted_link_or_fifo_is_never_read_as_the_transcript(tmp_path: Path) -> None:
    secret = tmp_path / "worker-secret"
    secret.write_text("NATS_PASSWORD=hunter2")
    config = tmp_path / "config"
    config.mkdir()
    link = config / "s1.jsonl"
    link.symlink_to(secret)
    assert sessions._read_session_files(link, None, 1024).transcript is None
    fifo = config / "s2.jsonl"
    os.mkfifo(fifo)
    # Returns at once (a read would block for good) and stores nothing.
    assert sessions._read_session_files(fifo, None, 1024).transcript is None
    assert sessions._small(fifo, None)
    regular = config / "s3.jsonl"
    regular.write_text('{"prompt": "hi"}\n')
    assert sessions._read_session_files(regular, None, 1024).transcript == b'{"prompt": "hi"}\n'


def test_a_workspace_is_packed_without_following_links(tmp_path: Path) -> None:
    secret = tmp_path / "worker-secret"
    secret.write_text("NATS_PASSWORD=hunter2")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "result.md").write_text("done")
    (work / "sub" / "leak").symlink_to(secret)
    (work / "linked-dir").symlink_to(tmp_path)
    os.mkfifo(work / "pipe")
    archive = sessions._pack(work, 1024 * 1024)
    assert archive is not None
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["./sub/leak"].issym() and members["./sub/leak"].linkname == str(secret)
        assert members["./linked-dir"].issym()
        assert "./pipe" not in members
        reader = tar.extractfile("./result.md")
        assert reader is not None and reader.read() == b"done"
        assert b"hunter2" not in archive
    # Over the limit: none.
    assert sessions._pack(work, 3) is None


def test_a_transcript_is_not_restored_through_a_planted_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "config" / "projects"
    config.mkdir(parents=True)
    (config / "-work-task").symlink_to(elsewhere)
    with pytest.raises(OSError, match="is a link"):
        sessions._write_file(config / "-work-task" / "s1.jsonl", b"history")
    assert list(elsewhere.iterdir()) == []
    # A link planted where the file goes is replaced, not written through.
    target = tmp_path / "target"
    target.write_text("keep")
    folder = tmp_path / "config" / "projects" / "-work-other"
    folder.mkdir()
    (folder / "s2.jsonl").symlink_to(target)
    sessions._write_file(folder / "s2.jsonl", b"history")
    assert target.read_text() == "keep"
    assert (folder / "s2.jsonl").read_bytes() == b"history"
