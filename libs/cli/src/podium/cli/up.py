"""``podium up``: the whole platform on one machine, each service its own process.

Starts an embedded nats-server unless ``NATS_URL`` already answers, provisions
the streams, runs ingress, conductor, worker and notifier through their real
entry points (``python -m podium.<service>``), restarts one that dies, and on
Ctrl-C stops them in order with SIGTERM so in-flight work drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import aiohttp

from podium.cli.natsserver import NatsServer, free_port
from podium.common.agents import claude_credentials_present
from podium.common.runtime import wait_set

SERVICES = ("ingress", "conductor", "worker", "notifier")
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass
class Layout:
    """Where ``podium up`` keeps its files, and the ports it uses.

    ``health_base`` 0 gives each service a free port (tests run several at once).
    """

    home: Path
    ingress_port: int = 8080
    health_base: int = 9090
    health_ports: dict[str, int] = field(default_factory=dict)

    def allocate_ports(self, taken: set[int]) -> None:
        """Choose the health ports (after NATS is up, so a free port is really free)."""
        for i, service in enumerate(SERVICES):
            if self.health_base:
                self.health_ports[service] = self.health_base + i
                continue
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            self.health_ports[service] = port

    @property
    def token_file(self) -> Path:
        """The generated API token."""
        return self.home / "api-token"

    @property
    def outbox(self) -> Path:
        """The outbox file the notifier writes."""
        return self.home / "outbox.jsonl"

    def health_port(self, service: str) -> int:
        """The health/metrics port of ``service``."""
        return self.health_ports[service]


def nats_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a NATS server answers at ``url`` (it greets with an INFO line)."""
    parsed = urlparse(url.split(",", maxsplit=1)[0].strip())
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            return sock.recv(5) == b"INFO "
    except OSError:
        return False


