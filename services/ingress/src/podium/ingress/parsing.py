"""Turning provider payloads into facts: signatures, email headers, text to show the agent.

Everything here is pure (no I/O), so it is tested directly with real-world
shaped inputs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """X-Twilio-Signature for a form POST: HMAC-SHA1 over the URL and sorted params."""
    payload = url + "".join(k + v for k, v in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_signature_valid(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str
) -> bool:
    """Whether ``signature`` is Twilio's for this request (constant-time compare)."""
    expected = twilio_signature(auth_token, url, params)
    return hmac.compare_digest(expected.encode(), signature.encode())


def basic_auth_valid(header: str, expected: str) -> bool:
    """Whether an ``Authorization: Basic`` header carries ``expected`` (user:password)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(given, expected.encode())


def bearer_client(header: str, tokens: Mapping[str, str]) -> str | None:
    """The name of the client whose token is in ``Authorization: Bearer``, or None.

    Every token is compared (in constant time), so timing does not tell which
    token came close.
    """
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    given = value.strip().encode()
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(given, token.encode()):
            found = name
    return found


@dataclass
class EmailFacts:
    """What ingress needs from an inbound email."""

    sender: str
    recipients: list[str]
    subject: str
    text: str
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    #: Why this mail must never be answered (auto-reply, list, bounce, ours), or "".
    ignore_reason: str = ""
    attachments: list[tuple[str, str, int]] = field(default_factory=list)


_MSGID = re.compile(r"<[^<>\s]+>")


def message_ids(value: str | None) -> list[str]:
    """The ``<id@host>`` tokens in a Message-ID / In-Reply-To / References header."""
    return _MSGID.findall(value or "")


def classify(headers: Message, sender: str, own: Iterable[str], envelope_from: str | None) -> str:
    """Why an email must not be answered ("" if it may be).

    RFC 3834 ``Auto-Submitted``, ``Precedence: bulk|list|junk|auto_reply``,
    ``List-Id``/``List-Unsubscribe``, ``X-Autoreply``/``X-Autorespond``, an
    empty return path (bounces), a mailer-daemon sender, or our own address.
    """
    auto = (headers.get("Auto-Submitted") or "").strip().lower()
    if auto and auto != "no":
        return "auto-submitted"
    precedence = (headers.get("Precedence") or "").strip().lower()
    if precedence in ("bulk", "list", "junk", "auto_reply"):
        return f"precedence-{precedence}"
    if headers.get("List-Id") or headers.get("List-Unsubscribe"):
        return "mailing-list"
    if headers.get("X-Autoreply") or headers.get("X-Autorespond"):
        return "auto-reply"
    return_path = headers.get("Return-Path")
    if (return_path is not None and return_path.strip() in ("<>", "")) or envelope_from == "":
        return "bounce"
    local = sender.split("@", 1)[0].lower()
    if local in ("mailer-daemon", "postmaster", "noreply", "no-reply", "donotreply"):
        return "automated-sender"
    own_set = {a.strip().lower() for a in own if a.strip()}
    if sender.lower() in own_set:
        return "own-address"
    return ""


class _TextOfHtml(HTMLParser):
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "blockquote"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Readable text of an HTML body (tags dropped, blocks on their own lines)."""
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_QUOTE_HEADERS = (
    re.compile(r"^On .{0,300}wrote:\s*$", re.IGNORECASE),
    re.compile(r"^Le .{0,300}a écrit\s*:\s*$", re.IGNORECASE),
    re.compile(r"^Am .{0,300}schrieb .{0,200}:\s*$", re.IGNORECASE),
    re.compile(r"^-{2,}\s*Original Message\s*-{2,}\s*$", re.IGNORECASE),
    re.compile(r"^_{10,}\s*$"),
    re.compile(r"^From:\s.+$"),
    re.compile(r"^Sent from my \w+", re.IGNORECASE),
)


def strip_quoted(text: str) -> str:
    """The new part of a reply: quoted history and the signature removed.

    Cuts at the first quote header ("On … wrote:", "-----Original Message-----",
    Outlook's "From:" block, "Sent from my …"), at the signature separator
    ``-- ``, and drops trailing ``>``-quoted lines. Never returns an empty
    string for a non-empty message: if everything would be cut, the original
    text is kept.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    kept: list[str] = []
    for line in lines:
        if line in ("-- ", "--") or any(p.match(line.strip()) for p in _QUOTE_HEADERS):
            break
        kept.append(line)
    while kept and (kept[-1].startswith(">") or not kept[-1].strip()):
        kept.pop()
    result = "\n".join(line for line in kept if not line.startswith(">")).strip()
    return result or text.strip()


def header_message(raw_headers: str) -> Message:
    """The header block SendGrid sends in ``headers``, parsed."""
    return HeaderParser(policy=policy.compat32).parsestr(raw_headers or "", headersonly=True)


def email_facts(
    *,
    sender_field: str,
    to_field: str,
    subject: str,
    text: str,
    html: str,
    raw_headers: str,
    own_addresses: Iterable[str],
    envelope_from: str | None = None,
) -> EmailFacts:
    """Facts of a SendGrid parsed-mode email."""
    headers = header_message(raw_headers)
    sender = parseaddr(sender_field or headers.get("From", ""))[1].lower()
    recipients = [a.lower() for _, a in getaddresses([to_field or headers.get("To", "")]) if a]
    body = text if text.strip() else html_to_text(html)
    return EmailFacts(
        sender=sender,
        recipients=recipients,
        subject=" ".join((subject or headers.get("Subject", "")).split()),
        text=strip_quoted(body),
        message_id=next(iter(message_ids(headers.get("Message-ID"))), ""),
        in_reply_to=next(iter(message_ids(headers.get("In-Reply-To"))), ""),
        references=message_ids(headers.get("References")),
        ignore_reason=classify(headers, sender, own_addresses, envelope_from),
    )


def raw_email_facts(
    raw: bytes, own_addresses: Iterable[str], envelope_from: str | None = None
) -> EmailFacts:
    """Facts of a whole MIME message (SendGrid raw mode)."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)  # noqa: S101 - policy.default guarantees it
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    text = text_part.get_content() if text_part is not None else ""
    html = html_part.get_content() if html_part is not None else ""
    attachments = [
        (
            part.get_filename() or "",
            part.get_content_type(),
            len(part.get_payload(decode=True) or b""),
        )
        for part in msg.iter_attachments()
    ]
    sender = parseaddr(str(msg.get("From", "")))[1].lower()
    return EmailFacts(
        sender=sender,
        recipients=[a.lower() for _, a in getaddresses([str(msg.get("To", ""))]) if a],
        subject=" ".join(str(msg.get("Subject", "")).split()),
        text=strip_quoted(text if text.strip() else html_to_text(html)),
        message_id=next(iter(message_ids(str(msg.get("Message-ID", "")))), ""),
        in_reply_to=next(iter(message_ids(str(msg.get("In-Reply-To", "")))), ""),
        references=message_ids(str(msg.get("References", ""))),
        ignore_reason=classify(msg, sender, own_addresses, envelope_from),
        attachments=attachments,
    )
