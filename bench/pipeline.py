"""Benchmark: conversations through the whole loop, beside a raw nats-py loop.

    .venv/bin/python bench/pipeline.py [--rate 20] [--seconds 10] [--burst 200]

Starts its own nats-server and the four services as processes (offline agent,
no delay), then:

1. raw: nats-py alone — durable publish rate, and a 4-hop pull/ack/publish relay
   at the same arrival rate (the bus's own latency floor);
2. paced: API messages at ``--rate`` conversations/s for ``--seconds``; latency
   from the POST to the reply's outbox record turning ``sent`` (ingress →
   conductor → worker → conductor → notifier, four hops plus state updates);
3. burst: ``--burst`` conversations as fast as the platform takes them.

Prints a table, then as its last line one JSON object with
``conversations_per_s``, ``p50_ms``, ``p99_ms``, ``raw_publish_per_s``, the raw
relay's figures, and what one conversation costs the bus in the burst, read from
the server's monitoring endpoint: JetStream API requests as ``/jsz`` counts them
(stream and consumer info, object-store lookups and purges; not fetches), KV reads
(direct gets, which ``/jsz`` does not count, so the benchmark counts their requests
itself) and stored messages (each a publish awaiting its ack), their sum,
``js_round_trips_per_conversation`` (fetches aside), and every message the
services sent the server (``/varz`` ``in_msgs``: KV reads, fetches and acks too),
``bus_messages_per_conversation``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from podium.cli.natsserver import NatsServer, free_port
from podium.contracts.events import ApiReply, decode
from podium.contracts.state import OutboxRecord
from podium.testing.services import Process, base_env

TOKEN = "bench-token-0123456789abcdef"
SERVICES = ("ingress", "conductor", "worker", "notifier")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def raw_publish_rate(url: str, n: int = 5000) -> float:
    """Durable publishes awaited one by one (the design card's ~5,000 msg/s)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="RAWPUB", subjects=["rawpub.>"]))
    started = time.perf_counter()
    for i in range(n):
        await js.publish("rawpub.x", b'{"n":%d}' % i, headers={"Nats-Msg-Id": f"m{i}"})
    rate = n / (time.perf_counter() - started)
    await js.delete_stream("RAWPUB")
    await nc.close()
    return rate


async def raw_relay(url: str, rate: float, seconds: float) -> list[float]:
    """Latency of a 4-hop JetStream relay (pull, ack, publish next) at ``rate`` msg/s."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    hops = 4
    await js.add_stream(StreamConfig(name="RELAY", subjects=["relay.>"]))
    done: dict[int, float] = {}
    sent: dict[int, float] = {}

    async def hop(i: int) -> None:
        await js.add_consumer(
            "RELAY",
            ConsumerConfig(
                durable_name=f"h{i}", filter_subject=f"relay.{i}", ack_policy=AckPolicy.EXPLICIT
            ),
        )
        sub = await js.pull_subscribe_bind(durable=f"h{i}", stream="RELAY")
        while True:
            try:
                msgs = await sub.fetch(64, timeout=1)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                if i + 1 < hops:
                    await js.publish(f"relay.{i + 1}", msg.data)
                else:
                    done[int(msg.data)] = time.perf_counter()
                await msg.ack()

    workers = [asyncio.create_task(hop(i)) for i in range(hops)]
    await asyncio.sleep(0.5)
    total = int(rate * seconds)
    start = time.perf_counter()
    for n in range(total):
        target = start + n / rate
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        sent[n] = time.perf_counter()
        await js.publish("relay.0", str(n).encode())
    deadline = time.perf_counter() + 10
    while len(done) < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    for w in workers:
        w.cancel()
    await js.delete_stream("RELAY")
    await nc.close()
    return [(done[n] - sent[n]) * 1000 for n in sent if n in done]


class Tracker:
    """Watches replies and outbox records to time each conversation to its sent reply."""

    def __init__(self) -> None:
        self.posted: dict[str, float] = {}
        self.command_of: dict[str, str] = {}
        self.finished: dict[str, float] = {}
        # Each subscription has its own queue and callback task in nats-py, so under a
        # burst a reply's "sent" record can be seen before the command that names its
        # conversation: its time waits here for the command.
        self.sent_early: dict[str, float] = {}
        self.reads = 0
        self.decoder = msgspec.json.Decoder(OutboxRecord)

    async def on_command(self, msg: Msg) -> None:
        event = decode(msg.data)
        if isinstance(event, ApiReply):
            self.command_of[event.command_id] = event.conversation_id
            sent = self.sent_early.pop(event.command_id, None)
            if sent is not None:
                self.finished.setdefault(event.conversation_id, sent)

    async def on_outbox(self, msg: Msg) -> None:
        if not msg.data:
            return
        record = self.decoder.decode(msg.data)
        if record.state == "sent":
            now = time.perf_counter()
            conversation = self.command_of.get(record.command_id)
            if conversation is None:
                self.sent_early.setdefault(record.command_id, now)
            elif conversation not in self.finished:
                self.finished[conversation] = now

    async def on_read(self, msg: Msg) -> None:
        self.reads += 1

    def latencies(self) -> list[float]:
        return [(self.finished[c] - t) * 1000 for c, t in self.posted.items() if c in self.finished]


async def drive(
    url: str, tracker: Tracker, count: int, rate: float | None, concurrency: int = 64
) -> float:
    """POST ``count`` conversations (paced at ``rate``/s, or as fast as possible)."""
    limit = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one(http: aiohttp.ClientSession, n: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        async with limit:
            t0 = time.perf_counter()
            async with http.post(
                f"{url}/v1/messages",
                json={"text": f"bench conversation {n}: count these words"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp:
                body = await resp.json()
                if resp.status != 202:
                    raise RuntimeError(f"{resp.status}: {body}")
            tracker.posted[body["conversation_id"]] = t0

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(one(http, n) for n in range(count)))
    deadline = time.perf_counter() + 60
    while len(tracker.finished) < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    if len(tracker.finished) < count:
        raise RuntimeError(f"only {len(tracker.finished)} of {count} conversations finished")
    return max(tracker.finished.values()) - start


async def bus_counts(monitor: int) -> tuple[int, int, int]:
    """(JetStream API requests, messages stored in all streams, messages clients sent
    the server) so far."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{monitor}/jsz?streams=true") as resp:
            jsz = await resp.json()
        async with http.get(f"http://127.0.0.1:{monitor}/varz") as resp:
            varz = await resp.json()
    stored = sum(
        stream["state"]["last_seq"]
        for account in jsz.get("account_details", [])
        for stream in account.get("stream_detail", [])
    )
    return int(jsz["api"]["total"]), int(stored), int(varz["in_msgs"])


