"""Fixtures: a real nats-server per test (free port, temporary store) and clients of it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer, free_port, wait_for_port
from podium.common.provision import provision
from podium.contracts import access
from podium.testing.claude import claude_binary
from podium.testing.smtp import SmtpServer

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


#: Debian's nats-server package (2.9.10 on this kind of machine): too old for Podium.
DEBIAN_NATS_SERVER = Path("/usr/sbin/nats-server")
OLD_VERSION = "2.9.10"


def _old_enough(binary: Path) -> bool:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return False
    return OLD_VERSION in out


class _OldServerGreeter:
    """Where Debian's server is missing: a TCP server that speaks just enough NATS
    (INFO with version 2.9.10, PONG to PING) for a client to connect and read it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        info = {"server_id": "OLD", "version": OLD_VERSION, "proto": 1, "headers": True}
        info |= {"jetstream": True, "max_payload": 1048576, "host": "127.0.0.1"}
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn, info), daemon=True).start()

    @staticmethod
    def _client(conn: socket.socket, info: dict[str, object]) -> None:
        with conn:
            conn.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
            buffer = b""
            while chunk := conn.recv(4096):
                buffer += chunk
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    if line.startswith(b"PING"):
                        conn.sendall(b"PONG\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def old_nats(tmp_path: Path) -> Iterator[str]:
    """The URL of a NATS server older than Podium needs: Debian's nats-server 2.9.10 (as
    on every fresh machine of this kind) on a free port, else a server that greets as it."""
    if DEBIAN_NATS_SERVER.exists() and _old_enough(DEBIAN_NATS_SERVER):
        port = free_port()
        store = tmp_path / "old-nats"
        store.mkdir()
        proc = subprocess.Popen(
            [str(DEBIAN_NATS_SERVER), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", port, 10)
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        return
    greeter = _OldServerGreeter()
    try:
        yield f"nats://127.0.0.1:{greeter.port}"
    finally:
        greeter.close()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) that records what it receives."""
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()
