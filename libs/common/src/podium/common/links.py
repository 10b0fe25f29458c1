"""Download links to artifacts: unguessable, expiring, and checked without any state.

The notifier makes them (an SMS cannot carry a file; an email may not, past its size
limit; an API reply lists them); the ingress, the one public HTTP server, serves
``GET /v1/files/<token>`` from the ``artifacts`` object store. The token is the
object's name and an expiry time, signed with HMAC-SHA256 under
``PODIUM_LINK_SECRET``, which both services share: nothing to store or clean up,
and no one without the secret can make a link, nor stretch one's expiry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

PATH = "/v1/files/"


class LinkError(ValueError):
    """A token that is not ours (``invalid``) or is past its time (``expired``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, name: str, expires: int) -> bytes:
    message = f"podium-file\n{name}\n{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def token(name: str, expires: int, secret: str) -> str:
    """The token of object ``name``, valid until ``expires`` (Unix seconds)."""
    if not secret:
        raise ValueError("no link secret")
    return f"{_b64(name.encode())}.{expires}.{_b64(_mac(secret, name, expires))}"


def url(base_url: str, name: str, expires: int, secret: str) -> str:
    """The full download URL of object ``name`` under ``base_url``."""
    return f"{base_url.rstrip('/')}{PATH}{token(name, expires, secret)}"


def check(value: str, secret: str, now: float | None = None) -> str:
    """The object name a token stands for; :class:`LinkError` if it is not valid now."""
    parts = value.split(".")
    if not secret or len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
        raise LinkError("invalid")
    try:
        name = _unb64(parts[0]).decode()
        mac = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError) as err:
        raise LinkError("invalid") from err
    if _b64(name.encode()) != parts[0] or _b64(mac) != parts[2]:
        # Only the one spelling we issue (base64's spare bits would give others).
        raise LinkError("invalid")
    expires = int(parts[1])
    if not hmac.compare_digest(mac, _mac(secret, name, expires)):
        raise LinkError("invalid")
    if (time.time() if now is None else now) >= expires:
        raise LinkError("expired")
    return name