async def watch(nats_url: str) -> tuple[Client, Tracker]:
    """A connection whose tracker sees replies, outbox records and KV reads."""
    nc = await nats.connect(nats_url)
    tracker = Tracker()
    await nc.subscribe("commands.api.>", cb=tracker.on_command)
    await nc.subscribe("$KV.outbox.>", cb=tracker.on_outbox)
    # KV reads are direct gets, which /jsz does not count: count the requests here.
    await nc.subscribe("$JS.API.DIRECT.GET.>", cb=tracker.on_read)
    # The server must have the subscriptions before the first POST: a command it
    # relayed earlier would leave its conversation unfinished in the tracker.
    await nc.flush()
    return nc, tracker


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="podium-bench-"))
    monitor = free_port()
    server = NatsServer(root / "nats", monitor_port=monitor).start()
    procs: list[Process] = []
    try:
        raw_rate = await raw_publish_rate(server.url)
        relay = await raw_relay(server.url, args.rate, args.seconds)

        port = free_port()
        for name in SERVICES:
            extra = {"PODIUM_LOG_LEVEL": "WARNING", "PODIUM_HEALTH_PORT": str(free_port())}
            if name == "ingress":
                extra |= {
                    "PODIUM_PORT": str(port),
                    "PODIUM_HOST": "127.0.0.1",
                    "PODIUM_API_TOKENS": f"bench:{TOKEN}",
                }
            env = base_env(server.url, root, **extra)
            procs.append(Process(name, env, root / "logs").start())
        for p in procs:
            await p.wait_ready(60)
        url = f"http://127.0.0.1:{port}"

        nc, tracker = await watch(server.url)
        await drive(url, tracker, 20, None)  # warm-up: its figures are discarded
        tracker.posted.clear()
        tracker.finished.clear()
        paced_total = int(args.rate * args.seconds)
        await drive(url, tracker, paced_total, args.rate)
        paced = tracker.latencies()
        await nc.close()

        nc, burst_tracker = await watch(server.url)
        api_before, stored_before, in_before = await bus_counts(monitor)
        elapsed = await drive(url, burst_tracker, args.burst, None)
        api_after, stored_after, in_after = await bus_counts(monitor)
        await nc.flush()
        await nc.close()
    finally:
        for p in procs:
            p.stop()
        server.stop()

    result = {
        "conversations_per_s": round(args.burst / elapsed, 1),
        "p50_ms": round(statistics.median(paced), 2),
        "p99_ms": round(percentile(paced, 99), 2),
        "paced_rate_per_s": args.rate,
        "paced_conversations": len(paced),
        "raw_publish_per_s": round(raw_rate, 0),
        "raw_relay_4hop_p50_ms": round(statistics.median(relay), 2),
        "raw_relay_4hop_p99_ms": round(percentile(relay, 99), 2),
    }
    result["loop_over_raw_p50_ms"] = round(result["p50_ms"] - result["raw_relay_4hop_p50_ms"], 2)
    api = (api_after - api_before) / args.burst
    stored = (stored_after - stored_before) / args.burst
    result["js_api_requests_per_conversation"] = round(api, 1)
    result["stored_messages_per_conversation"] = round(stored, 1)
    reads = burst_tracker.reads / args.burst
    result["kv_reads_per_conversation"] = round(reads, 1)
    result["js_round_trips_per_conversation"] = round(api + stored + reads, 1)
    # Everything the services sent the server: publishes, KV reads (direct gets, which
    # /jsz does not count as API requests), fetches, acks, heartbeats.
    result["bus_messages_per_conversation"] = round((in_after - in_before) / args.burst, 1)
    return result


def cli() -> None:
    """Parse arguments, run, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults well below what this machine sustains (about 200 conversations/s in a
    # burst, docs/performance.md), so that the paced run measures latency, not a queue.
    parser.add_argument("--rate", type=float, default=20.0, help="paced conversations per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced run")
    parser.add_argument("--burst", type=int, default=200, help="conversations in the burst run")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(f"{'figure':<28} {'podium':>12} {'raw nats-py':>12}")
    print(f"{'p50 latency (ms)':<28} {result['p50_ms']:>12} {result['raw_relay_4hop_p50_ms']:>12}")
    print(f"{'p99 latency (ms)':<28} {result['p99_ms']:>12} {result['raw_relay_4hop_p99_ms']:>12}")
    print(
        f"{'throughput (per s)':<28} {result['conversations_per_s']:>12} "
        f"{result['raw_publish_per_s']:>12}"
    )
    print("(podium: whole conversations; raw: 4-hop relay latency, single durable publishes/s)")
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    cli()
