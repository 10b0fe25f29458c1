"""Identifiers: random ones for new things, stable ones derived from natural keys.

Stable ids make redelivery harmless: the same inbound event always yields the
same task id and command ids, so JetStream's ``Nats-Msg-Id`` de-duplication and
the notifier's outbox recognise a repeat.
"""

from __future__ import annotations

import hashlib
import re
import uuid


def new_id() -> str:
    """A fresh random id (32 hex characters), safe as a NATS subject token."""
    return uuid.uuid4().hex


def stable_id(*parts: str, length: int = 32) -> str:
    """A deterministic id for ``parts`` (hex, subject-token safe)."""
    # A separator after each part keeps ("ab","c") != ("a","bc"); one hash call over
    # the joined parts (the same bytes as hashing part, separator, part, … in turn).
    digest = _SHA256.copy()  # cheaper than a new one: OpenSSL 3 looks it up by name each time
    digest.update(("\x1f".join(parts) + "\x1f").encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:length]


_SHA256 = hashlib.sha256()


def conversation_id(channel: str, *natural_key: str) -> str:
    """The conversation id for a channel and its natural thread key.

    Email: the thread's root Message-ID; SMS: the (sender, our number) pair;
    API: the client's name and thread id. The channel prefix keeps ids readable
    in ``nats stream view`` output.
    """
    return f"{channel}-{stable_id(channel, *natural_key, length=24)}"


def email_thread_root(message_id: str, in_reply_to: str, references: list[str]) -> str:
    """The Message-ID that names an email thread: the first of References, else
    In-Reply-To, else the message's own id. Our replies carry the full
    References chain, so every message of a thread maps to the same root."""
    if references:
        return references[0]
    return in_reply_to or message_id


def short_id(*parts: str) -> str:
    """A short stable id (``t`` + 12 hex) for things agents must quote, like task ids."""
    return "t" + stable_id(*parts, length=12)


# Email threading. Our outgoing Message-IDs and plus-addressed Reply-To carry the
# conversation, so a reply finds its conversation even when the person's client
# drops References. Only email conversations are named this way: their ids hash a
# Message-ID and cannot be guessed, unlike an SMS conversation's number pair.
_EMAIL_CONVERSATION = re.compile(r"^email-([0-9a-f]{24})$")
_OUR_MESSAGE_ID = re.compile(r"^<[0-9a-zA-Z_-]{1,64}\.(email-[0-9a-f]{24})@([^<>@\s]+)>$")
_REPLY_TOKEN = re.compile(r"^([^+@\s]+)\+([0-9a-f]{24})@([^@\s]+)$")


def message_id_for(command_id: str, conversation: str, email_from: str) -> str:
    """The Message-ID of the email a command sends: stable, and naming its conversation."""
    domain = email_from.rsplit("@", 1)[-1] or "localhost"
    if _EMAIL_CONVERSATION.match(conversation):
        return f"<{command_id}.{conversation}@{domain}>"
    return f"<{command_id}@{domain}>"


def conversation_of_message_id(message_id: str, domains: set[str]) -> str | None:
    """The conversation one of our Message-IDs names (only for our ``domains``)."""
    found = _OUR_MESSAGE_ID.match(message_id.strip())
    if found and found.group(2).lower() in domains:
        return found.group(1)
    return None


def reply_address(address: str, conversation: str) -> str:
    """``address`` plus-addressed with the conversation's token (``podium+<hex>@…``).

    Returns ``address`` unchanged for conversations that are not email threads.
    """
    found = _EMAIL_CONVERSATION.match(conversation)
    local, sep, domain = address.partition("@")
    if not found or not sep:
        return address
    return f"{local}+{found.group(1)}@{domain}"


def conversation_of_address(address: str, own: set[str]) -> str | None:
    """The conversation a plus-addressed recipient names, if its base address is ours."""
    found = _REPLY_TOKEN.match(address.strip().lower())
    if found and f"{found.group(1)}@{found.group(3)}" in own:
        return f"email-{found.group(2)}"
    return None


_RE = re.compile(r"(?i)^re\s*:")


def reply_subject(subject: str) -> str:
    """The subject of a reply: ``Re: <subject>``, with ``Re:`` once (the one rule for it)."""
    subject = " ".join(subject.split())
    return subject if _RE.match(subject) else f"Re: {subject}"
