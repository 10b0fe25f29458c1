"""Turning provider payloads into facts: signatures, email headers, text to show the agent.

Everything here is pure (no I/O), so it is tested directly with real-world
shaped inputs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import policy
from email.errors import MessageError
from email.header import decode_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from podium.common.ids import conversation_of_message_id


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """X-Twilio-Signature for a form POST: HMAC-SHA1 over the URL and sorted params."""
    return TwilioSignatures(auth_token).sign(url, list(params))


class TwilioSignatures:
    """Signs and checks X-Twilio-Signature with one account's auth token.

    The HMAC is keyed once and copied per request: OpenSSL 3 looks the digest up
    by name on every one-shot ``hmac.digest``, which cost more than the hashing
    itself on the ingress's hot path (docs/performance.md).
    """

    def __init__(self, auth_token: str) -> None:
        self._keyed = hmac.new(auth_token.encode(), digestmod=hashlib.sha1)

    def sign(self, url: str, pairs: list[tuple[str, str]]) -> str:
        """The signature of a form POST to ``url``: the URL, then each name and value
        in sorted order, concatenated (Twilio's scheme)."""
        return base64.b64encode(self._digest(url, pairs)).decode()

    def _digest(self, url: str, pairs: list[tuple[str, str]]) -> bytes:
        mac = self._keyed.copy()
        mac.update((url + "".join(map("".join, sorted(pairs)))).encode("utf-8"))
        return mac.digest()

    def valid(self, url: str, pairs: list[tuple[str, str]], signature: str) -> bool:
        """Whether ``signature`` is Twilio's for this request (constant-time compare).

        Like Twilio's own ``RequestValidator``, the URL is tried as given, with its
        default port added and with it removed: Twilio signs the URL exactly as it
        called it, and a configured URL may spell the port either way.
        """
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as sent.
        given = signature.encode("utf-8", "surrogateescape")
        primary, *others = _url_variants(url)  # cached: webhooks call back the same few URLs
        encode = binascii.b2a_base64
        if hmac.compare_digest(encode(self._digest(primary, pairs), newline=False), given):
            return True
        # The alternative spellings are public; only the comparison must be constant-time.
        return any(
            hmac.compare_digest(encode(self._digest(other, pairs), newline=False), given)
            for other in others
        )


@functools.lru_cache(maxsize=256)
def _url_variants(url: str) -> list[str]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    variants = [url]
    if default is None:
        return variants
    try:
        port = parts.port
    except ValueError:
        return variants
    if port is None:
        variants.append(urlunsplit(parts._replace(netloc=f"{host}:{default}")))
    elif port == default:
        variants.append(urlunsplit(parts._replace(netloc=host)))
    return variants


def sendgrid_public_key(key: str) -> ec.EllipticCurvePublicKey:
    """The ECDSA key SendGrid shows for signed webhooks (base64 DER), as an object.

    Raises ``ValueError`` when it is not a P-256 public key in that format.
    """
    try:
        der = base64.b64decode("".join(key.split()), validate=True)
        loaded = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not a base64 DER public key: {err}") from err
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key")  # noqa: TRY004 - a bad setting
    return loaded


def sendgrid_signature_valid(
    key: ec.EllipticCurvePublicKey, body: bytes, signature: str, timestamp: str
) -> bool:
    """Whether ``signature`` (base64 DER ECDSA/SHA-256) signs ``timestamp`` + ``body``.

    The scheme of SendGrid's signed webhooks (``X-Twilio-Email-Event-Webhook-
    Signature`` / ``-Timestamp``), as its own ``EventWebhook`` helper checks it.
    """
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def basic_auth_valid(header: str, expected: str) -> bool:
    """Whether an ``Authorization: Basic`` header carries ``expected`` (user:password)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return False
    # Digests have one length: the comparison does not leak the password's.
    return hmac.compare_digest(_digest(given), _digest(expected.encode()))


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer_client(header: str, tokens: Mapping[str, str]) -> str | None:
    """The name of the client whose token is in ``Authorization: Bearer``, or None.

    Every token is compared (in constant time), so timing does not tell which
    token came close.
    """
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    given = _digest(value.strip().encode("utf-8", "surrogateescape"))  # bytes as sent
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(given, _digest(token.encode())):
            found = name
    return found


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
    return_path = headers.get("Return-Path")
    if (return_path is not None and str(return_path).strip() in ("<>", "")) or envelope_from == "":
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
    except (ValueError, TypeError, IndexError):
        # policy.default parses structured headers; a malformed one is treated as absent.
        return ""
    return " ".join(str(value).split()) if value is not None else ""


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
    """The header block SendGrid sends in ``headers``, parsed."""
    return HeaderParser(policy=policy.compat32).parsestr(raw_headers or "", headersonly=True)


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
    if part is None:
        return ""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    return decode_text(payload, part.get_content_charset())


def raw_email_facts(
    raw: bytes,
    own_addresses: Iterable[str],
    envelope_from: str | None = None,
    envelope_to: Iterable[str] = (),
) -> EmailFacts:
    """Facts of a whole MIME message (SendGrid raw mode)."""
    msg = BytesParser(policy=policy.compat32).parsebytes(raw)
    text_part = html_part = None
    attachments: list[Attachment] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        ctype = part.get_content_type()
        filename = part.get_filename()
        if disposition != "attachment" and not filename:
            if ctype == "text/plain" and text_part is None:
                text_part = part
                continue
            if ctype == "text/html" and html_part is None:
                html_part = part
                continue
            if ctype.startswith(("text/", "message/")):
                continue
        payload = part.get_payload(decode=True)
        attachments.append(
            Attachment(
                filename=_decoded_filename(filename),
                content_type=ctype,
                data=payload if isinstance(payload, bytes) else b"",
            )
        )
    sender = parseaddr(_decoded(msg, "From"))[1].lower()
    return EmailFacts(
        sender=sender,
        recipients=_recipients([_decoded(msg, "To"), _decoded(msg, "Cc")], envelope_to),
        subject=" ".join(_decoded(msg, "Subject").split()),
        text=body_text(_part_text(text_part), _part_text(html_part)),
        message_id=next(iter(message_ids(_header(msg, "Message-ID"))), ""),
        in_reply_to=next(iter(message_ids(_header(msg, "In-Reply-To"))), ""),
        references=message_ids(_header(msg, "References")),
        ignore_reason=classify(msg, sender, own_addresses, envelope_from),
        attachments=attachments,
    )


def _decoded(msg: Message, name: str) -> str:
    """A header's text with RFC 2047 encoded words decoded, whatever their charset."""
    value = msg.get(name)
    if value is None:
        return ""
    try:
        pieces = decode_header(str(value))
    except (ValueError, LookupError, MessageError):  # a broken encoded word: kept as is
        return str(value)
    out = []
    for chunk, charset in pieces:
        out.append(decode_text(chunk, charset) if isinstance(chunk, bytes) else chunk)
    return "".join(out)


def _decoded_filename(filename: str | None) -> str:
    if not filename:
        return ""
    try:
        pieces = decode_header(filename)
    except (ValueError, LookupError, MessageError):  # a broken encoded word: kept as is
        return filename
    return "".join(
        decode_text(chunk, charset) if isinstance(chunk, bytes) else chunk
        for chunk, charset in pieces
    )
