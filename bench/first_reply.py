"""Benchmark: the first reply to a new email, CLI spawned per turn vs warm pool vs spares.

    .venv/bin/python bench/first_reply.py [--conversations 10] [--gap-s 3]

One email needing one worker, from the SendGrid webhook POST to the moment a real
SMTP server (aiosmtpd, ``podium.testing.smtp``) receives the reply, with the real
Claude Code CLI (tools/claude, or PODIUM_CLAUDE_BIN) against the project's local
Messages API server (``podium.testing.anthropic``), which answers at once: the
conductor says ``SPAWN_WORKER``, the worker ``Status: COMPLETE`` (no tools), the
conductor ``REPLY``. So the figures are the CLI's start-ups and Podium's own
overhead: three agent turns, five hops. Three setups in one run, each on a fresh
nats-server, SMTP server and platform (the four services as processes):

* ``spawn``: ``PODIUM_AGENT_POOL_SIZE=0``: ``claude -p`` per turn (the seed's pattern);
* ``warm``: ``PODIUM_AGENT_SPARES=0``: the warm pool, a new session waits for a start-up;
* ``spares``: ``PODIUM_AGENT_SPARES=1``: a new conversation or task adopts a CLI
  process started ahead (the default).

Each setup sends one untimed warm-up email, then ``--conversations`` new ones (a
new thread each), one at a time, and the same ``--gap-s`` pause before each in
every setup: emails arrive spaced apart, and a spare's replacement (about a second
of CPU) has started by the next one. A conversation's time therefore holds the
CLI start-ups it waits for, not the refills it sets off in the background (they
do compete for the CPU with the rest of that conversation). Sessions stay warm
after their reply, so once the pool (or the agents' memory budget) is full, each
new session evicts the least recently used idle one, in ``warm`` and ``spares``
alike, as in a busy deployment.

Prints a table (median, p10, p90, min, max per setup), what the agent turns cost
by role and mode (cold: a process started; warm; spare: adopted) read from the
services' metrics, spares adopted and warm sessions evicted read from their logs,
and the resident memory of the CLI processes left alive. The last line is one
JSON object with ``spawn_ms``, ``warm_ms``, ``spares_ms`` (medians) and ``ratio``
= spares / warm (target: at most 0.4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from podium.cli.natsserver import NatsServer
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from podium.testing.claude import claude_binary
from podium.testing.platform import Platform
from podium.testing.smtp import SmtpServer

ROOT = Path(__file__).resolve().parent.parent
WORKER_ROLE = "You are a Podium worker agent"
SETUPS: dict[str, dict[str, str]] = {
    "spawn": {"PODIUM_AGENT_POOL_SIZE": "0", "PODIUM_AGENT_SPARES": "0"},
    "warm": {"PODIUM_AGENT_SPARES": "0"},
    "spares": {"PODIUM_AGENT_SPARES": "1"},
}
AGENT_SERVICES = ("conductor", "worker")


def claude_bin() -> str:
    """The CLI to measure (``PODIUM_CLAUDE_BIN``, else the pinned one)."""
    found = claude_binary()
    if found is None:
        sys.exit("the Claude Code CLI is missing: run `make setup` (npm ci in tools/claude)")
    return found


def respond(call: MessagesCall) -> Reply:
    """The model: the conductor delegates, the worker completes, the conductor replies."""
    if WORKER_ROLE in call.system:
        return Reply.text(
            "Status: COMPLETE\nSummary: Counted the words\nDetails:\nThe email has five words."
        )
    if "[WORKER:" in call.last_user_text:
        return Reply.text("The worker did it.\nREPLY: Your email has five words.")
    return Reply.text("I will delegate this.\n\nSPAWN_WORKER: Count the words of the email")


class Arrivals(list[EmailMessage]):
    """The SMTP server's record of messages, each timed as it arrives (in the server's
    thread; appends are atomic, the benchmark only reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, message: EmailMessage) -> None:
        """Keep ``message`` and when it arrived."""
        self.times.append(time.perf_counter())
        super().append(message)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, nearest rank."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def agent_turns(platform: Platform) -> dict[tuple[str, str], tuple[int, float]]:
    """(role, mode) → (turns, seconds) so far, from ``podium_agent_turn_seconds``."""
    found: dict[tuple[str, str], tuple[int, float]] = {}
    for name in AGENT_SERVICES:
        for family in text_string_to_metric_families(await platform.metrics(name)):
            for sample in family.samples:
                if not sample.name.startswith("podium_agent_turn_seconds_"):
                    continue
                key = (sample.labels["role"], sample.labels["mode"])
                count, total = found.get(key, (0, 0.0))
                if sample.name.endswith("_count"):
                    count += int(sample.value)
                elif sample.name.endswith("_sum"):
                    total += sample.value
                found[key] = (count, total)
    return found


