"""Identifiers: random ones for new things, stable ones derived from natural keys.

Stable ids make redelivery harmless: the same inbound event always yields the
same task id and command ids, so JetStream's ``Nats-Msg-Id`` de-duplication and
the notifier's outbox recognise a repeat.
"""

from __future__ import annotations

import hashlib
import uuid


def new_id() -> str:
    """A fresh random id (32 hex characters), safe as a NATS subject token."""
    return uuid.uuid4().hex


def stable_id(*parts: str, length: int = 32) -> str:
    """A deterministic id for ``parts`` (hex, subject-token safe)."""
    h = hashlib.sha256()
    for part in parts:
        # A separator that cannot appear in the parts keeps ("ab","c") != ("a","bc").
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:length]


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
