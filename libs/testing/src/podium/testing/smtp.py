"""A real SMTP server (aiosmtpd) that records what it receives, for notifier tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from podium.cli.natsserver import free_port


@dataclass
class Recorder:
    """aiosmtpd handler: keeps messages; can refuse recipients, for failure tests."""

    messages: list[EmailMessage] = field(default_factory=list)
    #: RCPT replies to give, in order, before accepting (e.g. "451 try later").
    rcpt_replies: list[str] = field(default_factory=list)
    received: asyncio.Event | None = None

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept the recipient, or give the next scripted reply."""
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Keep the message."""
        content: Any = envelope.original_content or envelope.content
        msg = message_from_bytes(bytes(content), policy=policy.default)
        assert isinstance(msg, EmailMessage)  # noqa: S101 - policy.default guarantees it
        self.messages.append(msg)
        return "250 Message accepted for delivery"


class SmtpServer:
    """An aiosmtpd server on a free port."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.port = free_port()
        self._controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpServer:
        """Start serving (in aiosmtpd's own thread)."""
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._controller.stop()