def api_token(layout: Layout) -> str:
    """The local API token: from PODIUM_API_TOKEN, else generated once and kept (0600)."""
    if env := os.environ.get("PODIUM_API_TOKEN"):
        return env
    if layout.token_file.exists():
        return layout.token_file.read_text().strip()
    layout.home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(layout.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def service_env(layout: Layout, service: str, nats_url: str, token: str) -> dict[str, str]:
    """The environment ``podium up`` gives a service (user settings win)."""
    env = dict(os.environ)
    defaults = {
        "NATS_URL": nats_url,
        "PODIUM_STATE_DIR": str(layout.home / "state"),
        "PODIUM_WORKSPACE_ROOT": str(layout.home / "workspaces"),
        "PODIUM_OUTBOX_PATH": str(layout.outbox),
        "PODIUM_HEALTH_PORT": str(layout.health_port(service)),
        "PODIUM_HEALTH_HOST": "127.0.0.1",
        # Provisioning happened once before the services started.
        "PODIUM_PROVISION": "false",
    }
    if service == "ingress":
        defaults["PODIUM_PORT"] = str(layout.ingress_port)
        defaults["PODIUM_HOST"] = "127.0.0.1"
        defaults["PODIUM_API_TOKENS"] = f"local:{token}"
    for key, value in defaults.items():
        env.setdefault(key, value)
    env["NATS_URL"] = nats_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Child:
    """One supervised service process."""

    service: str
    env: dict[str, str]
    log_file: IO[str]
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process through its real entry point."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"podium.{self.service}",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            return
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log_file.write(line + "\n")
            self.log_file.flush()
            print(render_log_line(self.service, line), flush=True)  # noqa: T201


def render_log_line(service: str, line: str) -> str:
    """A JSON log line as one short human line: ``service | level message key=value``."""
    try:
        entry = json.loads(line)
    except ValueError:
        return f"{service:>9} | {line}"
    if not isinstance(entry, dict):
        return f"{service:>9} | {line}"
    level = str(entry.pop("level", "")).upper()
    msg = str(entry.pop("msg", ""))
    for key in ("ts", "service", "logger", "exc"):
        entry.pop(key, None)
    extras = " ".join(f"{k}={v}" for k, v in entry.items())
    return f"{service:>9} | {level:<7} {msg} {extras}".rstrip()


async def wait_ready(layout: Layout, timeout_s: float = 60.0) -> list[str]:
    """Services not ready after ``timeout_s`` (empty when all are)."""
    pending = set(SERVICES)
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while pending and time.monotonic() < deadline:
            for service in list(pending):
                url = f"http://127.0.0.1:{layout.health_port(service)}/readyz"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            pending.discard(service)
            await asyncio.sleep(0.2)
    return sorted(pending)


def banner(layout: Layout, nats_url: str, embedded: bool, token: str) -> str:
    """What ``podium up`` prints once everything is ready."""
    agent = os.environ.get("PODIUM_AGENT", "auto")
    if agent == "auto":
        agent = "claude" if claude_credentials_present() else "offline (no Claude credentials)"
    base = f"http://127.0.0.1:{layout.ingress_port}"
    health = "  ".join(f"{s}: http://127.0.0.1:{layout.health_port(s)}/metrics" for s in SERVICES)
    where = f" (embedded, data in {layout.home / 'nats'})" if embedded else ""
    return f"""
Podium is up.
  NATS:      {nats_url}{where}
  Agent:     {agent}
  API:       {base}/v1/messages   (token in {layout.token_file})
  Webhooks:  {base}/webhooks/twilio/sms   {base}/webhooks/sendgrid/inbound
  Outbox:    {layout.outbox}
  Metrics:   {health}

Try it (in another terminal):
  podium demo
  podium send "Summarise the plan for Monday" --wait
  curl -s {base}/v1/messages -H "Authorization: Bearer {token[:6]}…" -d '{{"text": "hello"}}'

Ctrl-C stops everything.
"""


async def up(layout: Layout) -> int:
    """Run the platform until Ctrl-C; returns the exit status."""
    from podium.common.bus import connect  # noqa: PLC0415
    from podium.common.config import CommonSettings  # noqa: PLC0415
    from podium.common.streams import provision  # noqa: PLC0415

    nats_url = os.environ.get("NATS_URL", DEFAULT_NATS_URL)
    embedded: NatsServer | None = None
    if not nats_answers(nats_url):
        parsed = urlparse(nats_url)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            print(f"podium up: NATS_URL={nats_url} does not answer", file=sys.stderr)  # noqa: T201
            return 1
        embedded = NatsServer(layout.home / "nats", port=parsed.port or 4222)
        embedded.start()
        print(f"embedded nats-server started on {embedded.url}", flush=True)  # noqa: T201
    layout.allocate_ports({urlparse(nats_url).port or 4222, layout.ingress_port})
    token = api_token(layout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    try:
        nc = await connect(CommonSettings(nats_url=nats_url), name="podium-up")
        try:
            await provision(nc.jetstream())
        finally:
            await nc.close()
        logs = layout.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            child = Child(
                service,
                service_env(layout, service, nats_url, token),
                (logs / f"{service}.log").open("a", encoding="utf-8"),
            )
            await child.start()
            children.append(child)
        not_ready = await wait_ready(layout)
        if not_ready:
            print(  # noqa: T201
                f"podium up: not ready: {', '.join(not_ready)} (see {logs})", file=sys.stderr
            )
        else:
            print(banner(layout, nats_url, embedded is not None, token), flush=True)  # noqa: T201
        return await supervise(children, stop)
    finally:
        await shutdown(children)
        if embedded is not None:
            embedded.stop()


async def supervise(children: list[Child], stop: asyncio.Event) -> int:
    """Restart a child that exits on its own (with backoff); return when ``stop`` is set."""
    while not stop.is_set():
        waits = {asyncio.create_task(c.proc.wait()): c for c in children if c.proc is not None}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*waits, stopper):
            if task not in done:
                task.cancel()
        if stop.is_set():
            return 0
        for task in done:
            child = waits.get(task)
            if child is None:
                continue
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > 5:
                print(f"podium up: {child.service} keeps failing; stopping", file=sys.stderr)  # noqa: T201
                return 1
            delay = 2 ** (len(child.restarts) - 1)
            print(  # noqa: T201
                f"podium up: {child.service} exited ({task.result()}); restarting in {delay}s",
                file=sys.stderr,
            )
            await wait_set(stop, delay)
            if not stop.is_set():
                await child.start()
    return 0


async def shutdown(children: list[Child], timeout_s: float = 35.0) -> None:
    """SIGTERM every child (ingress first, so no new work comes in), then wait."""
    for child in children:
        if child.proc is not None and child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        if child.proc is None:
            continue
        try:
            async with asyncio.timeout(timeout_s):
                await child.proc.wait()
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()
        if child.pump is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await child.pump
        child.log_file.close()
