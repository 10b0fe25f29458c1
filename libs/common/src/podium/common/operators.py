"""The console's operators: named tokens, stored only as scrypt hashes.

``PODIUM_CONSOLE_OPERATORS`` holds ``name:role:scrypt$<salt>$<hash>`` entries;
``podium console-operator NAME`` (:func:`new_operator`) makes a token and its entry. A
token is checked with scrypt and compared in constant time; one seen to be good is
remembered by its SHA-256 only, so a CLI's bearer calls do not pay for scrypt each time.
Here (the service runtime) rather than in the console, so that the ``podium`` command
makes tokens without importing a service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

Role = Literal["operator", "viewer"]
ROLES: tuple[Role, ...] = ("operator", "viewer")
#: scrypt's cost: about 16 MiB and a few tens of milliseconds a check.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class BadOperators(ValueError):
    """``PODIUM_CONSOLE_OPERATORS`` cannot be read; the message says which entry."""


@dataclass(frozen=True)
class Operator:
    """Someone who may sign in, as configured."""

    name: str
    role: Role
    salt: bytes
    digest: bytes

    @property
    def fingerprint(self) -> str:
        """Names this token (not the operator): a session carries it, so giving the
        operator a new token ends the sessions opened with the old one."""
        return b64(hashlib.sha256(b"podium-operator:" + self.salt + self.digest).digest()[:12])

    @property
    def may_act(self) -> bool:
        """Whether this operator may change anything (not a viewer)."""
        return self.role == "operator"


def hash_token(token: str, salt: bytes | None = None) -> str:
    """The stored form of ``token``: ``scrypt$<salt>$<hash>`` (base64)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${b64(salt)}${b64(digest)}"


def new_operator(name: str, role: Role = "operator") -> tuple[str, str]:
    """A new token for ``name`` and the ``PODIUM_CONSOLE_OPERATORS`` entry that admits it."""
    if not name or any(c in name for c in ":, ") or len(name) > 64:
        raise BadOperators(f"operator name {name!r}: 1 to 64 characters, no ':', ',' or space")
    token = secrets.token_urlsafe(32)
    return token, f"{name}:{role}:{hash_token(token)}"


def parse_operators(text: str) -> dict[str, Operator]:
    """The operators of ``PODIUM_CONSOLE_OPERATORS``; raises :class:`BadOperators`."""
    found: dict[str, Operator] = {}
    for n, entry in enumerate((e.strip() for e in text.split(",")), 1):
        if not entry:
            continue
        name, _, rest = entry.partition(":")
        role, _, stored = rest.partition(":")
        if role not in ROLES:
            raise BadOperators(f"entry {n}: role must be operator or viewer")
        scheme, _, values = stored.partition("$")
        salt_text, _, digest_text = values.partition("$")
        try:
            salt, digest = unb64(salt_text), unb64(digest_text)
        except (binascii.Error, ValueError):
            salt = digest = b""
        if scheme != "scrypt" or not salt or not digest:
            raise BadOperators(
                f"entry {n} ({name}): not name:role:scrypt$salt$hash "
                "(`podium console-operator NAME` prints one)"
            )
        if name in found:
            raise BadOperators(f"operator {name} is named twice")
        found[name] = Operator(name, role, salt, digest)
    return found


class Tokens:
    """Checks operator tokens (scrypt, constant-time) and remembers the good ones."""

    def __init__(self, operators: dict[str, Operator]) -> None:
        self.operators = operators
        # SHA-256 of a token checked good → its operator (never the token itself).
        self._known: dict[bytes, Operator] = {}

    def known(self, token: str) -> Operator | None:
        """The operator of a token already checked good (no scrypt), or None."""
        if not token or len(token) > 256:
            return None
        return self._known.get(hashlib.sha256(token.encode()).digest())

    def check(self, token: str) -> Operator | None:
        """The operator whose token this is, or None (scrypt: run it off the event loop)."""
        if not token or len(token) > 256:
            return None
        fingerprint = hashlib.sha256(token.encode()).digest()
        known = self._known.get(fingerprint)
        if known is not None:
            return known
        for operator in self.operators.values():
            digest = hashlib.scrypt(token.encode(), salt=operator.salt, **_SCRYPT)
            if hmac.compare_digest(digest, operator.digest):
                if len(self._known) < 1024:
                    self._known[fingerprint] = operator
                return operator
        return None


def b64(data: bytes) -> str:
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    """The bytes of :func:`b64`'s text; ValueError for an empty or oversized one."""
    if not text or len(text) > 4096:
        raise ValueError("empty or too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
