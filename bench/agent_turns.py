"""Benchmark: one 20-turn conversation, spawn-per-turn beside warm, against a local API.

    .venv/bin/python bench/agent_turns.py [--turns 20]

The real Claude Code CLI (tools/claude, or PODIUM_CLAUDE_BIN) talks to a local
Messages API server that answers at once, so the figures are the CLI's and
Podium's own overhead. *spawn*: ``claude -p --resume`` per turn (pool size 0),
the seed's pattern. *warm*: a long-lived stream-json process answers every turn
after the first. Prints a table, then as its last line one JSON object with
``spawn_turn_ms``, ``warm_turn_ms``, ``speedup`` and ``rss_mb_per_session``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from podium.agents import AgentCall
from podium.agents.claude import ClaudeRuntime
from podium.common.config import AgentSettings
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from podium.testing.claude import claude_binary

ROOT = Path(__file__).resolve().parent.parent


def claude_bin() -> str:
    """The CLI to measure (``PODIUM_CLAUDE_BIN``, else the pinned one)."""
    found = claude_binary()
    if found is None:
        sys.exit("the Claude Code CLI is missing: run `make setup` (npm ci in tools/claude)")
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, in MB."""
    total_kb = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


async def conversation(runtime: ClaudeRuntime, workdir: Path, turns: int) -> list[float]:
    """Wall time of each turn, in ms."""
    session = None
    times = []
    for n in range(turns):
        started = time.perf_counter()
        answer = await runtime.run(
            AgentCall(
                role="conductor",
                key="bench",
                prompt=f"message {n}",
                workdir=workdir,
                session_id=session,
                timeout_s=60,
            )
        )
        times.append((time.perf_counter() - started) * 1000)
        if not answer.ok:
            raise RuntimeError(answer.error)
        session = answer.session_id
    return times


async def main(turns: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="podium-agent-bench-"))

    def reply(call: MessagesCall) -> Reply:
        return Reply.text(f"ok {len(call.all_user_texts)}")

    async with FakeAnthropic(reply) as api:
        os.environ["ANTHROPIC_BASE_URL"] = api.base_url
        os.environ["ANTHROPIC_API_KEY"] = "sk-bench"
        base = AgentSettings(claude_bin=claude_bin(), claude_tools="", claude_max_retries=0)
        spawn = ClaudeRuntime(msgspec.structs.replace(base, agent_pool_size=0), root / "spawn")
        spawn_times = await conversation(spawn, root / "work-spawn", turns)
        warm = ClaudeRuntime(msgspec.structs.replace(base, agent_pool_size=1), root / "warm")
        warm_times = await conversation(warm, root / "work-warm", turns)
        rss = rss_mb(warm.pool["bench"].proc.pid)
        await warm.close()
    shutil.rmtree(root, ignore_errors=True)
    spawn_ms = statistics.median(spawn_times[1:])
    warm_ms = statistics.median(warm_times[1:])
    return {
        "turns": turns,
        "spawn_turn_ms": round(spawn_ms, 1),
        "warm_turn_ms": round(warm_ms, 1),
        "warm_first_turn_ms": round(warm_times[0], 1),
        "warm_turn_p90_ms": round(sorted(warm_times[1:])[int(0.9 * (turns - 2))], 1),
        "speedup": round(spawn_ms / warm_ms, 1),
        "rss_mb_per_session": round(rss, 1),
    }


def cli() -> None:
    """Run and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    result = asyncio.run(main(parser.parse_args().turns))
    print(f"{'figure':<32} {'value':>10}")
    print(f"{'spawn-per-turn, median (ms)':<32} {result['spawn_turn_ms']:>10}")
    print(f"{'warm turn, median (ms)':<32} {result['warm_turn_ms']:>10}")
    print(f"{'warm turn, p90 (ms)':<32} {result['warm_turn_p90_ms']:>10}")
    print(f"{'warm first turn (ms)':<32} {result['warm_first_turn_ms']:>10}")
    print(f"{'speedup (spawn / warm)':<32} {result['speedup']:>10}")
    print(f"{'RSS per warm session (MB)':<32} {result['rss_mb_per_session']:>10}")
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
