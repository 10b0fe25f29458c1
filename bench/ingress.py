"""Benchmark: signed Twilio SMS webhooks against the ingress, beside a bare aiohttp handler.

    .venv/bin/python bench/ingress.py [--seconds 10] [--connections 32] [--messages 200000]

Starts its own nats-server, then in the same run, with the same load generator
(wrk from Debian's packages; an asyncio client when wrk is missing):

1. bare: an aiohttp handler that only parses the form and answers TwiML — the
   ceiling any Python webhook on this machine can reach;
2. publish-only: the same handler plus one durable ``js.publish`` of the body
   per request (the design card's "parse + durable publish" figure), for scale;
3. ingress: ``python -m podium.ingress`` as deployed — X-Twilio-Signature
   checked over the public URL, opt-out keywords looked at, the event stored
   durably in JetStream (``Nats-Msg-Id`` from the MessageSid, so de-duplication
   is on) before the 200, at log level INFO.

Every request carries a distinct, validly signed MessageSid. Prints a table,
then as its last line one JSON object with ``ingress_rps``, ``bare_rps``,
``ratio`` and ``p99_ms`` (the ingress's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
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
from podium.common import streams
from podium.ingress.parsing import twilio_signature
from podium.testing.services import Process, base_env

TOKEN = "bench-twilio-auth-token-0123456789"
PUBLIC = "https://podium.example.com"
PATH = "/webhooks/twilio/sms"
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
  offset = (id - 1) * math.floor(#lines / tonumber(args[2]))
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
                "inbound.sms.bench", await request.read(), headers={"Nats-Msg-Id": str(sid)}
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


def run_wrk(port: int, lines: Path, script: Path, args: argparse.Namespace) -> dict[str, float]:
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
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    return parse_wrk(done.stdout)


async def run_asyncio_client(port: int, lines: Path, args: argparse.Namespace) -> dict[str, float]:
    """Fallback load generator (slower than wrk: expect a lower ceiling)."""
    entries = [line.rstrip("\n").split("\t", 1) for line in lines.open()]
    latencies: list[float] = []
    errors = 0
    index = 0
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
    port: int, lines: Path, script: Path, args: argparse.Namespace
) -> dict[str, float]:
    if shutil.which("wrk"):
        return await asyncio.to_thread(run_wrk, port, lines, script, args)
    return await run_asyncio_client(port, lines, args)


async def purge_inbound(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream("INBOUND")
    finally:
        await nc.close()


async def inbound_count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("INBOUND")
        return int(info.state.messages)
    finally:
        await nc.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="podium-bench-ingress-"))
    lines = root / "requests.txt"
    script = root / "twilio.lua"
    requests_file(lines, args.messages, args.senders)
    script.write_text(WRK_SCRIPT.replace("{path}", PATH))
    generator = "wrk" if shutil.which("wrk") else "asyncio"
    print(f"load generator: {generator}, {args.connections} connections, {args.seconds}s each")

    server = NatsServer(root / "jetstream").start()
    nc = await nats.connect(server.url)
    await streams.provision(nc.jetstream())
    await nc.close()
    results: dict[str, dict[str, float]] = {}
    for name, extra in (("bare", []), ("publish-only", ["--nats", server.url])):
        bare_port = free_port()
        bare = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--bare-server",
            str(bare_port),
            *extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_port(bare_port)
            results[name] = await measure(bare_port, lines, script, args)
        finally:
            bare.terminate()
            await asyncio.wait_for(bare.wait(), 10)
    bare_result = results["bare"]
    await purge_inbound(server.url)
    port = free_port()
    env = base_env(
        server.url,
        root,
        PODIUM_API_TOKENS="bench:bench-token-0123456789abcdef",
        PODIUM_TWILIO_AUTH_TOKEN=TOKEN,
        PODIUM_PUBLIC_URL=PUBLIC,
        PODIUM_PORT=str(port),
        PODIUM_LOG_LEVEL="INFO",
    )
    ingress = Process("ingress", env, root / "logs").start()
    try:
        await ingress.wait_ready()
        # Warm up (connections, JIT-free but cache-warm paths), then measure.
        await wait_port(port)
        ingress_result = await measure(port, lines, script, args)
        stored = await inbound_count(server.url)
    finally:
        ingress.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    ratio = ingress_result["rps"] / bare_result["rps"]
    results["ingress"] = ingress_result
    print(f"{'':14} {'req/s':>10} {'p99 ms':>8} {'non-2xx':>8}")
    for name, result in results.items():
        print(
            f"{name:14} {result['rps']:>10,.0f} {result['p99_ms']:>8.2f} "
            f"{int(result['non_2xx']):>8}"
        )
    print(f"stored in INBOUND: {stored:,}   ratio ingress/bare: {ratio:.2f}")
    return {
        "ingress_rps": round(ingress_result["rps"], 1),
        "bare_rps": round(bare_result["rps"], 1),
        "ratio": round(ratio, 3),
        "p99_ms": round(ingress_result["p99_ms"], 2),
        "bare_p99_ms": round(bare_result["p99_ms"], 2),
        "publish_only_rps": round(results["publish-only"]["rps"], 1),
        "ingress_non_2xx": int(ingress_result["non_2xx"]),
        "stored": stored,
        "connections": args.connections,
        "seconds": args.seconds,
        "generator": generator,
        "cpus": os.cpu_count(),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--messages", type=int, default=200_000)
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
