"""Fixtures: a real nats-server per test (free port, temporary store) and clients of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.streams import provision

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """The JetStream store of this test's server."""
    return tmp_path / "jetstream"


@pytest.fixture
def nats_server(store_dir: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port, stopped after the test."""
    server = NatsServer(store_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A client of the test's server."""
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    """JetStream of the test's server, with Podium's topology provisioned."""
    context = nc.jetstream()
    await provision(context)
    return context


def claude_binary() -> str | None:
    """The Claude Code CLI installed by the test setup (tools/claude), if any."""
    configured = os.environ.get("PODIUM_CLAUDE_BIN")
    if configured:
        return configured
    local = ROOT / "tools" / "claude" / "node_modules" / ".bin" / "claude"
    if local.exists():
        return str(local)
    return shutil.which("claude")


@pytest.fixture
def claude_bin() -> str:
    """The real Claude Code CLI; the test is skipped, saying why, when it is missing."""
    found = claude_binary()
    if found is None:
        if shutil.which("node") is None:
            pytest.skip("Node.js is not installed, so the Claude Code CLI cannot be installed")
        pytest.skip(
            "the Claude Code CLI is not installed: run `make test` (npm ci in tools/claude)"
        )
    return found
