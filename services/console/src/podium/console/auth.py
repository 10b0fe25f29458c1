"""Who is at the console: named operator tokens (stored hashed), signed sessions, CSRF.

- **Tokens.** :mod:`podium.common.operators`: each operator has a random token, kept
  only as an scrypt hash in ``PODIUM_CONSOLE_OPERATORS``.
- **Sessions.** Signing in with a token sets a cookie holding the operator's name, role,
  expiry and a CSRF token, signed with HMAC-SHA256 (``PODIUM_CONSOLE_SESSION_SECRET``):
  no session store, so any console replica reads it. HttpOnly, SameSite=Strict, Secure
  when the console is served over https.
- **CSRF.** Every state-changing request of a browser session must carry the session's
  CSRF token (a form field, or ``X-CSRF-Token``), compared in constant time; SameSite
  keeps other sites' requests from carrying the cookie at all. A bearer token (the CLI)
  is not a cookie, so it needs none.
- **Roles.** ``operator`` may act; ``viewer`` may only look.
- **Ending sessions.** Signing out deletes the cookie; removing an operator, changing
  their role or giving them a new token ends their sessions at once (the cookie names
  the token it was opened with); a new session secret ends everyone's. A copied cookie
  otherwise lasts until it expires (``PODIUM_CONSOLE_SESSION_TTL_S``): there is no
  session store to revoke it from.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets
import time

import msgspec

from podium.common.operators import Operator, Role, b64, unb64

#: The session cookie's name.
COOKIE = "podium_console"


class Session(msgspec.Struct, frozen=True):
    """What a session cookie says (signed)."""

    operator: str
    role: Role
    #: The operator's token as configured when signing in (:attr:`Operator.fingerprint`).
    token: str
    expires: float
    csrf: str


class Sessions:
    """Signed, self-contained session cookies."""

    def __init__(self, secret: str, ttl_s: float) -> None:
        self._key = hashlib.sha256(b"podium-console-session:" + secret.encode()).digest()
        self.ttl_s = ttl_s

    def issue(self, operator: Operator) -> tuple[str, Session]:
        """A new session for ``operator``: the cookie's value and what it says."""
        session = Session(
            operator=operator.name,
            role=operator.role,
            token=operator.fingerprint,
            expires=time.time() + self.ttl_s,
            csrf=secrets.token_urlsafe(24),
        )
        payload = b64(msgspec.json.encode(session))
        return f"{payload}.{self._sign(payload)}", session

    def read(self, value: str, operators: dict[str, Operator]) -> Session | None:
        """The session a cookie holds, if it is ours, unexpired, and its operator still
        configured with the same role; else None."""
        if not value.isascii():
            return None  # not ours (and compare_digest takes no other text)
        payload, _, signature = value.partition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            session = msgspec.json.decode(unb64(payload), type=Session)
        except (msgspec.DecodeError, msgspec.ValidationError, binascii.Error, ValueError):
            return None
        operator = operators.get(session.operator)
        if (
            session.expires < time.time()
            or operator is None
            or operator.role != session.role
            or operator.fingerprint != session.token
        ):
            return None
        return session

    def _sign(self, payload: str) -> str:
        return b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def csrf_ok(session: Session, given: str) -> bool:
    """Whether ``given`` is the session's CSRF token (constant time)."""
    return bool(given) and hmac.compare_digest(given.encode(), session.csrf.encode())
