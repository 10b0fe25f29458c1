"""The whole platform as processes, for end-to-end tests and benchmarks.

Every service starts through its real entry point (``python -m podium.<svc>``)
against the test's nats-server, with its own log file; the API and the
SendGrid webhook are driven over HTTP like a user would, and replies are read
back from the outbox file the notifier writes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from podium.common.operators import hash_token
from podium.testing.services import Process, base_env

SERVICES = ("ingress", "conductor", "worker", "notifier")
#: The four above and the operators' console (started when asked: ``services=ALL``).
ALL = (*SERVICES, "console")
TOKEN = "platform-test-token-0123456789"  # noqa: S105 - a test fixture
#: The console's operators in tests: one who may act, one who may only look.
OPERATOR_TOKEN = "operator-test-token-0123456789abcdef"  # noqa: S105 - a test fixture
VIEWER_TOKEN = "viewer-test-token-0123456789abcdef"  # noqa: S105 - a test fixture


@functools.cache
def console_operators() -> str:
    """``PODIUM_CONSOLE_OPERATORS`` admitting ``alice`` (operator) and ``victor`` (viewer)."""
    return f"alice:operator:{hash_token(OPERATOR_TOKEN)},victor:viewer:{hash_token(VIEWER_TOKEN)}"


class Platform:
    """Services as processes, sharing one state root."""

    def __init__(
        self,
        nats_url: str,
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
        per_service: Mapping[str, Mapping[str, str]] | None = None,
        services: Iterable[str] = SERVICES,
    ) -> None:
        self.nats_url = nats_url
        self.root = root
        self.env = dict(env or {})
        self.per_service = {k: dict(v) for k, v in (per_service or {}).items()}
        self.processes: dict[str, Process] = {}
        self.names = list(services)

    def start(self) -> Platform:
        """Start every service."""
        for name in self.names:
            self.add(name)
        return self

    def add(self, service: str, *, name: str | None = None, **env: str) -> Process:
        """Start one more process of ``service`` (e.g. a second replica) as ``name``."""
        extra = {**self.env, **self.per_service.get(service, {}), **env}
        if service == "ingress":
            extra = {
                "PODIUM_PORT": "0",
                "PODIUM_HOST": "127.0.0.1",
                "PODIUM_API_TOKENS": f"test:{TOKEN}",
                **extra,
            }
        if service == "console":
            extra = {
                "PODIUM_CONSOLE_PORT": "0",
                "PODIUM_CONSOLE_HOST": "127.0.0.1",
                "PODIUM_CONSOLE_OPERATORS": console_operators(),
                "PODIUM_CONSOLE_SESSION_SECRET": "console-test-session-secret-0123456789",
                **extra,
            }
        key = name or service
        logs = self.root / "logs" / key
        process = Process(service, base_env(self.nats_url, self.root, **extra), logs).start()
        self.processes[key] = process
        return process

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every process answers /readyz."""
        for process in self.processes.values():
            await process.wait_ready(timeout_s)

    def stop(self) -> None:
        """SIGTERM every process and wait for it."""
        for process in self.processes.values():
            process.stop()

    @property
    def url(self) -> str:
        """The ingress's base URL."""
        port = self.processes["ingress"].logged_port("ingress listening")
        return f"http://127.0.0.1:{port}"

    @property
    def console_url(self) -> str:
        """The console's base URL."""
        port = self.processes["console"].logged_port("console listening")
        return f"http://127.0.0.1:{port}"

    @property
    def outbox_path(self) -> Path:
        """The notifier's outbox file."""
        return self.root / "outbox.jsonl"

    def logs(self, tail: int = 6000) -> str:
        """The end of every process's log, for failure messages."""
        return "\n".join(f"--- {n}\n{p.log()[-tail:]}" for n, p in self.processes.items())

    async def send(self, text: str, **extra: Any) -> dict[str, Any]:
        """POST /v1/messages; the ingress's JSON answer."""
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.url}/v1/messages",
                json={"text": text, **extra},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            body: dict[str, Any] = await resp.json()
            if resp.status != 202:
                raise AssertionError(f"{resp.status}: {body}")
            return body

    async def email(
        self,
        sender: str,
        subject: str,
        text: str,
        *,
        message_id: str,
        headers: str = "",
        files: list[tuple[str, str, bytes]] | None = None,
        verdicts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """An inbound email through the SendGrid Inbound Parse webhook (parsed mode);
        ``files``: (file name, media type, bytes) sent as its attachments; ``verdicts``:
        SendGrid's ``SPF``, ``dkim`` and ``envelope`` fields, as its MX would post them."""
        form = aiohttp.FormData(default_to_multipart=True)
        fields = {
            "from": sender,
            "to": "podium@example.com",
            "subject": subject,
            "text": text,
            "headers": f"Message-ID: {message_id}\nSubject: {subject}\n{headers}",
        }
        fields |= verdicts or {}
        if files:
            # SendGrid's parsed mode: attachmentN parts, described by attachment-info.
            fields["attachments"] = str(len(files))
            fields["attachment-info"] = json.dumps(
                {
                    f"attachment{n}": {"filename": name, "name": name, "type": kind}
                    for n, (name, kind, _) in enumerate(files, 1)
                }
            )
        for key, value in fields.items():
            form.add_field(key, value)
        for n, (name, kind, data) in enumerate(files or [], 1):
            form.add_field(f"attachment{n}", data, filename=name, content_type=kind)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.url}/webhooks/sendgrid/inbound", data=form) as resp,
        ):
            body: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise AssertionError(f"{resp.status}: {body}")
            return body

    def outbox(self) -> list[dict[str, Any]]:
        """Every message the notifier has written so far."""
        if not self.outbox_path.exists():
            return []
        return [json.loads(line) for line in self.outbox_path.read_text().splitlines()]

    async def wait_outbox(self, expect: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until the outbox holds ``expect`` messages; all of them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.outbox()
            if len(found) >= expect:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"outbox has {len(self.outbox())} of {expect}\n{self.logs()}")

    async def metrics(self, name: str) -> str:
        """The Prometheus text of process ``name``."""
        port = self.processes[name].health_port()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            return await resp.text()
