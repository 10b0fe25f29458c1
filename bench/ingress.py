"""Benchmark: signed Twilio SMS webhooks against the ingress, beside a bare aiohttp handler.

    .venv/bin/python bench/ingress.py [--seconds 10] [--rounds 3] [--connections 32]

Starts its own nats-server, then in the same run, with the same load generator
(wrk from Debian's packages; an asyncio client when wrk is missing):

1. bare: an aiohttp handler that only parses the form and answers TwiML — the
   ceiling any Python webhook on this machine can reach;
2. publish-only: the same handler plus one durable ``js.publish`` of the body
   per request (the design card's "parse + durable publish" figure): what any
   webhook that stores durably with nats-py must pay; the ingress publishes the
   same way, so ingress ÷ publish-only is Podium's own cost on top;
3. ingress: ``python -m podium.ingress`` as deployed — X-Twilio-Signature
   checked over the public URL, opt-out keywords looked at, the event stored
   durably in JetStream (``Nats-Msg-Id`` from the MessageSid, so de-duplication
   is on) before the 200, at log level INFO.

The three servers run side by side and are loaded in turn, ``--rounds`` times
(bare, publish-only, ingress, bare, …): on a machine whose speed drifts (a
shared VM) the drift weighs on all three alike, and each figure is the median
of its rounds. Every request carries a distinct, validly signed MessageSid.
Prints a table,
then as its last line one JSON object with ``ingress_rps``, ``bare_rps``,
``ratio`` (ingress ÷ bare), ``ratio_to_publish_only`` (ingress ÷ publish-only;
the target is 0.8 or more) and ``p99_ms`` (the ingress's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import nats
import uvloop
from aiohttp import web

from podium.cli.natsserver import NatsServer, free_port
from podium.common import provision
from podium.ingress.auth import twilio_signature
from podium.testing.services import Process, base_env

TOKEN = "bench-twilio-auth-token-0123456789"
PUBLIC = "https://podium.example.com"
PATH = "/webhooks/twilio/sms"
BASELINE_SUBJECT = "inbound.sms.bench"
TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

WRK_SCRIPT = """
local lines = {}
local offset = 0
local i = 0
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end
function init(args)
  for line in io.lines(args[1]) do
    lines[#lines + 1] = line
  end
  offset = tonumber(args[3]) + (id - 1) * tonumber(args[4])
end
function request()
  i = i + 1
  local line = lines[(offset + i) % #lines + 1]
  local tab = string.find(line, "\\t", 1, true)
  return wrk.format("POST", "{path}", {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["X-Twilio-Signature"] = string.sub(line, 1, tab - 1),
  }, string.sub(line, tab + 1))
end
"""


def requests_file(path: Path, n: int, senders: int = 1000) -> None:
    """``n`` signed webhook requests, one per line: ``signature<TAB>form body``.

    Every request has its own MessageSid; ``senders`` distinct numbers write, so
    the messages spread over that many conversations (subjects).
    """
    url = PUBLIC + PATH
    with path.open("w") as out:
        for i in range(n):
            form = {
                "ToCountry": "US",
                "SmsMessageSid": f"SM{i:032x}",
                "NumMedia": "0",
                "SmsSid": f"SM{i:032x}",
                "SmsStatus": "received",
                "Body": f"Please book the meeting room for Tuesday ({i})",
                "To": "+15550100999",
                "NumSegments": "1",
                "MessageSid": f"SM{i:032x}",
                "AccountSid": "AC" + "0" * 32,
                "From": f"+1555{i % senders:07d}",
                "ApiVersion": "2010-04-01",
            }
            signature = twilio_signature(TOKEN, url, form.items())
            out.write(f"{signature}\t{urlencode(form)}\n")


def bare_server(port: int, nats_url: str = "") -> None:
    """The baseline: parse the form, answer TwiML. Nothing else.

    With ``nats_url``, also the design card's second figure: the same handler
    plus one durable ``js.publish`` per request (no signature, no event, no logs).
    """
    js: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        form = await request.post()
        sid = form.get("MessageSid")
        if not sid:
            return web.Response(status=400)
        if js:
            await js[0].publish(
                BASELINE_SUBJECT, await request.read(), headers={"Nats-Msg-Id": str(sid)}
            )
        return web.Response(text=TWIML, content_type="text/xml")

    async def connect(app: web.Application) -> AsyncIterator[None]:
        if nats_url:
            nc = await nats.connect(nats_url)
            js.append(nc.jetstream())
        yield
        if js:
            await js[0]._nc.close()  # noqa: SLF001

    app = web.Application()
    app.router.add_post(PATH, handle)
    app.cleanup_ctx.append(connect)
    # The same event loop as the services (uvloop), so the comparison is like for like.
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


async def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listens on {port}")


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p99 latency (ms) and non-2xx count from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    found = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    p99 = float("nan")
    if found:
        p99 = float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors:.*", output)
    return {
        "rps": rps,
        "p99_ms": p99,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }


def run_wrk(
    port: int, lines: Path, script: Path, args: argparse.Namespace, start: int
) -> dict[str, float]:
    command = [
        "wrk",
        "-t2",
        f"-c{args.connections}",
        f"-d{args.seconds}s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}",
        "--",
        str(lines),
        "2",
        str(start),
        str(args.stride),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    return parse_wrk(done.stdout)


async def run_asyncio_client(
    port: int, lines: Path, args: argparse.Namespace, start: int
) -> dict[str, float]:
    """Fallback load generator (slower than wrk: expect a lower ceiling)."""
    entries = [line.rstrip("\n").split("\t", 1) for line in lines.open()]
    latencies: list[float] = []
    errors = 0
    index = start
    deadline = time.monotonic() + args.seconds
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal index, errors
            while time.monotonic() < deadline:
                signature, body = entries[index % len(entries)]
                index += 1
                started = time.perf_counter()
                async with http.post(
                    f"http://127.0.0.1:{port}{PATH}",
                    data=body,
                    headers={
                        "Content-Type": "application/x-www-form-urlencoded",
                        "X-Twilio-Signature": signature,
                    },
                ) as resp:
                    await resp.read()
                    errors += resp.status != 200
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.connections)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "non_2xx": float(errors),
        "socket_errors": 0.0,
    }


async def measure(
    port: int, lines: Path, script: Path, args: argparse.Namespace, start: int = 0
) -> dict[str, float]:
    """One load phase; ``start`` is where in the request file it begins, so every
    phase sends MessageSids no earlier phase sent (no duplicates)."""
    if shutil.which("wrk"):
        return await asyncio.to_thread(run_wrk, port, lines, script, args, start)
    return await run_asyncio_client(port, lines, args, start)


async def inbound_count(url: str, exclude: str) -> int:
    """Messages in INBOUND, less those on ``exclude`` (the publish-only baseline's)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        total = (await js.stream_info("INBOUND")).state.messages
        theirs = await js.stream_info("INBOUND", subjects_filter=exclude)
        return int(total) - sum((theirs.state.subjects or {}).values())
    finally:
        await nc.close()


async def start_baseline(port: int, nats_url: str) -> asyncio.subprocess.Process:
    extra = ["--nats", nats_url] if nats_url else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--bare-server",
        str(port),
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_port(port)
    return proc


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="podium-bench-ingress-"))
    lines = root / "requests.txt"
    script = root / "twilio.lua"
    requests_file(lines, args.messages, args.senders)
    script.write_text(WRK_SCRIPT.replace("{path}", PATH))
    generator = "wrk" if shutil.which("wrk") else "asyncio"
    print(
        f"load generator: {generator}, {args.connections} connections, "
        f"{args.rounds} rounds of {args.seconds}s per server"
    )

    server = NatsServer(root / "jetstream").start()
    nc = await nats.connect(server.url)
    await provision.provision(nc.jetstream())
    await nc.close()
    ports = {"bare": free_port(), "publish-only": free_port(), "ingress": free_port()}
    env = base_env(
        server.url,
        root,
        PODIUM_API_TOKENS="bench:bench-token-0123456789abcdef",
        PODIUM_TWILIO_AUTH_TOKEN=TOKEN,
        PODIUM_PUBLIC_URL=PUBLIC,
        PODIUM_PORT=str(ports["ingress"]),
        PODIUM_LOG_LEVEL="INFO",
    )
    baselines = [
        await start_baseline(ports["bare"], ""),
        await start_baseline(ports["publish-only"], server.url),
    ]
    ingress = Process("ingress", env, root / "logs").start()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    try:
        await ingress.wait_ready()
        await wait_port(ports["ingress"])
        # All three servers run throughout, idle while another is measured; the phases
        # alternate (bare, publish-only, ingress, bare, …) so that a machine whose speed
        # drifts — a shared VM — weighs on all three alike, and each figure is a median.
        # Each publishing phase gets its own slice of the request file (each wrk thread
        # half of it): no MessageSid is sent twice, so nothing is a duplicate.
        step = args.messages // (args.rounds * 2)
        args.stride = step // 2
        phase = 0
        for _ in range(args.rounds):
            for name, port in ports.items():
                start = 0 if name == "bare" else phase * step
                rounds[name].append(await measure(port, lines, script, args, start))
                phase += name != "bare"
        stored = await inbound_count(server.url, exclude=BASELINE_SUBJECT + ".>")
    finally:
        ingress.stop()
        for proc in baselines:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    ratios = [i["rps"] / b["rps"] for i, b in zip(rounds["ingress"], rounds["bare"], strict=True)]
    ratio = median("ingress", "rps") / median("bare", "rps")
    to_publish_only = median("ingress", "rps") / median("publish-only", "rps")
    print(f"{'':14} {'req/s (median)':>15} {'each round':>28} {'p99 ms':>8} {'non-2xx':>8}")
    for name in ports:
        each = " ".join(f"{r['rps']:>8,.0f}" for r in rounds[name])
        non_2xx = sum(int(r["non_2xx"]) for r in rounds[name])
        print(
            f"{name:14} {median(name, 'rps'):>15,.0f} {each:>28} "
            f"{median(name, 'p99_ms'):>8.2f} {non_2xx:>8}"
        )
    print(
        f"stored in INBOUND: {stored:,}   ratio ingress/bare: {ratio:.2f} "
        f"(per round: {' '.join(f'{r:.2f}' for r in ratios)})   "
        f"ingress/publish-only: {to_publish_only:.2f}"
    )
    return {
        "ingress_rps": round(median("ingress", "rps"), 1),
        "bare_rps": round(median("bare", "rps"), 1),
        "ratio": round(ratio, 3),
        "ratio_to_publish_only": round(to_publish_only, 3),
        "p99_ms": round(median("ingress", "p99_ms"), 2),
        "bare_p99_ms": round(median("bare", "p99_ms"), 2),
        "publish_only_rps": round(median("publish-only", "rps"), 1),
        "round_ratios": [round(r, 3) for r in ratios],
        "ingress_non_2xx": sum(int(r["non_2xx"]) for r in rounds["ingress"]),
        "stored": stored,
        "connections": args.connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "generator": generator,
        "cpus": os.cpu_count(),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--senders", type=int, default=1000)
    parser.add_argument("--bare-server", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--nats", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server, args.nats)
        return
    result = asyncio.run(main(args))
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
