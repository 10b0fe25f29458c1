"""Who is calling: Twilio and SendGrid webhook signatures, basic auth, API bearer tokens.

Everything here is pure (no I/O) and compares secrets in constant time.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


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
