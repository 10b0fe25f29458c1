"""A real SMTP server (aiosmtpd) that records what it receives, for notifier tests."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files in ``directory``); the
    certificate doubles as the CA bundle a client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class SmtpServer:
    """An aiosmtpd server on a free port; optionally STARTTLS and AUTH required."""

    def __init__(
        self,
        *,
        tls: tuple[Path, Path] | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.recorder = Recorder()
        self.port = free_port()
        self.logins: list[str] = []
        options: dict[str, Any] = {}
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            options.update(tls_context=context, require_starttls=True)
        if credentials is not None:

            def authenticate(
                server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
            ) -> AuthResult:
                ok = (
                    isinstance(data, LoginPassword)
                    and (
                        data.login.decode(),
                        data.password.decode(),
                    )
                    == credentials
                )
                if ok:
                    self.logins.append(data.login.decode())
                return AuthResult(success=ok)

            options.update(auth_required=True, authenticator=authenticate)
        self._controller = Controller(
            self.recorder, hostname="127.0.0.1", port=self.port, **options
        )

    def start(self) -> SmtpServer:
        """Start serving (in aiosmtpd's own thread)."""
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._controller.stop()
