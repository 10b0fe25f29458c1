"""A fake of SendGrid's v3 Mail Send API, for tests driven by the real ``sendgrid`` client.

It speaks the real wire format of ``POST /v3/mail/send``: a bearer API key, the
JSON request body (``personalizations``, ``from``, ``reply_to``, ``subject``,
``content``, ``headers``, ``custom_args``), ``202 Accepted`` with an empty body
and an ``X-Message-Id`` header, and SendGrid's error bodies
(``{"errors": [{"message", "field", "help"}]}``) with 400, 401, 413, 429 (with
``X-RateLimit-*`` headers) and 5xx.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from podium.common.runtime import listen

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
#: Headers SendGrid does not let a sender set.
RESERVED = frozenset(
    h.lower()
    for h in (
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    )
)


@dataclass
class Accepted:
    """A mail the fake accepted: its X-Message-Id and the request body."""

    message_id: str
    body: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        """The custom headers of the request."""
        headers: dict[str, str] = self.body.get("headers", {})
        return headers

    @property
    def to(self) -> list[str]:
        """Every ``to`` address of every personalization."""
        return [r["email"] for p in self.body["personalizations"] for r in p.get("to", [])]

    @property
    def text(self) -> str:
        """The text/plain content."""
        return str(next(c["value"] for c in self.body["content"] if c["type"] == "text/plain"))


@dataclass
class FakeSendGrid:
    """The fake API on a free loopback port."""

    api_key: str
    accepted: list[Accepted] = field(default_factory=list)
    #: Replies to give first, in order: an HTTP status, or "hang" (accept, answer late).
    script: list[int | str] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _held: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """Base URL to give the client (in place of https://api.sendgrid.com)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeSendGrid:
        """Listen on a free port."""
        app = web.Application()
        app.router.add_post("/v3/mail/send", self._send)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = await listen(self._runner, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Stop listening."""
        self._held.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        """Let held requests answer."""
        self._held.set()

    async def _send(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return _errors(
                401, [(None, "The provided authorization grant is invalid, expired, or revoked")]
            )
        raw = await request.read()
        if len(raw) > 30 * 1024 * 1024:
            return _errors(413, [(None, "The JSON payload you have included is too large.")])
        reply: int | str = self.script.pop(0) if self.script else ""
        if isinstance(reply, int):
            headers = {}
            if reply == 429:
                headers = {
                    "X-RateLimit-Limit": "600",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(int(time.time()) + 1),
                }
            return _errors(reply, [(None, "rate limited" if reply == 429 else "internal")], headers)
        try:
            body = json.loads(raw)
        except ValueError:
            return _errors(400, [(None, "Bad Request")])
        problems = _validate(body)
        if problems:
            return _errors(400, problems)
        accepted = Accepted(message_id=secrets.token_urlsafe(16)[:22], body=body)
        self.accepted.append(accepted)
        if reply == "hang":
            await self._held.wait()
        return web.Response(status=202, headers={"X-Message-Id": accepted.message_id})


def _validate(body: dict[str, Any]) -> list[tuple[str | None, str]]:
    problems: list[tuple[str | None, str]] = []
    personalizations = body.get("personalizations") or []
    if not personalizations:
        problems.append(("personalizations", "The personalizations field is required."))
    for i, p in enumerate(personalizations):
        for j, to in enumerate(p.get("to") or []):
            if not EMAIL.match(str(to.get("email", ""))):
                problems.append(
                    (f"personalizations.{i}.to.{j}.email", "Does not contain a valid address.")
                )
    sender = (body.get("from") or {}).get("email", "")
    if not EMAIL.match(str(sender)):
        problems.append(("from.email", "The from email does not contain a valid address."))
    if not body.get("subject") and not all(p.get("subject") for p in personalizations):
        problems.append(("subject", "The subject is required."))
    if not body.get("content"):
        problems.append(("content", "Unless a valid template_id is provided, content is required."))
    for name in body.get("headers") or {}:
        if name.lower() in RESERVED:
            problems.append((f"headers.{name}", f"The header {name} is reserved."))
    return problems


def _errors(
    status: int, problems: list[tuple[str | None, str]], headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"errors": [{"message": m, "field": f, "help": None} for f, m in problems]},
        status=status,
        headers=headers,
    )


Part = tuple[str, bytes | str, str | None, str | None]


def multipart_body(parts: list[Part], boundary: str = "xYzZY") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data post as Inbound Parse sends it.

    Each part is (name, value, filename or None, content type or None). Built by
    hand so a test has the exact bytes a signature covers, and can send text
    fields in any charset (SendGrid names it in ``charsets``).
    """
    out = bytearray()
    for name, value, filename, content_type in parts:
        data = value.encode() if isinstance(value, str) else value
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
