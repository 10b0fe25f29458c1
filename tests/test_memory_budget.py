"""Agent processes sized by a memory budget, with real Claude Code CLI processes.

Budgets are set from what real processes measure here (their trees' RSS), so the
tests hold whatever the CLI's footprint on this machine: a budget full with two idle
sessions makes a third evict the least recently used one; a budget of two processes
and a half never runs more than two of four turns at once, and all four are answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from podium.agents import AgentCall
from podium.agents.claude import ClaudeRuntime
from podium.agents.memory import MB, cgroup_memory_limit, tree_rss
from podium.agents.sessions import Agents
from podium.common.config import AgentSettings
from podium.common.errors import AgentUnavailable
from podium.common.metrics import Metrics
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from tests.test_spares import runtime_of, until

pytestmark = pytest.mark.claude


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    def slow_echo(c: MessagesCall) -> Reply:
        # Slow enough that turns started together overlap.
        return Reply.text(f"echo: {c.last_user_text}", delay_s=1.5)

    async with FakeAnthropic(slow_echo) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        yield server


def settings(claude_bin: str, tmp_path: Path, **extra: object) -> AgentSettings:
    return AgentSettings(
        claude_bin=claude_bin,
        workspace_root=str(tmp_path / "workspaces"),
        claude_max_retries=0,
        **({"agent_spares": 0, "agent_pool_size": 8} | extra),  # type: ignore[arg-type]
    )


def call(tmp_path: Path, key: str, prompt: str, session: str | None = None) -> AgentCall:
    return AgentCall(
        role="worker", key=key, prompt=prompt, workdir=tmp_path / "workspaces" / key,
        session_id=session, system_prompt="You are a test agent.", timeout_s=60.0,
    )  # fmt: skip


@pytest.fixture
async def one_process_mb(api: FakeAnthropic, claude_bin: str, tmp_path: Path) -> int:
    """What one warm CLI process's tree takes here, measured after a turn (MB)."""
    runtime = ClaudeRuntime(settings(claude_bin, tmp_path, agent_memory_budget_mb=0), tmp_path)
    try:
        answer = await runtime.run(call(tmp_path, "probe", "hello"))
        assert answer.ok, answer.error
        (rss,) = tree_rss([runtime.pool["probe"].proc.pid]).values()
    finally:
        await runtime.close()
    return rss // MB + 1


def agents_with_budget(claude_bin: str, tmp_path: Path, one_mb: int) -> Agents:
    """Room for two processes and a half."""
    config = settings(
        claude_bin, tmp_path, agent_memory_budget_mb=one_mb * 5 // 2, agent_process_mb=one_mb
    )
    return Agents(
        ClaudeRuntime(config, tmp_path / "budgeted"),
        role="worker",
        settings=config,
        metrics=Metrics(CollectorRegistry(), "worker"),
    )


def fit_budget(runtime: ClaudeRuntime) -> int:
    """Set the budget to what the live processes take now, plus 0.6 of the largest: no
    room for one more of them, room once one goes, whatever size the CLI has on this
    machine today (processes of one run differ by 20 % and more). In MB."""
    pids = [w.proc.pid for w in runtime.pool.values()]
    pids += [s.warm.proc.pid for s in runtime.spares]
    sizes = tree_rss(pids).values()
    budget = int(sum(sizes) + 0.6 * max(sizes)) // MB
    runtime.settings = msgspec.structs.replace(runtime.settings, agent_memory_budget_mb=budget)
    return budget


async def test_at_the_budget_the_least_recently_used_idle_session_is_evicted(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path, one_process_mb: int
) -> None:
    agents = agents_with_budget(claude_bin, tmp_path, one_process_mb)
    await agents.start()
    runtime = runtime_of(agents)
    try:
        first = await agents.run(call(tmp_path, "k1", "one"))
        second = await agents.run(call(tmp_path, "k2", "two"))
        assert first.ok and second.ok, (first.error, second.error)
        again = await agents.run(call(tmp_path, "k1", "one again", first.session_id))
        assert (again.ok, again.mode) == (True, "warm")  # k1 used last: k2 is the LRU
        budget = fit_budget(runtime) * MB  # full with these two
        third = await agents.run(call(tmp_path, "k3", "three"))
        assert third.ok, third.error
        assert list(runtime.pool) == ["k1", "k3"]
        # k2's session was only let go: it resumes (cold), evicting the LRU idle one, k1.
        back = await agents.run(call(tmp_path, "k2", "two again", second.session_id))
        assert (back.ok, back.mode) == (True, "cold")
        assert list(runtime.pool) == ["k3", "k2"]
        use = runtime.memory()
        assert use.total <= use.budget
        assert sum(use.processes.values()) == 2
        scraped = generate_latest(agents.metrics.registry).decode()
    finally:
        await agents.close()
    assert 'podium_agent_evictions_total{reason="memory",role="worker"} 2.0' in scraped
    assert sample(scraped, 'podium_agent_memory_budget_bytes{role="worker"}') == budget
    assert sample(scraped, 'podium_agent_processes{role="worker",state="idle"}') == 2
    idle_bytes = sample(scraped, 'podium_agent_memory_used_bytes{role="worker",state="idle"}')
    assert 0 < idle_bytes <= budget


