"""Ways a message leaves Podium.

A transport's ``send`` returns the provider's id for the message, or raises:

- :class:`TransientSendError` — nothing was sent (connection refused, 4xx-temp
  SMTP reply, 429/5xx before acceptance): safe to retry;
- :class:`PermanentSendError` — the provider refused for good (bad address,
  invalid number, opted out): never retry;
- anything else (a timeout after the request left, a dropped connection
  mid-send) is *ambiguous*: the message may have gone out, so the notifier
  does not retry it blindly.

Every provider call runs under ``asyncio.timeout`` and is made exactly once
here: retries are the consumer's (nak with backoff), decided by the error type,
never a client library's own re-POST.

A message's files come with it (:class:`OutgoingFile`), fetched and linked
beforehand (``podium.notifier.files``): an email transport attaches those that
carry ``data``; the text already says where the others are.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import re
import socket
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

import aiohttp
import aiosmtplib
import python_http_client.exceptions as sg_errors
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Attachment,
    CustomArg,
    Disposition,
    FileContent,
    FileName,
    FileType,
    Header,
    Mail,
    ReplyTo,
)
from twilio.base.exceptions import TwilioRestException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client as TwilioClient

from podium.contracts.events import ApiReply, Artifact, SendEmail, SendSms, utcnow
from podium.contracts.ids import message_id_for, reply_address, reply_subject
from podium.notifier.config import NotifierSettings

log = logging.getLogger(__name__)

Command = SendEmail | SendSms | ApiReply
#: How an artifact went with its message (see :class:`OutgoingFile`).
FileOutcome = Literal["attached", "linked", "unlinked", "missing"]


@dataclass(frozen=True)
class OutgoingFile:
    """One artifact of a message, as it goes: attached (``data``), linked (``url``),
    ``unlinked`` (it needed a link and none could be made) or ``missing`` (not in the
    artifacts store). An attached file has its link too, where links can be made."""

    artifact: Artifact
    outcome: FileOutcome
    data: bytes | None = None
    url: str = ""
    expires_at: datetime | None = None

    @property
    def filename(self) -> str:
        """The file's own name, without the folders it was in under ``outputs/``."""
        return PurePosixPath(self.artifact.name).name or "file"

    @property
    def media_type(self) -> tuple[str, str]:
        """(maintype, subtype) of its content type; octet-stream when it has none usable."""
        maintype, _, subtype = self.artifact.content_type.split(";")[0].strip().partition("/")
        maintype, subtype = maintype.lower(), subtype.lower()
        # multipart/* and message/* cannot be a base64 leaf part (RFC 2046).
        if not (maintype and subtype) or maintype in ("multipart", "message"):
            return "application", "octet-stream"
        return maintype, subtype

    def listed(self) -> dict[str, object]:
        """How a log-like record (the outbox file) shows it."""
        item: dict[str, object] = {
            "name": self.artifact.name,
            "size": self.artifact.size,
            "type": self.artifact.content_type,
            "sha256": self.artifact.sha256,
            "sent_as": self.outcome,
        }
        if self.url and self.expires_at is not None:
            item.update(link=self.url, expires_at=self.expires_at.isoformat())
        return item


class TransientSendError(Exception):
    """Nothing was sent; retry later (after ``retry_after_s`` when the provider said so)."""

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class PermanentSendError(Exception):
    """The provider refused the message for good.

    ``code`` is the provider's error code; ``suppress`` names recipients to put
    on the suppression list (opted out, mailbox does not exist), with ``why``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        suppress: tuple[str, ...] = (),
        why: str = "",
        opted_out: bool = False,
    ) -> None:
        self.code = code
        self.suppress = suppress
        self.why = why
        self.opted_out = opted_out
        super().__init__(message)


class Transport(Protocol):
    """Sends one kind of message."""

    name: str

    async def send(self, command: Command, files: Sequence[OutgoingFile] = ()) -> str:
        """Send ``command`` (its text as it goes) with ``files``; return the provider's
        message id."""

    async def close(self) -> None:
        """Release connections."""


def subject_for(command: SendEmail) -> str:
    """A reply's subject starts with ``Re:`` (once)."""
    if command.in_reply_to:
        return reply_subject(command.subject)
    return " ".join(command.subject.split())


