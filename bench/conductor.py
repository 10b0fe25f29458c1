"""Benchmark: conductor turns per second with 1 and 2 replicas, and per-conversation overlap.

    .venv/bin/python bench/conductor.py [--conversations 200] [--messages 5]

For each replica count, a fresh nats-server and that many conductor processes
(offline agent, zero think time; no workers, so every turn is the conductor's
own: consume, session lease, agent, policy, publish, save state, store the
session). ``conversations x messages`` inbound events are published straight
onto INBOUND, each conversation's messages in order; the clock runs from the
first publish to the last turn saved. The conductors' own logs give every
turn's start and end, from which the largest number of turns of one
conversation that ever overlapped is computed (it must be 1).

Prints a table, then as its last line one JSON object with ``turns_per_s_1``,
``turns_per_s_2`` and ``max_concurrent_turns_per_conversation``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from podium.cli.natsserver import NatsServer, free_port
from podium.common.bus import publish
from podium.common.provision import provision
from podium.contracts import subjects
from podium.contracts.events import InboundMessage
from podium.contracts.ids import conversation_id, new_id
from podium.testing.platform import Platform


def overlap(log_lines: list[dict[str, Any]]) -> int:
    """The most turns of one conversation that were ever running at the same time."""
    by_conversation: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for turn in log_lines:
        by_conversation[turn["conversation_id"]] += [
            (turn["started_at"], 1),
            (turn["ended_at"], -1),
        ]
    worst = 0
    for edges in by_conversation.values():
        running = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
            running += step
            worst = max(worst, running)
    return worst


async def run(replicas: int, conversations: int, messages: int) -> tuple[float, int]:
    """(turns per second, worst per-conversation overlap) for ``replicas`` conductors."""
    root = Path(tempfile.mkdtemp(prefix=f"podium-bench-conductor-{replicas}-"))
    server = NatsServer(root / "nats").start()
    platform = Platform(
        server.url,
        root,
        env={
            "PODIUM_LOG_LEVEL": "INFO",
            "PODIUM_MAX_WORKERS_PER_CONVERSATION": str(messages + 1),
            "PODIUM_MAX_OUTBOUND_PER_HOUR": "1000",
        },
        services=(),
    )
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await provision(js)
        for n in range(replicas):
            platform.add("conductor", name=f"conductor-{n}", PODIUM_HEALTH_PORT=str(free_port()))
        await platform.ready()
        await asyncio.sleep(2 * replicas)  # members see each other, partitions settle
        total = conversations * messages
        saved = 0
        finished = asyncio.Event()

        async def on_save(msg: Msg) -> None:
            nonlocal saved
            saved += 1
            if saved >= total:
                finished.set()

        await nc.subscribe("$KV.conversations.>", cb=on_save)
        started = time.perf_counter()
        for m in range(messages):
            for c in range(conversations):
                conversation = conversation_id("api", "bench", f"c{c}")
                event_id = new_id()
                await publish(
                    js,
                    subjects.inbound("api", conversation),
                    InboundMessage(
                        event_id=event_id, correlation_id=event_id, conversation_id=conversation,
                        channel="api", sender="bench", text=f"message {m}", client="bench",
                        thread_id=f"c{c}",
                    ),
                )  # fmt: skip
        await asyncio.wait_for(finished.wait(), timeout=600)
        elapsed = time.perf_counter() - started
        await nc.close()
    finally:
        platform.stop()
        server.stop()
    turns = [
        json.loads(line)
        for process in platform.processes.values()
        for line in process.log().splitlines()
        if '"turn saved"' in line
    ]
    shutil.rmtree(root, ignore_errors=True)
    return total / elapsed, overlap(turns)


async def main(conversations: int, messages: int) -> dict[str, Any]:
    one, overlap_1 = await run(1, conversations, messages)
    two, overlap_2 = await run(2, conversations, messages)
    return {
        "conversations": conversations,
        "messages_per_conversation": messages,
        "turns_per_s_1": round(one, 1),
        "turns_per_s_2": round(two, 1),
        "scaling": round(two / one, 2),
        "max_concurrent_turns_per_conversation": max(overlap_1, overlap_2),
    }


def cli() -> None:
    """Run and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(main(args.conversations, args.messages))
    print(f"{'figure':<44} {'value':>8}")
    print(f"{'turns/s, 1 replica':<44} {result['turns_per_s_1']:>8}")
    print(f"{'turns/s, 2 replicas':<44} {result['turns_per_s_2']:>8}")
    print(
        f"{'max concurrent turns of one conversation':<44} "
        f"{result['max_concurrent_turns_per_conversation']:>8}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
