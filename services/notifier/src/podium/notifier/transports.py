"""Ways a message leaves Podium.

A transport's ``send`` returns the provider's id for the message, or raises:

- :class:`TransientSendError` — nothing was sent (connection refused, 4xx-temp
  SMTP reply, 429/5xx before acceptance): safe to retry;
- :class:`PermanentSendError` — the provider refused for good (bad address):
  never retry;
- anything else (a timeout after the request left, a dropped connection
  mid-send) is *ambiguous*: the message may have gone out, so the notifier
  does not retry it blindly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Protocol

import aiosmtplib

from podium.common.events import ApiReply, SendEmail, SendSms, utcnow
from podium.notifier.config import NotifierSettings

log = logging.getLogger(__name__)


class TransientSendError(Exception):
    """Nothing was sent; retry later."""


class PermanentSendError(Exception):
    """The provider refused the message for good."""


class Transport(Protocol):
    """Sends one kind of message."""

    name: str

    async def send(self, command: SendEmail | SendSms | ApiReply) -> str:
        """Send; return the provider's message id."""


def message_id_for(command_id: str, email_from: str) -> str:
    """A stable Message-ID for a command: the same command always gets the same id."""
    domain = email_from.rsplit("@", 1)[-1] or "localhost"
    return f"<{command_id}@{domain}>"


def build_email(command: SendEmail, email_from: str) -> EmailMessage:
    """The MIME message for a SendEmail command: threaded, marked as automatic."""
    msg = EmailMessage()
    msg["From"] = email_from
    msg["To"] = ", ".join(command.to)
    msg["Subject"] = command.subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id_for(command.command_id, email_from)
    # RFC 3834: we are an automatic responder; well-behaved autoresponders stay quiet.
    msg["Auto-Submitted"] = "auto-replied"
    if command.in_reply_to:
        msg["In-Reply-To"] = command.in_reply_to
    if command.references:
        msg["References"] = " ".join(command.references)
    msg.set_content(command.body)
    return msg


class OutboxTransport:
    """Appends each message as one JSON line to a local file (the embedded default)."""

    def __init__(self, path: Path, email_from: str, sms_from: str) -> None:
        self.name = "outbox"
        self.path = path
        self.email_from = email_from
        self.sms_from = sms_from
        self._lock = asyncio.Lock()

    async def send(self, command: SendEmail | SendSms | ApiReply) -> str:
        """Write the message to the outbox file."""
        record: dict[str, object] = {
            "command_id": command.command_id,
            "conversation_id": command.conversation_id,
            "correlation_id": command.correlation_id,
            "sent_at": utcnow().isoformat(),
        }
        match command:
            case SendEmail():
                msg = build_email(command, self.email_from)
                record.update(
                    channel="email",
                    to=command.to,
                    subject=command.subject,
                    body=command.body,
                    headers={k: str(v) for k, v in msg.items()},
                )
            case SendSms():
                record.update(
                    channel="sms",
                    to=[command.to],
                    body=command.body,
                    sender=command.sender or self.sms_from,
                )
            case ApiReply():
                record.update(
                    channel="api",
                    to=[command.client],
                    thread_id=command.thread_id,
                    body=command.body,
                )
        line = json.dumps(record, ensure_ascii=False) + "\n"
        async with self._lock:
            await asyncio.to_thread(_append, self.path, line)
        log.info(
            "message written to outbox",
            extra={"channel": record["channel"], "command_id": command.command_id},
        )
        return f"outbox:{command.command_id}"


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class SmtpTransport:
    """Sends email over SMTP with aiosmtplib (STARTTLS/TLS and auth as configured)."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.name = "smtp"
        self.settings = settings

    async def send(self, command: SendEmail | SendSms | ApiReply) -> str:
        """Send one email; map SMTP replies to transient / permanent / ambiguous."""
        if not isinstance(command, SendEmail):
            raise PermanentSendError(f"smtp cannot send {type(command).__name__}")
        s = self.settings
        msg = build_email(command, s.email_from)
        try:
            await aiosmtplib.send(
                msg,
                hostname=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_username or None,
                password=s.smtp_password.reveal() or None,
                start_tls=s.smtp_security == "starttls",
                use_tls=s.smtp_security == "tls",
                timeout=s.smtp_timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as err:
            codes = [r.code for r in err.recipients]
            if codes and all(400 <= code < 500 for code in codes):
                # Greylisting, mailbox busy: the server asks us to come back later.
                raise TransientSendError(f"recipients deferred: {err}") from err
            raise PermanentSendError(f"recipients refused: {err}") from err
        except aiosmtplib.SMTPResponseException as err:
            if 400 <= err.code < 500:
                raise TransientSendError(f"SMTP {err.code}: {err.message}") from err
            raise PermanentSendError(f"SMTP {err.code}: {err.message}") from err
        except aiosmtplib.SMTPConnectError as err:
            raise TransientSendError(f"cannot connect: {err}") from err
        return str(msg["Message-ID"])
