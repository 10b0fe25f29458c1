"""Benchmark: one long SMS conversation through the real conductor, with and without rotation.

    .venv/bin/python bench/long_conversation.py [--messages 200]
        [--rotate-turns N] [--rotate-input-tokens N]

Issue 17. The whole platform runs as processes (``PODIUM_AGENT=claude``, the real
Claude Code CLI) against a local Messages API server (``podium.testing.anthropic``)
that answers every conductor turn with ``REPLY: …``. ``--messages`` inbound SMS go,
one after another, from one number to one number (one conversation) through the
ingress's signed Twilio webhook; each waits for its reply in the notifier's outbox,
so every turn sees the ones before it.

The API server reports a realistic ``usage``: a request's input tokens are its size
(system prompt, messages and tools as JSON) in characters // 4, like its own
``count_tokens``. So the CLI reports real-looking usage to the conductor (which
token-based rotation acts on), and that same number, per conductor request, is the
input size this benchmark records. Conductor requests are recognised by the
conductor's role prompt in their system prompt; the CLI's auxiliary calls and any
other request are counted apart.

Two runs, each on its own nats-server and services: *rotated* (the conductor's
defaults, or ``--rotate-turns`` / ``--rotate-input-tokens`` as the variables its
settings read for them, ``PODIUM_ROTATE_TURNS`` / ``PODIUM_ROTATE_INPUT_TOKENS``)
and *unrotated* (both 0). Rotations are read from the conductor's
``podium_conductor_session_rotations_total``; the CLI session ids the API server saw
give a second count. Prints a table, then as its last line one JSON object with
``input_turn_1``, ``input_turn_50``, ``input_turn_200`` (those within
``--messages``), ``rotations``, ``total_input`` and ``total_input_unrotated``, and
extras: the unrotated run's turn figures, ``sessions``, requests per turn, wall
times. Target: ``input_turn_200`` <= 3 x ``input_turn_1``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from podium.cli.natsserver import NatsServer
from podium.common.config import env_names
from podium.conductor.config import ConductorSettings
from podium.conductor.prompts import ROLE
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply, Usage
from podium.testing.claude import claude_binary
from podium.testing.platform import Platform

ROOT = Path(__file__).resolve().parent.parent
#: The conductor's role prompt opens with this line; a request carrying it is the conductor's.
CONDUCTOR = ROLE.splitlines()[0]
WORKER = "You are a Podium worker agent"
ROTATIONS = "podium_conductor_session_rotations_total"
TWILIO_TOKEN = "bench-twilio-auth-token-0123456789"
ACCOUNT = "AC0123456789abcdef0123456789abcdef"
PUBLIC = "https://podium.example.com"
PHONE = "+15550100001"
OURS = "+15550100999"
CHECKPOINTS = (1, 50, 100, 150, 200)
#: The conductor's settings that bound a session: its turns, its latest turn's input tokens.
ROTATE = ("rotate_turns", "rotate_input_tokens")
TURN_TIMEOUT_S = 240.0


def claude_bin() -> str:
    """The CLI to measure (``PODIUM_CLAUDE_BIN``, else the pinned one)."""
    found = claude_binary()
    if found is None:
        sys.exit("the Claude Code CLI is missing: run `make setup` (npm ci in tools/claude)")
    return found


def rotation_settings() -> dict[str, tuple[str, Any]]:
    """``{setting: (variable, default)}`` of the conductor's two rotation bounds."""
    fields = {spec.name: spec for spec in msgspec.structs.fields(ConductorSettings)}
    return {
        name: (env_names(ConductorSettings, fields[name])[0], fields[name].default)
        for name in ROTATE
    }


