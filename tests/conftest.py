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
from podium.common import access
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


#: Passwords of the NATS users in tests (the server reads them from its environment).
NATS_PASSWORDS = {role.user: f"test-{role.user}-password-0123" for role in access.ROLES}


def nats_password_env() -> dict[str, str]:
    """PODIUM_NATS_<USER>_PASSWORD for every user, as the server's environment needs them."""
    return {role.password_env: NATS_PASSWORDS[role.user] for role in access.ROLES}


def user_env(user: str) -> dict[str, str]:
    """What a process needs to connect as ``user`` (PODIUM_NATS_USER/PASSWORD)."""
    return {"PODIUM_NATS_USER": user, "PODIUM_NATS_PASSWORD": NATS_PASSWORDS[user]}


def start_secure_server(directory: Path, main_config: str = "") -> NatsServer:
    """A nats-server with the committed accounts file (deploy/nats/accounts.conf)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "accounts.conf").write_text(
        (ROOT / "deploy" / "nats" / "accounts.conf").read_text()
    )
    config = directory / "nats.conf"
    config.write_text(main_config or "include ./accounts.conf\n")
    env = {**os.environ, **nats_password_env()}
    return NatsServer(directory / "jetstream", config_file=config, env=env).start()


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server where every service has its own least-privileged user."""
    server = start_secure_server(tmp_path / "secure-nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def admin_js(secure_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    """JetStream as the admin user, with Podium's topology provisioned."""
    client = await nats.connect(
        secure_nats.url, user=access.ADMIN, password=NATS_PASSWORDS[access.ADMIN]
    )
    try:
        context = client.jetstream()
        await provision(context)
        yield context
    finally:
        await client.close()


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
