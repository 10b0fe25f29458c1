"""What an inbound email says: sender, recipients, threading, the text to show the agent.

Parsed with the standard library's ``email.policy.default``: headers come
decoded (RFC 2047 words, any charset), ``get_body`` picks the part a reader
would read, ``iter_attachments`` the files. Everything here is pure (no I/O),
so it is tested directly with real-world shaped inputs (tests/data/email).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser

from podium.contracts.ids import conversation_of_message_id


@dataclass
class Attachment:
    """A file that came with an email."""

    filename: str
    content_type: str
    data: bytes


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
    attachments: list[Attachment] = field(default_factory=list)


_MSGID = re.compile(r"<[^<>\s]+>")


def message_ids(value: str | None) -> list[str]:
    """The ``<id@host>`` tokens in a Message-ID / In-Reply-To / References header."""
    return _MSGID.findall(value or "")


def classify(headers: Message, sender: str, own: Iterable[str], envelope_from: str | None) -> str:
    """Why an email must not be answered ("" if it may be).

    RFC 3834 ``Auto-Submitted``, ``Precedence: bulk|list|junk|auto_reply``,
    ``List-Id``/``List-Unsubscribe``/``List-Post``, ``X-Autoreply``/
    ``X-Autorespond``/``X-Auto-Response-Suppress``-marked auto replies,
    delivery reports and an empty return path (bounces), a mailer-daemon
    sender, our own address, or one of our own Message-IDs coming back (a mail
    loop).
    """
    auto = _header(headers, "Auto-Submitted").lower()
    if auto and auto != "no":
        return "auto-submitted"
    precedence = _header(headers, "Precedence").lower()
    if precedence in ("bulk", "list", "junk", "auto_reply"):
        return f"precedence-{precedence}"
    if any(_header(headers, h) for h in ("List-Id", "List-Unsubscribe", "List-Post")):
        return "mailing-list"
    if any(_header(headers, h) for h in ("X-Autoreply", "X-Autorespond", "X-Autoresponder")):
        return "auto-reply"
    content_type = _header(headers, "Content-Type").lower()
    if "multipart/report" in content_type or "message/delivery-status" in content_type:
        return "bounce"
    return_path = _header(headers, "Return-Path") if "Return-Path" in headers else None
    if (return_path is not None and return_path.strip() in ("<>", "")) or envelope_from == "":
        return "bounce"
    local = sender.split("@", 1)[0].lower()
    if local in ("mailer-daemon", "postmaster", "noreply", "no-reply", "donotreply"):
        return "automated-sender"
    own_set = {a.strip().lower() for a in own if a.strip()}
    if sender.lower() in own_set:
        return "own-address"
    domains = own_domains(own_set)
    if any(
        conversation_of_message_id(mid, domains)
        for mid in message_ids(_header(headers, "Message-ID"))
    ):
        return "own-message"
    return ""


def _header(headers: Message, name: str) -> str:
    try:
        value = headers.get(name)
        return _header_text(str(value)) if value is not None else ""
    except Exception:  # noqa: BLE001
        # policy.default parses structured headers as they are read, and a malformed
        # address list can raise almost anything (AttributeError, IndexError…): a
        # header that cannot be read is treated as absent, never as a failed request.
        return ""


def own_domains(own: Iterable[str]) -> set[str]:
    """Domains of our own addresses (our Message-IDs use them)."""
    return {a.rsplit("@", 1)[1].lower() for a in own if "@" in a}


class _TextOfHtml(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "pre"}
    )
    _VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"})

    def __init__(self, *, drop_quotes: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.drop_quotes = drop_quotes
        # Depth inside an element whose content is skipped (script, style, a quote).
        self._skip = 0
        self._stopped = False

    def _is_quote(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if not self.drop_quotes:
            return False
        found = {k: (v or "") for k, v in attrs}
        classes = found.get("class", "").split()
        if tag == "blockquote":
            return True
        return bool(
            {"gmail_quote", "yahoo_quoted", "moz-cite-prefix", "OutlookMessageHeader"}
            & set(classes)
        )

    def _is_reply_header(self, attrs: list[tuple[str, str | None]]) -> bool:
        # Outlook puts the quoted message after this marker, as siblings, not inside it.
        return self.drop_quotes and dict(attrs).get("id") in ("divRplyFwdMsg", "appendonsend")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._stopped:
            return
        if self._skip:
            if tag not in self._VOID:
                self._skip += 1
            return
        if self._is_reply_header(attrs):
            self._stopped = True
        elif tag in ("script", "style", "head", "title") or self._is_quote(tag, attrs):
            if tag not in self._VOID:
                self._skip = 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not (self._stopped or self._skip) and tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._stopped:
            return
        if self._skip:
            if tag not in self._VOID:
                self._skip -= 1
            return
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not (self._skip or self._stopped):
            self.parts.append(data)


def html_to_text(html: str, *, drop_quotes: bool = False) -> str:
    """Readable text of an HTML body (tags dropped, blocks on their own lines).

    With ``drop_quotes``, quoted history is left out: ``<blockquote>``, Gmail's
    ``gmail_quote``, Yahoo's ``yahoo_quoted``, Thunderbird's cite prefix, and
    everything after Outlook's reply header (``divRplyFwdMsg``).
    """
    parser = _TextOfHtml(drop_quotes=drop_quotes)
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):
        # HTMLParser gives up on some malformed markup: keep what it read so far.
        pass
    text = "".join(parser.parts).replace("\xa0", " ")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_QUOTE_HEADERS = (
    re.compile(r"^On .{0,300}wrote:\s*$", re.IGNORECASE),
    re.compile(r"^Le .{0,300}a écrit\s*:\s*$", re.IGNORECASE),
    re.compile(r"^Am .{0,300}schrieb .{0,200}:\s*$", re.IGNORECASE),
    re.compile(r"^El .{0,300}escribió\s*:\s*$", re.IGNORECASE),
    re.compile(r"^Il giorno .{0,300}ha scritto\s*:\s*$", re.IGNORECASE),
    re.compile(r"^Op .{0,300}schreef .{0,200}:\s*$", re.IGNORECASE),
    re.compile(
        r"^-{2,}\s*(Original Message|Forwarded message|Ursprüngliche Nachricht)\s*-{2,}\s*$",
        re.IGNORECASE,
    ),
    re.compile(r"^_{10,}\s*$"),
    re.compile(r"^Sent from my \w+", re.IGNORECASE),
    re.compile(r"^Get Outlook for (iOS|Android)", re.IGNORECASE),
    re.compile(r"^Sent from (Mail|Outlook) for", re.IGNORECASE),
)
#: Outlook's quoted header block: "From:" then "Sent:"/"Date:"/"To:"/"Subject:" lines.
_OUTLOOK_FROM = re.compile(r"^\*?(From|Von|De|Da|Van)\s*:\*?\s", re.IGNORECASE)
_OUTLOOK_NEXT = re.compile(
    r"^\*?(Sent|Date|To|Subject|Gesendet|Datum|An|Betreff|Envoyé|Objet|Enviado|Asunto)\s*:",
    re.IGNORECASE,
)


def _cuts_here(lines: list[str], i: int) -> bool:
    line = lines[i].strip()
    if lines[i] in ("-- ", "--") or any(p.match(line) for p in _QUOTE_HEADERS):
        return True
    if _OUTLOOK_FROM.match(line):
        return any(_OUTLOOK_NEXT.match(n.strip()) for n in lines[i + 1 : i + 4])
    # Gmail wraps a long attribution line: "On Mon, … Grace Hopper <" / "grace@x.org> wrote:".
    if line.lower().startswith("on ") and i + 1 < len(lines):
        joined = f"{line} {lines[i + 1].strip()}"
        return bool(_QUOTE_HEADERS[0].match(joined))
    return False


def strip_quoted(text: str) -> str:
    """The new part of a reply: quoted history and the signature removed.

    Cuts at the first quote header ("On … wrote:" in several languages, also
    wrapped over two lines; "-----Original Message-----"; Outlook's "From: /
    Sent: / To:" block; "Sent from my …"), at the signature separator ``-- ``,
    and drops ``>``-quoted lines. Never returns an empty string for a non-empty
    message: if everything would be cut, the original text is kept.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept: list[str] = []
    for i in range(len(lines)):
        if _cuts_here(lines, i):
            break
        kept.append(lines[i])
    while kept and (kept[-1].startswith(">") or not kept[-1].strip()):
        kept.pop()
    result = "\n".join(line for line in kept if not line.startswith(">")).strip()
    return result or text.strip()


def header_message(raw_headers: str) -> Message:
    """The header block SendGrid sends in ``headers``, parsed (headers decoded)."""
    return HeaderParser(policy=policy.default).parsestr(raw_headers or "", headersonly=True)


def decode_text(data: bytes, charset: str | None) -> str:
    """``data`` decoded with ``charset``; unknown charsets fall back to UTF-8, bad bytes
    become U+FFFD rather than failing the message."""
    name = (charset or "utf-8").strip().strip('"').lower() or "utf-8"
    if name in ("unknown-8bit", "x-unknown", "8bit", "binary", "default"):
        name = "utf-8"
    try:
        return data.decode(name, errors="replace")
    except (LookupError, ValueError):
        return data.decode("utf-8", errors="replace")


def body_text(text: str, html: str) -> str:
    """What the agent should read: the plain part if there is one, else the HTML's text;
    quoted history and signatures removed."""
    if text.strip():
        return strip_quoted(text)
    return strip_quoted(html_to_text(html, drop_quotes=True) or html_to_text(html))


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
    envelope_to: Iterable[str] = (),
    attachments: list[Attachment] | None = None,
) -> EmailFacts:
    """Facts of a SendGrid parsed-mode email."""
    headers = header_message(raw_headers)
    sender = parseaddr(sender_field or _header(headers, "From"))[1].lower()
    recipients = _recipients(
        [to_field or _header(headers, "To"), _header(headers, "Cc")], envelope_to
    )
    return EmailFacts(
        sender=sender,
        recipients=recipients,
        subject=" ".join((subject or _header(headers, "Subject")).split()),
        text=body_text(text, html),
        message_id=next(iter(message_ids(_header(headers, "Message-ID"))), ""),
        in_reply_to=next(iter(message_ids(_header(headers, "In-Reply-To"))), ""),
        references=message_ids(_header(headers, "References")),
        ignore_reason=classify(headers, sender, own_addresses, envelope_from),
        attachments=attachments or [],
    )


