"""Benchmark: losing a NATS node under load, on a real 3-node JetStream cluster.

    .venv/bin/python bench/failover.py [--kill INBOUND] [--conversations 300]
                                       [--rate 10] [--down 20]

Starts three nats-server nodes (``sync_interval: always``, R3 streams and buckets,
as the production manifests), the four services as processes (offline agent), and
API clients that send ``--conversations`` conversations at ``--rate`` per second,
retrying a 503 with the same ``Idempotency-Key`` as a real client would. A third of
the way in, the node that leads ``--kill`` (a stream: INBOUND, COMMANDS,
KV_conversations, …) is SIGKILLed; it is started again ``--down`` seconds later.

Checks what users rely on: every conversation answered exactly once, no reply
reported as failed (ambiguous sends, DeliveryFailed), nothing dead-lettered. Prints
how long the ingress answered 503, the longest a client waited, and the median
latency before the kill beside the median during and after it (same run). The last
line is one JSON object; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import nats
from prometheus_client.parser import text_string_to_metric_families

from podium.common.provision import provision
from podium.testing.cluster import NatsCluster
from podium.testing.platform import TOKEN, Platform


class Client:
    """One API conversation, sent until stored (503s retried with the same key)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.key = f"failover-{n}"
        self.sent_at = 0.0
        self.stored_at = 0.0
        self.unavailable: list[float] = []
        self.conversation = ""

    async def send(self, http: aiohttp.ClientSession, url: str) -> None:
        self.sent_at = time.monotonic()
        while True:
            try:
                async with http.post(
                    f"{url}/v1/messages",
                    json={"text": f"conversation {self.n}", "thread_id": f"t{self.n}"},
                    headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": self.key},
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 202:
                        self.conversation = body["conversation_id"]
                        self.stored_at = time.monotonic()
                        return
                    self.unavailable.append(time.monotonic())
            except (aiohttp.ClientError, TimeoutError):
                self.unavailable.append(time.monotonic())
            await asyncio.sleep(0.5)


async def leader_of(servers: list[str], stream: str) -> str:
    nc = await nats.connect(servers=servers)
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def notifier_outcomes(platform: Platform) -> Counter[str]:
    """podium_notifier_sends_total by outcome."""
    text = await platform.metrics("notifier")
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "podium_notifier_sends_total":
                found[sample.labels["outcome"]] += int(sample.value)
    return found


class Fault:
    """Kills the node that leads ``stream`` after ``after_s``, starts it ``down_s`` later."""

    def __init__(self, cluster: NatsCluster, stream: str, after_s: float, down_s: float) -> None:
        self.cluster = cluster
        self.stream = stream
        self.after_s = after_s
        self.down_s = down_s
        self.victim = ""
        self.killed_at = 0.0
        self.restarted_at = 0.0

    async def run(self) -> None:
        await asyncio.sleep(self.after_s)
        self.victim = await leader_of(self.cluster.servers, self.stream)
        node = self.cluster.nodes[int(self.victim.lstrip("n"))]
        node.stop(kill=True)
        self.killed_at = time.monotonic()
        await asyncio.sleep(self.down_s)
        node.start()
        self.restarted_at = time.monotonic()


async def dead_letters(servers: list[str]) -> int:
    nc = await nats.connect(servers=servers)
    try:
        return int((await nc.jetstream().stream_info("DEADLETTER")).state.messages)
    finally:
        await nc.close()


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cluster = NatsCluster(root / "cluster", sync_always=True).start()
    platform: Platform | None = None
    try:
        await cluster.wait_ready()
        nc = await nats.connect(servers=cluster.servers)
        try:
            await provision(nc.jetstream(), replicas=3)
        finally:
            await nc.close()
        platform = Platform(
            cluster.url,
            root / "platform",
            env={"PODIUM_PROVISION": "false", "PODIUM_LOG_LEVEL": "INFO"},
        ).start()
        await platform.ready(120)
        clients = [Client(n) for n in range(args.conversations)]
        fault = Fault(cluster, args.kill, args.conversations / args.rate / 3, args.down)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            faulting = asyncio.create_task(fault.run())
            sends = []
            for client in clients:
                sends.append(asyncio.create_task(client.send(http, platform.url)))
                await asyncio.sleep(1 / args.rate)
            await asyncio.gather(*sends)
            await faulting
        deadline = time.monotonic() + 180
        while len(platform.outbox()) < args.conversations and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        # Anything sent twice shows up within a few seconds more.
        await asyncio.sleep(5)
        replies = platform.outbox()
        outcomes = await notifier_outcomes(platform)
        dead = await dead_letters(cluster.servers)
    finally:
        if platform is not None:
            platform.stop()
        cluster.stop()
    return summary(args, clients, replies, outcomes=outcomes, dead=dead, fault=fault)


def summary(
    args: argparse.Namespace,
    clients: list[Client],
    replies: list[dict[str, Any]],
    *,
    outcomes: Counter[str],
    dead: int,
    fault: Fault,
) -> dict[str, Any]:
    """The run's figures and checks."""
    killed_at, restarted_at = fault.killed_at, fault.restarted_at
    per_conversation = Counter(r["conversation_id"] for r in replies)
    conversations = {c.conversation for c in clients}
    lost = sorted(conversations - set(per_conversation))
    doubled = sorted(c for c, n in per_conversation.items() if n > 1)
    unavailable = sorted(t for c in clients for t in c.unavailable)
    window = (unavailable[-1] - unavailable[0]) if unavailable else 0.0

    def p50_ms(start: float, end: float) -> float:
        waits = [c.stored_at - c.sent_at for c in clients if start <= c.sent_at < end]
        return round(statistics.median(waits) * 1000, 1) if waits else 0.0

    before = p50_ms(0.0, killed_at)
    return {
        "killed": args.kill,
        "leader_killed": fault.victim,
        "down_s": round(restarted_at - killed_at, 1),
        "conversations": args.conversations,
        "answered": len(per_conversation),
        "lost": len(lost),
        "answered_twice": len(doubled),
        "replies": len(replies),
        "ambiguous_sends": outcomes.get("ambiguous", 0),
        "failed_sends": outcomes.get("failed", 0),
        "dead_letters": dead,
        "ingress_503s": len(unavailable),
        "unavailable_window_s": round(window, 1),
        "longest_store_wait_s": round(max(c.stored_at - c.sent_at for c in clients), 2),
        # Sent before the kill (the baseline, same run), in the 10 s after it, and later.
        "store_p50_before_ms": before,
        "store_p50_first_10s_after_kill_ms": p50_ms(killed_at, killed_at + 10),
        "store_p50_later_ms": p50_ms(killed_at + 10, float("inf")),
        "ratio_later_to_before": round(p50_ms(killed_at + 10, float("inf")) / before, 2)
        if before
        else 0.0,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill", default="INBOUND", help="stream whose leader is killed")
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0, help="conversations per second")
    parser.add_argument("--down", type=float, default=20.0, help="seconds the node stays down")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="podium-failover-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    ok = (
        result["lost"] == 0
        and result["answered_twice"] == 0
        and result["replies"] == result["conversations"]
        and result["ambiguous_sends"] == 0
        and result["failed_sends"] == 0
        and result["dead_letters"] == 0
    )
    for key, value in result.items():
        print(f"{key:>32}  {value}")
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli()
