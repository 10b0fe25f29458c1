"""Run Podium services in tests: in-process (through ``run()``) or as real processes.

In-process services share the test's event loop, which lets a test reach into
them (ports, metrics); process services go through ``python -m podium.<svc>``,
exactly as ``podium up``, compose and Kubernetes start them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from podium.common.config import CommonSettings
from podium.common.runtime import HealthServer, Service, run


class Running:
    """A service running in this process."""

    def __init__(self, service: Service, health: HealthServer, task: asyncio.Task[None]) -> None:
        self.service = service
        self.health = health
        self.task = task
        self.stop_event = asyncio.Event()

    @property
    def health_url(self) -> str:
        """Base URL of the health side port."""
        return f"http://127.0.0.1:{self.health.port}"

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM-equivalent: stop taking work, drain, wait for the runtime to return."""
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout=timeout_s)


@contextlib.asynccontextmanager
async def in_process(
    service: Service, settings: CommonSettings, *, ready_timeout_s: float = 15.0
) -> AsyncIterator[Running]:
    """Run ``service`` with the real runtime until the block ends; wait until ready."""
    registry = CollectorRegistry()
    health = HealthServer(service, registry, "127.0.0.1", 0)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(service, settings, registry=registry, stop=stop, signals=False, health=health)
    )
    running = Running(service, health, task)
    running.stop_event = stop
    try:
        await wait_ready(running, ready_timeout_s)
        yield running
    finally:
        if not task.done():
            await running.stop()
        elif task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def wait_ready(running: Running, timeout_s: float) -> None:
    """Wait until the service's /readyz answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        if running.task.done():
            running.task.result()
            raise RuntimeError(f"{running.service.name} stopped before it was ready")
        ready, reason = await running.health.readiness()
        if ready:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{running.service.name} not ready: {reason}")
        await asyncio.sleep(0.05)


def base_env(nats_url: str, state: Path, **extra: str) -> dict[str, str]:
    """Environment for a service process: the test's NATS, a private state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODIUM_", "ANTHROPIC_"))}
    env.update(
        NATS_URL=nats_url,
        PODIUM_STATE_DIR=str(state / "state"),
        PODIUM_WORKSPACE_ROOT=str(state / "workspaces"),
        PODIUM_OUTBOX_PATH=str(state / "outbox.jsonl"),
        PODIUM_HEALTH_HOST="127.0.0.1",
        PODIUM_HEALTH_PORT="0",
        PODIUM_AGENT="offline",
        PODIUM_LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Process:
    """A service started through its real entry point, ``python -m podium.<name>``."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        """Start the process; its output goes to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", f"podium.{self.name}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit status."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logged_port(self, message: str) -> int | None:
        """The ``port`` field of the first log line with ``message`` (ports bind 0 in tests)."""
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry: dict[str, Any] = json.loads(line)
                if entry.get("msg") == message:
                    return int(entry["port"])
        return None

    def health_port(self) -> int | None:
        """The health/metrics port: as configured, or as logged when it was 0."""
        configured = int(self.env.get("PODIUM_HEALTH_PORT", "0"))
        return configured or self.logged_port("health port listening")

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        """The process's /readyz: (status, body) — the body says why when it is not ready."""
        port = self.health_port()
        if not port:
            raise RuntimeError(f"{self.name} has not logged its health port yet")
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            body: dict[str, Any] = await resp.json()
            return resp.status, body

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the process's /readyz answers 200."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")
                port = self.health_port()
                if port:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status == 200:
                                return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log()[-3000:]}")
