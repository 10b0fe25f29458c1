"""What a worker's agent may touch: its sandbox and the egress proxy, with the real CLI."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from podium.agents import AgentCall
from podium.agents.claude import ClaudeRuntime
from podium.agents.sandbox import PLACEHOLDER_KEY
from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.config import AgentSettings
from podium.contracts import subjects
from podium.contracts.events import EventIds, TaskRequested, TaskResult
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply, ToolResult
from podium.testing.services import in_process
from podium.worker.config import WorkerSettings
from podium.worker.egress import Allowlist, Egress, credentials
from podium.worker.service import WorkerService
from tests.conftest import ROOT
from tests.test_task_files import result_of


def test_the_allowlist_names_hosts_ports_and_subdomains() -> None:
    allow = Allowlist(["pypi.org", "*.example.com:8443", "LOCALHOST:9000", "[::1]:9001"])
    assert allow.allows("pypi.org", 443)
    assert allow.allows("PyPI.org.", 443)
    assert not allow.allows("pypi.org", 80)
    assert not allow.allows("files.pypi.org", 443)
    assert allow.allows("a.example.com", 8443)
    assert not allow.allows("example.com", 8443)
    assert not allow.allows("a.example.com", 443)
    assert not allow.allows("evil-example.com", 8443)
    assert allow.allows("localhost", 9000)
    assert allow.allows("::1", 9001)


def test_credentials_come_from_the_workers_environment() -> None:
    found = credentials(
        {
            "ANTHROPIC_API_KEY": "sk-real",
            "ANTHROPIC_CUSTOM_HEADERS": "X-Gateway: team-a\nbroken line",
        }
    )
    assert found == {"X-Gateway": "team-a", "x-api-key": "sk-real"}
    assert credentials({"ANTHROPIC_AUTH_TOKEN": "t"}) == {"authorization": "Bearer t"}
    assert credentials({}) == {}


class Echo:
    """A TCP server that echoes what it gets (a host an operator allowed)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Echo:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            await closed(writer)

        self._server = await asyncio.start_server(echo, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


REGISTRIES: dict[int, CollectorRegistry] = {}


@pytest.fixture
async def egress(tmp_path: Path) -> AsyncIterator[Egress]:
    registry = CollectorRegistry()
    counter = Counter("egress", "test", ["kind", "outcome"], registry=registry)
    folder = tmp_path / "egress"
    folder.mkdir()
    proxy = Egress(
        directory=folder,
        upstream="http://127.0.0.1:9",
        credentials={"x-api-key": "sk-real"},
        allow=[],
        counter=counter,
    )
    REGISTRIES[id(proxy)] = registry
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
        REGISTRIES.pop(id(proxy), None)


def count(proxy: Egress, kind: str, outcome: str) -> float:
    """What the proxy counted, read from its registry."""
    found = REGISTRIES[id(proxy)].get_sample_value(
        "egress_total", {"kind": kind, "outcome": outcome}
    )
    return found or 0.0


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def connect(
    proxy: Egress, target: str
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(proxy.proxy_socket))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


async def test_the_https_proxy_opens_tunnels_only_to_allowed_hosts(egress: Egress) -> None:
    async with Echo() as echo:
        egress.allowlist = Allowlist([f"localhost:{echo.port}"])
        head, reader, writer = await connect(egress, f"localhost:{echo.port}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"ping")
        await writer.drain()
        assert await reader.read(100) == b"ping"
        await closed(writer)

        # Not on the list: the same server by another name, another port, another host.
        for target in (f"127.0.0.1:{echo.port}", "localhost:9", "example.com:443"):
            head, _, writer = await connect(egress, target)
            assert head.startswith(b"HTTP/1.1 403"), target
            await closed(writer)
    # Plain HTTP through the proxy never leaves.
    reader, writer = await asyncio.open_unix_connection(str(egress.proxy_socket))
    writer.write(b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 403")
    await closed(writer)
    assert count(egress, "connect", "allowed") == 1
    assert count(egress, "connect", "refused") == 4


async def test_an_allowed_name_that_resolves_inside_is_refused(
    egress: Egress, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A public name on the list whose DNS answer is a loopback or private address (NATS
    is there) is not reached: only an entry that names such an address itself is."""
    loop = asyncio.get_running_loop()

    async def rebinding(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    egress.allowlist = Allowlist(["pypi.example.org"])
    head, _, writer = await connect(egress, "pypi.example.org:443")
    assert head.startswith(b"HTTP/1.1 502")
    await closed(writer)
    assert count(egress, "connect", "failed") == 1


async def test_the_model_api_proxy_forwards_only_the_messages_api(egress: Egress) -> None:
    connector = aiohttp.UnixConnector(path=str(egress.api_socket))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get("http://127.0.0.1:8080/v1/organizations/me") as response,
    ):
        assert response.status == 403
    assert count(egress, "api", "refused") == 1


async def test_the_model_api_gets_the_platforms_credential_not_the_agents(egress: Egress) -> None:
    async with FakeAnthropic() as api:
        egress.upstream = api.base_url
        connector = aiohttp.UnixConnector(path=str(egress.api_socket))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(
                "http://127.0.0.1:8080/v1/messages",
                headers={"x-api-key": PLACEHOLDER_KEY, "anthropic-version": "2023-06-01"},
                json={
                    "model": "claude-x",
                    "max_tokens": 10,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ) as response,
        ):
            body = await response.text()
    # The streamed answer came back as the API sent it.
    assert response.status == 200, body
    assert "text_delta" in body and body.rstrip().endswith('data: {"type":"message_stop"}')
    assert [r.headers.get("x-api-key") for r in api.http_log] == ["sk-real"]
    assert count(egress, "api", "allowed") == 1


# --- the real CLI in the sandbox, run by the worker service -------------------------


def attempts(*, nats_port: int, api_port: int, secret: Path, other_task: Path) -> str:
    """A shell script trying what a hostile task would, one line of outcome each."""
    fetch = (
        "import urllib.request\n"
        "try:\n"
        "    urllib.request.urlopen('https://example.com/', timeout=20)\n"
        "    print('FETCHED')\n"
        "except Exception as err:\n"
        "    print('refused', err)\n"
    )
    return "\n".join(
        [
            f'echo "environ: $(cat /proc/{os.getpid()}/environ 2>&1 | head -c 200)"',
            f'echo "secret: $(cat {secret} 2>&1)"',
            f'echo "other: $(ls {other_task} 2>&1)"',
            f'echo "nats: $( (exec 3<>/dev/tcp/127.0.0.1/{nats_port}) 2>&1 && echo OPEN)"',
            f'echo "port: $( (exec 3<>/dev/tcp/127.0.0.1/{api_port}) 2>&1 && echo OPEN)"',
            f'echo "fetch: $(python3 -c "{fetch}" 2>&1)"',
            'echo "write: $(echo hello > made.txt && cat made.txt)"',
            "echo \"python: $(python3 -c 'print(6 * 7)')\"",
            'echo "key: $ANTHROPIC_API_KEY"',
        ]
    )


@pytest.mark.claude
@pytest.mark.e2e
async def test_a_sandboxed_agent_can_work_in_its_task_and_touch_nothing_else(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    claude_bin: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    # Beside the service (its working directory, outside /tmp, which the sandbox
    # replaces with an empty one anyway): a broad bind would show it.
    secret = ROOT / f".test-secret-{uuid.uuid4().hex}.env"
    secret.write_text("the-service-secret")
    request.addfinalizer(lambda: secret.unlink(missing_ok=True))
    other_task = tmp_path / "workspaces" / "tasks" / "t-other"
    other_task.mkdir(parents=True)
    (other_task / "theirs.txt").write_text("another task's work")
    outputs: list[ToolResult] = []
    seen_keys: set[str] = set()

    def respond(call: MessagesCall) -> Reply:
        if call.tool_results:
            outputs.extend(call.tool_results)
            return Reply.text("Status: COMPLETE\nSummary: tried\nDetails:\nsee the log")
        script = attempts(
            nats_port=nats_server.port,
            api_port=int(api.base_url.rsplit(":", 1)[1]),
            secret=secret,
            other_task=other_task,
        )
        return Reply.tool("Bash", {"command": script, "description": "try things"})

    async with FakeAnthropic(respond) as api:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", api.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-the-platforms-key")
        settings = WorkerSettings(
            nats_url=nats_server.url,
            health_port=0,
            agent="claude",
            claude_bin=claude_bin,
            sandbox="on",
            workspace_root=str(tmp_path / "workspaces"),
            state_dir=str(tmp_path / "state"),
        )
        service = WorkerService(settings)
        async with in_process(service, settings) as running:
            ready, reason = await running.health.readiness()
            assert ready and "sandbox: on" in reason and "shell commands allowed" in reason
            ids = EventIds(event_id="e-sbx", correlation_id="c", conversation_id="api-c1")
            task = TaskRequested(**ids, task_id="t-sbx", instructions="Try things")
            waiting = asyncio.create_task(result_of(js, "t-sbx"))
            await asyncio.sleep(0)
            await publish(js, subjects.task("t-sbx"), task)
            result: TaskResult = await waiting
            refused = running.health.registry.get_sample_value(
                "podium_worker_egress_total", {"kind": "connect", "outcome": "refused"}
            )
        seen_keys = {r.headers.get("x-api-key", "") for r in api.http_log}

    assert result.status == "COMPLETE"
    (output,) = outputs
    lines = dict(line.split(": ", 1) for line in output.text.splitlines() if ": " in line)
    assert "No such file" in lines["environ"]  # the service is not in its PID namespace
    assert "No such file" in lines["secret"]
    assert "No such file" in lines["other"]
    assert "refused" in lines["nats"].lower() and "OPEN" not in lines["nats"]
    assert "refused" in lines["port"].lower() and "OPEN" not in lines["port"]
    assert lines["fetch"].startswith("refused") and "403" in lines["fetch"]
    # What the task may do, it does.
    assert lines["write"] == "hello"
    assert lines["python"] == "42"
    assert (tmp_path / "workspaces" / "tasks" / "t-sbx" / "made.txt").read_text() == "hello\n"
    # The agent never held the key; the model API got the platform's.
    assert lines["key"] == PLACEHOLDER_KEY
    assert seen_keys == {"sk-the-platforms-key"}
    assert refused is not None and refused >= 1


@pytest.mark.claude
async def test_the_conductors_cli_gets_no_tool_whatever_the_settings_say(
    tmp_path: Path, claude_bin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mcp = tmp_path / "mcp.json"
    mcp.write_text('{"mcpServers": {}}')
    settings = AgentSettings(
        claude_bin=claude_bin,
        claude_tools="default",
        claude_allowed_tools="Bash",
        claude_permission_mode="bypassPermissions",
        claude_mcp_config=str(mcp),
    )
    async with FakeAnthropic(lambda _call: Reply.text("NO_ACTION: nothing")) as api:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", api.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
        runtime = ClaudeRuntime(settings, tmp_path / "config")
        try:
            for role in ("conductor", "worker"):
                answer = await runtime.run(
                    AgentCall(
                        role=role,
                        key=f"k-{role}",
                        prompt="Hello there.",
                        workdir=tmp_path / role,
                        timeout_s=60,
                    )
                )
                assert answer.ok, answer.error
        finally:
            await runtime.close()
    conductor, worker = api.main_calls
    assert conductor.tools == []
    # The same settings do give a worker its tools: the difference is the role.
    assert "Bash" in worker.tools