def sample(scraped: str, series: str) -> float:
    """The value of one series in a Prometheus text scrape."""
    (line,) = [line for line in scraped.splitlines() if line.startswith(series + " ")]
    return float(line.split()[-1])


async def test_concurrency_cannot_start_more_processes_than_the_budget_holds(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path, one_process_mb: int
) -> None:
    agents = agents_with_budget(claude_bin, tmp_path, one_process_mb)
    await agents.start()
    root = str(tmp_path / "budgeted")
    most = 0
    done = asyncio.Event()

    async def watch() -> None:
        # Every CLI process of this runtime runs with its config dir under ``root``, and
        # so do the processes it starts: count the trees (whose parent is not one).
        nonlocal most
        while not done.is_set():
            ours = {}
            for proc in psutil.process_iter(["environ", "ppid"]):
                environ = proc.info.get("environ") or {}
                if environ.get("CLAUDE_CONFIG_DIR", "").startswith(root):
                    ours[proc.pid] = proc.info["ppid"]
            most = max(most, sum(1 for parent in ours.values() if parent not in ours))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        answers = await asyncio.gather(
            *(agents.run(call(tmp_path, f"c{n}", f"turn {n}")) for n in range(4))
        )
        scraped = generate_latest(agents.metrics.registry).decode()
    finally:
        done.set()
        await watcher
        await agents.close()
    assert [a.outcome for a in answers] == ["ok"] * 4, [a.error for a in answers]
    assert 1 <= most <= 2, f"{most} CLI processes ran at once"
    # The last two waited for the first two to finish, whose sessions then made room.
    assert 'podium_agent_evictions_total{reason="memory",role="worker"} 2.0' in scraped
    assert sorted(c.last_user_text for c in api.main_calls[1:]) == [f"turn {n}" for n in range(4)]


async def test_a_full_budget_of_idle_sessions_still_gets_its_spare(
    api: FakeAnthropic, claude_bin: str, tmp_path: Path, one_process_mb: int
) -> None:
    # Idle sessions fill the budget in a busy service: the next new conversation must
    # still find a spare, so the refill evicts the least recently used idle session.
    # (No budget until the first session and its replacement spare run: then it is
    # made full with them.)
    config = settings(
        claude_bin, tmp_path, agent_spares=1,
        agent_memory_budget_mb=0, agent_process_mb=one_process_mb,
    )  # fmt: skip
    agents = Agents(
        ClaudeRuntime(config, tmp_path / "budgeted"), role="worker", settings=config,
        metrics=Metrics(CollectorRegistry(), "worker"),
    )  # fmt: skip
    await agents.start()
    runtime = runtime_of(agents)
    try:
        for n in range(3):
            agents.keep_spares("You are a test agent.")
            await until(lambda: bool(runtime.spares), "a spare")
            if n == 1:
                fit_budget(runtime)  # full with one session and the spare
            answer = await agents.run(call(tmp_path, f"s{n}", f"new {n}"))
            assert (answer.ok, answer.mode) == (True, "spare"), answer.error
        await until(lambda: bool(runtime.spares), "a spare with the budget full")
        # Room for two and a half: the last session and the spare; the others went.
        assert list(runtime.pool) == ["s2"]
        scraped = generate_latest(agents.metrics.registry).decode()
    finally:
        await agents.close()
    assert sample(scraped, 'podium_agent_evictions_total{reason="memory",role="worker"}') == 2


async def test_a_budget_that_cannot_hold_one_process_stops_the_service(
    claude_bin: str, tmp_path: Path
) -> None:
    runtime = ClaudeRuntime(
        settings(claude_bin, tmp_path, agent_memory_budget_mb=100, agent_process_mb=256),
        tmp_path,
    )
    with pytest.raises(AgentUnavailable, match="PODIUM_AGENT_MEMORY_BUDGET_MB=100"):
        await runtime.check()


def test_the_container_limit_is_read_from_the_cgroup(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path) == 0  # no cgroup files: no limit known
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path) == 0
    (tmp_path / "memory.max").write_text(f"{4 * 1024 * MB}\n")
    assert cgroup_memory_limit(tmp_path) == 4 * 1024 * MB