def email_headers(command: SendEmail, email_from: str) -> dict[str, str]:
    """Headers every email we send carries, whatever the transport: threading, and
    RFC 3834's mark of an automatic reply (well-behaved autoresponders stay quiet)."""
    headers = {
        "Message-ID": message_id_for(command.command_id, command.conversation_id, email_from),
        "Auto-Submitted": "auto-replied",
    }
    if command.in_reply_to:
        headers["In-Reply-To"] = command.in_reply_to
    if command.references:
        headers["References"] = " ".join(command.references)
    return headers


def build_email(
    command: SendEmail, email_from: str, reply_to: str = "", files: Sequence[OutgoingFile] = ()
) -> EmailMessage:
    """The MIME message for a SendEmail command: threaded, marked as automatic, with the
    files that carry data as attachments (byte for byte, base64)."""
    msg = EmailMessage()
    msg["From"] = email_from
    msg["To"] = ", ".join(command.to)
    msg["Subject"] = subject_for(command)
    msg["Date"] = formatdate(localtime=False)
    if reply_to:
        msg["Reply-To"] = reply_address(reply_to, command.conversation_id)
    for name, value in email_headers(command, email_from).items():
        msg[name] = value
    msg.set_content(command.body)
    for file in files:
        if file.data is not None:
            maintype, subtype = file.media_type
            msg.add_attachment(
                file.data, maintype=maintype, subtype=subtype, filename=file.filename
            )
    return msg


def attaches(files: Sequence[OutgoingFile]) -> bool:
    """Whether any of ``files`` goes as an attachment (carries its bytes)."""
    return any(file.data is not None for file in files)


def utf16_len(text: str) -> int:
    """Length as Twilio counts it (UTF-16 code units: an emoji counts twice)."""
    return len(text.encode("utf-16-le")) // 2