def _recipients(fields: list[str], envelope_to: Iterable[str]) -> list[str]:
    out: list[str] = []
    for _, address in getaddresses([f for f in fields if f]):
        if address and address.lower() not in out:
            out.append(address.lower())
    for address in envelope_to:
        if isinstance(address, str) and address.lower() not in out:
            out.append(address.lower())
    return out


def _part_text(part: Message | None) -> str:
    """A text part's content, decoded by its charset (an unknown one: UTF-8, and bytes
    that do not decode become U+FFFD rather than failing the message)."""
    if part is None:
        return ""
    if isinstance(part, EmailMessage):
        try:
            content = part.get_content()
        except Exception:  # noqa: BLE001 - an unknown charset or a broken encoding: below
            content = None
        if isinstance(content, str):
            return content
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    try:
        charset = part.get_content_charset()
    except Exception:  # noqa: BLE001 - malformed parameters: the default charset
        charset = None
    return decode_text(payload, charset)


def raw_email_facts(
    raw: bytes,
    own_addresses: Iterable[str],
    envelope_from: str | None = None,
    envelope_to: Iterable[str] = (),
) -> EmailFacts:
    """Facts of a whole MIME message (SendGrid raw mode)."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)  # noqa: S101 - what policy.default makes
    body = _body(msg, "plain")
    html = _body(msg, "html")
    attachments = [
        Attachment(
            filename=_header_text(_filename(part)),
            content_type=_type(part),
            data=_payload(part),
        )
        for part in _attachments(msg)
    ]
    sender = parseaddr(_header(msg, "From"))[1].lower()
    return EmailFacts(
        sender=sender,
        recipients=_recipients([_header(msg, "To"), _header(msg, "Cc")], envelope_to),
        subject=_header(msg, "Subject"),
        text=body_text(_part_text(body), _part_text(html)),
        message_id=next(iter(message_ids(_header(msg, "Message-ID"))), ""),
        in_reply_to=next(iter(message_ids(_header(msg, "In-Reply-To"))), ""),
        references=message_ids(_header(msg, "References")),
        ignore_reason=classify(msg, sender, own_addresses, envelope_from),
        attachments=attachments,
    )


def _body(msg: EmailMessage, kind: str) -> Message | None:
    """The part a reader would read as ``kind`` (plain or html), unless it is a file.

    ``get_body`` first (RFC 2046's candidates: multipart/alternative, the start of
    multipart/related); where those hold none (a named part first, a related part
    without a start, a forwarded message/rfc822 alone), the first such part
    anywhere, as mail clients show it.
    """
    wanted = f"text/{kind}"
    try:
        part: Message | None = msg.get_body(preferencelist=(kind,))
    except Exception:  # noqa: BLE001 - a malformed structure: look for it below
        part = None
    if part is not None and _type(part) == wanted and not _is_file(part):
        return part
    for part in msg.walk():
        if not part.is_multipart() and _type(part) == wanted and not _is_file(part):
            return part
    return None


def _attachments(msg: EmailMessage) -> list[Message]:
    """Every file of the message, at any depth (``iter_attachments`` looks one level down
    only: an image inside ``multipart/related`` would be missed), bodies excluded."""
    bodies = {id(_body(msg, "plain")), id(_body(msg, "html"))}
    found: list[Message] = []
    for part in msg.walk():
        if part.is_multipart() or id(part) in bodies:
            continue
        if _is_file(part) or not _type(part).startswith(("text/", "message/")):
            found.append(part)  # a file, or an inline image or document without a name
    return found


def _type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # noqa: BLE001 - a malformed Content-Type: treated as bytes
        return "application/octet-stream"


def _filename(part: Message) -> str:
    try:
        return part.get_filename() or ""
    except Exception:  # noqa: BLE001 - malformed parameters: no name
        return ""


def _is_file(part: Message) -> bool:
    try:
        disposition = part.get_content_disposition()
    except Exception:  # noqa: BLE001 - a malformed Content-Disposition: treated as a file
        return True
    return disposition == "attachment" or bool(_filename(part))


def _payload(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


#: Control characters (a NUL in an encoded word…): never part of a header's text.
_CONTROLS = dict.fromkeys([*range(32), 127])


def _header_text(value: str) -> str:
    """A header value (already decoded by ``policy.default``) on one line, without
    control characters."""
    return " ".join(value.split()).translate(_CONTROLS)