def log_events(platform: Platform, messages: tuple[str, ...]) -> Counter[str]:
    """How often each of ``messages`` was logged, as ``service: message``."""
    found: Counter[str] = Counter()
    for name in AGENT_SERVICES:
        for line in platform.processes[name].log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("msg") in messages:
                found[f"{name}: {entry['msg']}"] += 1
    return found


def cli_memory(platform: Platform) -> tuple[int, float]:
    """(CLI processes alive, their resident memory in MB): each process the agent
    services started, with its descendants (shared pages counted in each)."""
    count, total = 0, 0
    for name in AGENT_SERVICES:
        proc = platform.processes[name].proc
        if proc is None:
            continue
        for child in psutil.Process(proc.pid).children():
            try:
                tree = [child, *child.children(recursive=True)]
                total += sum(p.memory_info().rss for p in tree)
                count += 1
            except psutil.NoSuchProcess:
                continue
    return count, total / 2**20


@dataclass
class Outcome:
    """What one setup measured."""

    times_ms: list[float]
    turns: dict[tuple[str, str], tuple[int, float]]
    events: Counter[str]
    live: int
    rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


async def run_setup(
    name: str, env: dict[str, str], base: Path, api: FakeAnthropic, args: argparse.Namespace
) -> Outcome:
    """The warm-up and the timed conversations on a fresh platform."""
    root = base / name
    server = NatsServer(root / "nats").start()
    smtp = SmtpServer().start()
    arrivals = Arrivals()
    smtp.recorder.messages = arrivals
    platform = Platform(
        server.url,
        root,
        env={
            "PODIUM_AGENT": "claude",
            "PODIUM_CLAUDE_BIN": claude_bin(),
            "ANTHROPIC_BASE_URL": api.base_url,
            "ANTHROPIC_API_KEY": "sk-bench-not-a-real-key",
            "PODIUM_AGENT_TIMEOUT_S": "60",
            "PODIUM_LOG_LEVEL": "INFO",
            **env,
        },
        per_service={
            "notifier": {
                "PODIUM_EMAIL_TRANSPORT": "smtp",
                "PODIUM_SMTP_HOST": "127.0.0.1",
                "PODIUM_SMTP_PORT": str(smtp.port),
                "PODIUM_SMTP_SECURITY": "none",
            }
        },
    ).start()
    times: list[float] = []
    try:
        await platform.ready(120)
        before: dict[tuple[str, str], tuple[int, float]] = {}
        for n in range(args.conversations + 1):
            if n == 1:
                before = await agent_turns(platform)
            # The same pause before every email in every setup (the first one too:
            # spares start with the services).
            await asyncio.sleep(args.gap_s)
            message_id = f"<bench-{name}-{n}@example.com>"
            started = time.perf_counter()
            await platform.email(
                f"Sender {n} <sender{n}@example.com>",
                f"Question {n}",
                "Please count the words of this email.",
                message_id=message_id,
            )
            deadline = started + args.timeout_s
            while len(arrivals) <= n:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{name}: no reply to email {n}\n{platform.logs()}")
                await asyncio.sleep(0.005)
            reply = arrivals[n]
            if reply["In-Reply-To"] != message_id:
                raise RuntimeError(f"{name}: reply {n} answers {reply['In-Reply-To']}")
            took = (arrivals.times[n] - started) * 1000
            if n > 0:
                times.append(took)
            label = "warm-up" if n == 0 else f"#{n}"
            print(f"{name} {label}: {took:.0f} ms", file=sys.stderr, flush=True)
        after = await agent_turns(platform)
        await asyncio.sleep(args.gap_s)  # refills done, as before each email
        live, rss = cli_memory(platform)
        events = log_events(platform, ("spare adopted", "spare dropped", "evicting warm session"))
    finally:
        platform.stop()
        smtp.stop()
        server.stop()
    turns = {
        key: (count - before.get(key, (0, 0.0))[0], total - before.get(key, (0, 0.0))[1])
        for key, (count, total) in after.items()
    }
    return Outcome(times, {k: v for k, v in turns.items() if v[0]}, events, live, rss)