def split_sms(text: str, limit: int = 1600) -> list[str]:
    """``text`` in parts of at most ``limit`` characters, numbered when there are several.

    Cuts at a paragraph, else a line, else a sentence, else a word boundary, and
    only mid-word when a single word is longer than a part. Parts are numbered
    ``(1/3)`` because separate messages can arrive out of order.
    """
    text = text.strip()
    if utf16_len(text) <= limit:
        return [text]
    # Room for the " (nn/nn)" marker.
    room = limit - 8
    parts: list[str] = []
    rest = text
    while utf16_len(rest) > room:
        window = _prefix(rest, room)
        cut = 0
        for pattern in (r"\n\s*\n", r"\n", r"[.!?…]\s", r"\s"):
            matches = [m.end() for m in re.finditer(pattern, window)]
            good = [end for end in matches if end >= room // 2]
            if good:
                cut = good[-1]
                break
        if not cut:
            cut = len(window)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return [f"{part} ({i}/{len(parts)})" for i, part in enumerate(parts, 1)]


def _prefix(text: str, units: int) -> str:
    """The longest prefix of ``text`` of at most ``units`` UTF-16 code units."""
    count = 0
    for index, ch in enumerate(text):
        count += 2 if ord(ch) > 0xFFFF else 1
        if count > units:
            return text[:index]
    return text


class OutboxTransport:
    """Appends each message as one JSON line to a local file (the embedded default).

    A message counts as sent once its line is on disk (fsync). Lines of messages sent
    at the same time are written and synced together, by one hop to a thread (a group
    commit): one fsync and one thread hop a line had made the file the notifier's
    largest cost under load.
    """

    def __init__(self, path: Path, email_from: str, sms_from: str, reply_to: str = "") -> None:
        self.name = "outbox"
        self.path = path
        self.email_from = email_from
        self.sms_from = sms_from
        self.reply_to = reply_to
        # Lines waiting for the next write, each with the send waiting for it.
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Let the lines being written reach the file."""
        if self._writer is not None:
            await asyncio.wait({self._writer})

    async def _write(self, line: str) -> None:
        """Append ``line`` and sync it, together with any lines sent meanwhile."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((line, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        await written

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await asyncio.to_thread(_append, self.path, "".join(line for line, _ in batch))
            except Exception as err:  # noqa: BLE001 - each send waiting for it raises it
                for _, written in batch:
                    if not written.done():
                        written.set_exception(err)
            else:
                for _, written in batch:
                    if not written.done():
                        written.set_result(None)

    async def send(self, command: Command, files: Sequence[OutgoingFile] = ()) -> str:
        """Write the message to the outbox file, its files listed (not their bytes)."""
        record: dict[str, object] = {
            "command_id": command.command_id,
            "conversation_id": command.conversation_id,
            "correlation_id": command.correlation_id,
            "sent_at": utcnow().isoformat(),
            "attachments": [file.listed() for file in files],
        }
        match command:
            case SendEmail():
                msg = build_email(command, self.email_from, self.reply_to)
                record.update(
                    channel="email",
                    to=command.to,
                    subject=str(msg["Subject"]),
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
        await self._write(json.dumps(record, ensure_ascii=False) + "\n")
        log.info(
            "message written to outbox",
            extra={"channel": record["channel"], "command_id": command.command_id},
        )
        return f"outbox:{command.command_id}"


def _append(path: Path, lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


#: SMTP replies that mean "fix your client settings" (RFC 3207, RFC 4954).
SMTP_CONFIG_ERRORS = frozenset({530, 534, 535, 538})


class SmtpTransport:
    """Sends email over SMTP with aiosmtplib (STARTTLS/TLS and auth as configured)."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.name = "smtp"
        self.settings = settings

    async def close(self) -> None:
        """One connection per message: nothing to release."""

    async def send(self, command: Command, files: Sequence[OutgoingFile] = ()) -> str:
        """Send one email; map SMTP replies to transient / permanent / ambiguous."""
        if not isinstance(command, SendEmail):
            raise PermanentSendError(f"smtp cannot send {type(command).__name__}")
        s = self.settings
        if attaches(files):
            # Encoding megabytes of base64 would hold up the event loop.
            msg = await asyncio.to_thread(
                build_email, command, s.email_from, s.email_reply_to, files
            )
        else:
            msg = build_email(command, s.email_from, s.email_reply_to)
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
                cert_bundle=s.smtp_ca_file or None,
            )
        except aiosmtplib.SMTPRecipientsRefused as err:
            codes = [r.code for r in err.recipients]
            if codes and all(400 <= code < 500 for code in codes):
                # Greylisting, mailbox busy: the server asks us to come back later.
                raise TransientSendError(f"recipients deferred: {err}") from err
            # 5.1.x: the mailbox or domain does not exist (a hard bounce): never again.
            gone = tuple(
                r.recipient
                for r in err.recipients
                if r.code >= 500 and re.search(r"\b5\.1\.\d\b", r.message)
            )
            raise PermanentSendError(
                f"recipients refused: {err}",
                code=str(codes[0]) if codes else "",
                suppress=gone,
                why="hard-bounce",
            ) from err
        except aiosmtplib.SMTPResponseException as err:
            if err.code in SMTP_CONFIG_ERRORS:
                # TLS or authentication required or refused: our configuration, not the
                # message. Retry (an operator fixes it) rather than fail every message.
                raise TransientSendError(
                    f"SMTP {err.code}: {err.message}", retry_after_s=60.0
                ) from err
            if 400 <= err.code < 500:
                raise TransientSendError(f"SMTP {err.code}: {err.message}") from err
            raise PermanentSendError(f"SMTP {err.code}: {err.message}", code=str(err.code)) from err
        except aiosmtplib.SMTPConnectError as err:
            raise TransientSendError(f"cannot connect: {err}") from err
        return str(msg["Message-ID"])


#: Twilio error codes that say the recipient can never get a message from us.
TWILIO_OPTED_OUT = 21610  # "Attempt to send to unsubscribed recipient"
TWILIO_BAD_RECIPIENT = frozenset({21211, 21214, 21217, 21401, 21407, 21408, 21612, 21614})


class OnePostHttpClient(AsyncHttpClient):  # type: ignore[misc]
    """The twilio library's HTTP seam, made to send each request exactly once.

    twilio's own ``AsyncTwilioHttpClient`` wraps aiohttp_retry when
    ``max_retries`` is set (a 5xx re-POSTs, so an SMS can go twice) and does
    not honour its timeout (twilio-python #925). This one has no retry at all,
    a total timeout on the session, and credentials in a header.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__(logging.getLogger("twilio.http_client"), True, timeout_s)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def request(  # noqa: PLR0917 - the library's signature
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the library's signature
        allow_redirects: bool = False,
    ) -> TwilioResponse:
        """One HTTP request, no retry."""
        sent = dict(headers or {})
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            sent["Authorization"] = f"Basic {token}"
        async with self.session.request(
            method.upper(),
            url,
            params=params,  # type: ignore[arg-type]
            data=data,
            headers=sent,
            allow_redirects=allow_redirects,
        ) as response:
            return TwilioResponse(response.status, await response.text(), response.headers)

    async def close(self) -> None:
        """Close the session."""
        await self.session.close()


class TwilioTransport:
    """Sends SMS with the twilio library's client, one POST per call.

    Every call runs under ``asyncio.timeout`` on top of the HTTP session's own,
    through :class:`OnePostHttpClient` (never a library retry).
    """

    def __init__(self, settings: NotifierSettings) -> None:
        self.name = "twilio"
        self.settings = settings
        self._http: OnePostHttpClient | None = None
        self._client: TwilioClient | None = None

    def _twilio(self) -> TwilioClient:
        if self._client is None:
            s = self.settings
            # Built on first use: its aiohttp session needs the running loop.
            self._http = OnePostHttpClient(s.send_timeout_s + 1.0)
            self._client = TwilioClient(
                s.twilio_account_sid, s.twilio_auth_token.reveal(), http_client=self._http
            )
            self._client.api.base_url = s.twilio_api_base.rstrip("/")
        return self._client

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()

    async def send(self, command: Command, files: Sequence[OutgoingFile] = ()) -> str:
        """Create one message; return its SID. Files are links in its text already."""
        if not isinstance(command, SendSms):
            raise PermanentSendError(f"twilio cannot send {type(command).__name__}")
        s = self.settings
        params: dict[str, Any] = {"to": command.to, "body": command.body}
        if s.twilio_messaging_service_sid and not command.sender:
            params["messaging_service_sid"] = s.twilio_messaging_service_sid
        else:
            params["from_"] = command.sender or s.sms_from
        if s.twilio_status_callback_url:
            # Signed by Twilio together with the URL, so the command id cannot be forged.
            params["status_callback"] = f"{s.twilio_status_callback_url}?cid={command.command_id}"
        client = self._twilio()
        try:
            async with asyncio.timeout(s.send_timeout_s):
                message = await client.messages.create_async(**params)
        except TwilioRestException as err:
            raise _twilio_error(err, command.to) from err
        except aiohttp.ClientConnectorError as err:
            # The connection was never made: nothing left.
            raise TransientSendError(f"cannot connect to Twilio: {err}") from err
        return str(message.sid)


def _twilio_error(err: TwilioRestException, to: str) -> Exception:
    code = int(err.code) if err.code else 0
    text = f"Twilio {err.status} ({code}): {err.msg}"
    if err.status == 429 or err.status >= 500:
        return TransientSendError(text)
    if err.status in (401, 403):
        # Our credentials, not the message: retry (after an operator fixes them).
        return TransientSendError(text, retry_after_s=60.0)
    if code == TWILIO_OPTED_OUT:
        return PermanentSendError(
            text, code=str(code), suppress=(to,), why="provider-opt-out", opted_out=True
        )
    if code in TWILIO_BAD_RECIPIENT:
        return PermanentSendError(text, code=str(code), suppress=(to,), why="invalid-recipient")
    return PermanentSendError(text, code=str(code))


class SendGridTransport:
    """Sends email with the sendgrid library (v3 mail send) on a thread of its own.

    The library is synchronous: each call runs in a small thread pool so the
    event loop never blocks, under ``asyncio.timeout`` and the HTTP client's
    own socket timeout.
    """

    def __init__(self, settings: NotifierSettings, *, threads: int = 4) -> None:
        self.name = "sendgrid"
        self.settings = settings
        self.client = SendGridAPIClient(
            api_key=settings.sendgrid_api_key.reveal(), host=settings.sendgrid_api_base.rstrip("/")
        )
        self.client.client.timeout = settings.send_timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sendgrid")

    async def close(self) -> None:
        """Stop the thread pool (calls in flight finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def mail(self, command: SendEmail, files: Sequence[OutgoingFile] = ()) -> Mail:
        """The v3 request for ``command``: threaded, automatic, tagged with its ids, with
        the files that carry data as ``attachments`` (base64 ``content``)."""
        s = self.settings
        mail = Mail(
            from_email=s.email_from,
            to_emails=list(command.to),
            subject=subject_for(command),
            plain_text_content=command.body,
        )
        for name, value in email_headers(command, s.email_from).items():
            mail.add_header(Header(name, value))
        if s.email_reply_to:
            mail.reply_to = ReplyTo(reply_address(s.email_reply_to, command.conversation_id))
        # Echoed back by SendGrid's event webhook.
        mail.add_custom_arg(CustomArg("command_id", command.command_id))
        mail.add_custom_arg(CustomArg("conversation_id", command.conversation_id))
        # The library puts each one it is given first: given last to first, they keep
        # their order.
        for file in reversed(files):
            if file.data is not None:
                mail.add_attachment(
                    Attachment(
                        FileContent(base64.b64encode(file.data).decode("ascii")),
                        FileName(file.filename),
                        FileType("/".join(file.media_type)),
                        Disposition("attachment"),
                    )
                )
        return mail

    async def send(self, command: Command, files: Sequence[OutgoingFile] = ()) -> str:
        """POST /v3/mail/send; return SendGrid's X-Message-Id."""
        if not isinstance(command, SendEmail):
            raise PermanentSendError(f"sendgrid cannot send {type(command).__name__}")
        try:
            if attaches(files):
                # Encoding megabytes of base64 would hold up the event loop.
                payload = await asyncio.to_thread(lambda: self.mail(command, files).get())
            else:
                payload = self.mail(command).get()
        except (KeyError, ValueError, TypeError) as err:
            # The library could not even build the request (an unparsable address).
            raise PermanentSendError(f"cannot build the request: {err!r}") from err
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.settings.send_timeout_s + 1.0):
                response = await loop.run_in_executor(self._pool, self.client.send, payload)
        except sg_errors.HTTPError as err:
            raise _sendgrid_error(err) from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (ConnectionRefusedError, socket.gaierror)):
                # Refused or unresolvable: the request never left.
                raise TransientSendError(f"cannot reach SendGrid: {err.reason}") from err
            # Anything else (a timeout, a reset) may have happened after the request left.
            raise
        headers = response.headers
        return str(headers.get("X-Message-Id", "") if headers else "")


def _sendgrid_error(err: sg_errors.HTTPError) -> Exception:
    status = int(err.status_code)
    body = err.body.decode("utf-8", "replace") if isinstance(err.body, bytes) else str(err.body)
    text = f"SendGrid {status}: {body[:500]}"
    if status == 429 or status >= 500:
        retry_after = 0.0
        headers = err.headers or {}
        reset = headers.get("X-RateLimit-Reset") if hasattr(headers, "get") else None
        if reset and str(reset).isdigit():
            retry_after = max(0.0, float(reset) - utcnow().timestamp())
        return TransientSendError(text, retry_after_s=min(retry_after, 300.0))
    if status in (401, 403):
        return TransientSendError(text, retry_after_s=60.0)
    return PermanentSendError(text, code=str(status))