def input_size(call: MessagesCall) -> int:
    """A request's input in tokens: its system prompt, messages and tools as JSON, // 4."""
    body = [call.raw.get("system"), call.raw.get("messages"), call.raw.get("tools")]
    return max(1, len(json.dumps(body)) // 4)


def inbound_text(n: int) -> str:
    """The n-th message (1-based): an ordinary SMS of about 100 characters."""
    return (
        f"Msg {n}: thanks for the update. Could you remind me what we said about "
        f"item {n} and when it is due?"
    )


def reply_text(n: int) -> str:
    """The conductor's answer to the n-th message."""
    return f"REPLY: Item {n} is noted; it is due next week, as agreed. Anything else?"


@dataclass
class Run:
    """What the API server saw of one run."""

    label: str
    env: dict[str, str]
    turn: int = 0
    #: Input size of each conductor request, by turn (1-based).
    inputs: dict[int, list[int]] = field(default_factory=dict)
    #: Conductor requests that came while no turn was open.
    stray: list[int] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    auxiliary: int = 0
    other: int = 0
    turn_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rotations: float = 0.0
    #: The rotation bounds its conductor goes by (None: its default, unknown here).
    bounds: dict[str, Any] = field(default_factory=dict)

    def record(self, call: MessagesCall, size: int) -> None:
        """Note one conductor request of the current turn."""
        if self.turn:
            self.inputs.setdefault(self.turn, []).append(size)
        else:
            self.stray.append(size)
        session = call.session_id or ""
        if session not in self.sessions:
            self.sessions.append(session)

    def turn_input(self, n: int) -> int:
        """Input of turn n: all its conductor requests."""
        return sum(self.inputs.get(n, []))

    @property
    def total_input(self) -> int:
        """Input of every conductor request of the run."""
        return sum(sum(sizes) for sizes in self.inputs.values()) + sum(self.stray)

    @property
    def requests(self) -> int:
        """Conductor requests of the run."""
        return sum(len(sizes) for sizes in self.inputs.values()) + len(self.stray)


class Conductor:
    """The fake model: ``REPLY`` to every conductor turn; records each request's input."""

    def __init__(self) -> None:
        self.run: Run | None = None

    def __call__(self, call: MessagesCall) -> Reply:
        size = input_size(call)
        run = self.run
        if run is None or CONDUCTOR not in call.system or WORKER in call.system:
            if run is not None:
                run.other += 1
            return Reply.text("NO_ACTION: not a conductor turn", usage=Usage(input_tokens=size))
        run.record(call, size)
        text = reply_text(run.turn)
        return Reply.text(text, usage=Usage(input_tokens=size, output_tokens=len(text) // 4))


async def send_sms(http: aiohttp.ClientSession, platform: Platform, n: int) -> None:
    """Message n through the ingress's Twilio webhook, signed over the public URL."""
    form = {
        "MessageSid": f"SM{n:032x}",
        "AccountSid": ACCOUNT,
        "From": PHONE,
        "To": OURS,
        "Body": inbound_text(n),
        "NumMedia": "0",
    }
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(
        f"{PUBLIC}/webhooks/twilio/sms", form
    )
    async with http.post(
        f"{platform.url}/webhooks/twilio/sms",
        data=form,
        headers={"X-Twilio-Signature": signature},
    ) as resp:
        if resp.status != 200:
            raise RuntimeError(f"message {n}: {resp.status} {await resp.text()}")


async def wait_reply(platform: Platform, n: int) -> dict[str, Any]:
    """The n-th reply in the outbox, once there."""
    deadline = time.monotonic() + TURN_TIMEOUT_S
    while time.monotonic() < deadline:
        found = platform.outbox()
        if len(found) >= n:
            reply = found[n - 1]
            expected = reply_text(n).removeprefix("REPLY: ")
            if reply["channel"] != "sms" or reply["to"] != [PHONE] or reply["body"] != expected:
                raise RuntimeError(f"reply {n} is not the expected one: {reply}")
            return reply
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no reply to message {n}\n{platform.logs()}")


async def rotations(platform: Platform) -> float:
    """podium_conductor_session_rotations_total, all reasons (0 when not exported)."""
    text = await platform.metrics("conductor")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == ROTATIONS
    )


async def conversation(
    run: Run, api: FakeAnthropic, model: Conductor, messages: int, root: Path
) -> None:
    """One run: its own nats-server and platform, ``messages`` SMS one after another."""
    nats = NatsServer(root / "nats").start()
    platform = Platform(
        nats.url,
        root,
        env={
            "PODIUM_AGENT": "claude",
            "PODIUM_CLAUDE_BIN": claude_bin(),
            "ANTHROPIC_BASE_URL": api.base_url,
            "ANTHROPIC_API_KEY": "sk-bench-not-a-real-key",
            "PODIUM_LOG_LEVEL": "INFO",
            # One conversation answers every message: lift its hourly and spend limits.
            "PODIUM_MAX_OUTBOUND_PER_HOUR": "100000",
            "PODIUM_MAX_SPEND_USD": "1000000",
            **run.env,
        },
        per_service={
            "ingress": {
                "PODIUM_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
                "PODIUM_PUBLIC_URL": PUBLIC,
            }
        },
    )
    model.run = run
    calls_before = len(api.calls)
    try:
        await platform.start().ready(120)
        started = time.perf_counter()
        async with aiohttp.ClientSession() as http:
            for n in range(1, messages + 1):
                run.turn = n
                t0 = time.perf_counter()
                await send_sms(http, platform, n)
                await wait_reply(platform, n)
                run.turn_s.append(time.perf_counter() - t0)
                run.turn = 0
        run.seconds = time.perf_counter() - started
        run.rotations = await rotations(platform)
    finally:
        model.run = None
        platform.stop()
        nats.stop()
    run.auxiliary = sum(c.is_auxiliary for c in api.calls[calls_before:])


def turn_figures(run: Run, messages: int, suffix: str = "") -> dict[str, Any]:
    """input_turn_<n> for the checkpoints within ``messages`` and the last turn."""
    turns = sorted({n for n in CHECKPOINTS if n <= messages} | {messages})
    return {f"input_turn_{n}{suffix}": run.turn_input(n) for n in turns}


async def main(args: argparse.Namespace) -> tuple[dict[str, Any], list[Run]]:
    settings = rotation_settings()
    given = {"rotate_turns": args.rotate_turns, "rotate_input_tokens": args.rotate_input_tokens}
    rotated_env = {settings[k][0]: str(v) for k, v in given.items() if v is not None}
    off = {variable: "0" for variable, _ in settings.values()}
    runs = [Run("rotated", rotated_env), Run("unrotated", off)]
    # What each run's conductor goes by: the values given, else its defaults; 0 = never.
    runs[0].bounds = {k: given[k] if given[k] is not None else settings[k][1] for k in ROTATE}
    runs[1].bounds = dict.fromkeys(ROTATE, 0)
    root = Path(tempfile.mkdtemp(prefix="podium-long-conversation-"))
    model = Conductor()
    try:
        async with FakeAnthropic(model) as api:
            for index, run in enumerate(runs):
                # Directories of equal length: their paths are part of the system prompt.
                await conversation(run, api, model, args.messages, root / f"run{index}")
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    rotated, unrotated = runs
    if unrotated.rotations or len(unrotated.sessions) > 1:
        print(
            f"warning: the run with {off} still began new sessions "
            f"({int(unrotated.rotations)} rotations, {len(unrotated.sessions)} sessions)",
            file=sys.stderr,
        )
    last = args.messages
    first = rotated.turn_input(1)
    result: dict[str, Any] = {
        **turn_figures(rotated, last),
        "rotations": int(rotated.rotations),
        "total_input": rotated.total_input,
        "total_input_unrotated": unrotated.total_input,
        **turn_figures(unrotated, last, "_unrotated"),
        "input_turn_max": max(rotated.turn_input(n) for n in range(1, last + 1)),
        "growth": round(rotated.turn_input(last) / max(1, first), 2),
        "growth_unrotated": round(unrotated.turn_input(last) / max(1, unrotated.turn_input(1)), 2),
        "target_met": rotated.turn_input(last) <= 3 * first,
        "input_per_turn_unrotated": round(
            (unrotated.turn_input(last) - unrotated.turn_input(1)) / max(1, last - 1), 1
        ),
        "messages": last,
        "rotations_unrotated": int(unrotated.rotations),
        "sessions": len(rotated.sessions),
        "sessions_unrotated": len(unrotated.sessions),
        "requests_per_turn": round(rotated.requests / last, 2),
        "requests_per_turn_unrotated": round(unrotated.requests / last, 2),
        "stray_requests": len(rotated.stray) + len(unrotated.stray),
        "auxiliary_requests": rotated.auxiliary + unrotated.auxiliary,
        "other_requests": rotated.other + unrotated.other,
        "seconds": round(rotated.seconds, 1),
        "seconds_unrotated": round(unrotated.seconds, 1),
        **rotated.bounds,
    }
    return result, runs


def table(runs: list[Run], messages: int) -> None:
    """Input per checkpoint turn, rotations, totals and wall time of both runs."""
    turns = sorted({n for n in CHECKPOINTS if n <= messages} | {messages})
    print(f"{'figure':<28} " + " ".join(f"{r.label:>12}" for r in runs))
    rows: dict[str, list[Any]] = {
        "rotate after turns": [r.bounds.get("rotate_turns") for r in runs],
        "rotate past input tokens": [r.bounds.get("rotate_input_tokens") for r in runs],
    }
    rows |= {f"input, turn {n} (tokens)": [r.turn_input(n) for r in runs] for n in turns}
    rows |= {
        "rotations": [int(r.rotations) for r in runs],
        "CLI sessions seen": [len(r.sessions) for r in runs],
        "conductor requests": [r.requests for r in runs],
        "total input (tokens)": [r.total_input for r in runs],
        "wall time (s)": [round(r.seconds, 1) for r in runs],
        "first turn (s)": [round(r.turn_s[0], 2) for r in runs],
        "turn, median (s)": [round(statistics.median(r.turn_s), 2) for r in runs],
        "last turn (s)": [round(r.turn_s[-1], 2) for r in runs],
    }
    for name, values in rows.items():
        print(f"{name:<28} " + " ".join(f"{v!s:>12}" for v in values))


def cli() -> None:
    """Parse arguments, run, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="inbound SMS in the conversation")
    settings = rotation_settings()
    for name in ROTATE:
        variable, default = settings[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"{variable} of the rotated run (default: the conductor's, {default})",
        )
    parser.add_argument("--keep", action="store_true", help="keep the runs' logs and state")
    args = parser.parse_args()
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    result, runs = asyncio.run(main(args))
    table(runs, args.messages)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    cli()