async def main(args: argparse.Namespace) -> dict[str, Outcome]:
    base = Path(tempfile.mkdtemp(prefix="podium-bench-first-reply-"))
    outcomes: dict[str, Outcome] = {}
    try:
        async with FakeAnthropic(respond) as api:
            for name, env in SETUPS.items():
                outcomes[name] = await run_setup(name, env, base, api, args)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"platform roots kept in {base}")
    return outcomes


def report(outcomes: dict[str, Outcome]) -> dict[str, Any]:
    """Print the tables; the JSON result."""
    print(f"{'setup':<8} {'n':>3} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8} {'max':>8}  (ms)")
    for name, o in outcomes.items():
        t = o.times_ms
        print(
            f"{name:<8} {len(t):>3} {statistics.median(t):>8.0f} {percentile(t, 10):>8.0f} "
            f"{percentile(t, 90):>8.0f} {min(t):>8.0f} {max(t):>8.0f}"
        )
    print()
    print("agent turns in the timed conversations (role, mode: turns, mean ms)")
    for name, o in outcomes.items():
        parts = [
            f"{role} {mode}: {count} x {total / count * 1000:.0f}"
            for (role, mode), (count, total) in sorted(o.turns.items())
        ]
        print(f"{name:<8} " + "; ".join(parts))
    print()
    print("service log events over the whole setup (warm-up included)")
    for name, o in outcomes.items():
        print(f"{name:<8} " + ("; ".join(f"{k}: {v}" for k, v in sorted(o.events.items())) or "-"))
    print()
    print(f"{'setup':<8} {'live CLIs':>9} {'RSS MB':>8} {'MB each':>8}  (after the last reply)")
    for name, o in outcomes.items():
        each = f"{o.rss_mb / o.live:.0f}" if o.live else "-"
        print(f"{name:<8} {o.live:>9} {o.rss_mb:>8.0f} {each:>8}")
    medians = {name: statistics.median(o.times_ms) for name, o in outcomes.items()}
    live = sum(o.live for o in outcomes.values())
    rss = sum(o.rss_mb for o in outcomes.values())
    result: dict[str, Any] = {
        "spawn_ms": round(medians["spawn"]),
        "warm_ms": round(medians["warm"]),
        "spares_ms": round(medians["spares"]),
        "ratio": round(medians["spares"] / medians["warm"], 2),
        "n": min(len(o.times_ms) for o in outcomes.values()),
    }
    if live:
        result["rss_mb_per_process"] = round(rss / live, 1)
    return result


def cli() -> None:
    """Parse arguments, run, print the tables and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--conversations", type=int, default=10, help="timed conversations per setup"
    )
    parser.add_argument(
        "--gap-s", type=float, default=3.0, help="pause before each email (every setup)"
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="longest wait for a reply")
    parser.add_argument("--keep", action="store_true", help="keep the platform roots (logs)")
    args = parser.parse_args()
    if args.conversations < 1:
        parser.error("--conversations must be at least 1")
    result = report(asyncio.run(main(args)))
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    cli()
