"""Inbound MMS media: downloaded from Twilio with the account's credentials, within limits.

A ``MediaUrl`` points at Twilio's API (``https://api.twilio.com/…/Media/ME…``), which
asks for HTTP basic auth (AccountSid:AuthToken) and answers with a redirect to a signed
URL on its CDN. Redirects are followed here, by hand, so that the credentials go to the
media hosts (``PODIUM_TWILIO_MEDIA_HOSTS``) only, never to wherever a redirect points.
A URL on any other host is not fetched at all: the webhook's fields must not make the
ingress call arbitrary addresses with Twilio's credentials.

Whatever is not kept (not configured, another host, a type not allowed, too large, a
failed or slow download) is not dropped: it stays a URL, with a note saying why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from yarl import URL

from podium.ingress.config import IngressSettings

log = logging.getLogger("podium.ingress.handlers")

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
NOT_CONFIGURED = "not downloaded: PODIUM_TWILIO_ACCOUNT_SID/PODIUM_TWILIO_AUTH_TOKEN not set"


@dataclass(frozen=True)
class Fetched:
    """A media item's bytes and the media type it was served as."""

    data: bytes
    content_type: str


class NotKept(Exception):
    """Why a media item was not downloaded: ``outcome`` for metrics, ``note`` for people."""

    def __init__(self, outcome: str, note: str, size: int = 0) -> None:
        super().__init__(note)
        self.outcome = outcome
        self.note = note
        self.size = size


def base_type(content_type: str) -> str:
    """``type/subtype`` of a Content-Type, lowercased, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme, (url.host or "").lower(), url.port)


class MediaFetcher:
    """Downloads Twilio media for one ingress (its settings, its HTTP client)."""

    def __init__(self, settings: IngressSettings, http: aiohttp.ClientSession | None) -> None:
        self.http = http
        credentials = settings.media_credentials()
        self.auth = aiohttp.encode_basic_auth(*credentials) if credentials else ""
        self.hosts = frozenset(h.strip().lower() for h in settings.twilio_media_hosts if h.strip())
        self.types = tuple(t.strip().lower() for t in settings.mms_types if t.strip())
        self.max_bytes = settings.mms_max_bytes

    @property
    def configured(self) -> bool:
        """Whether media can be downloaded at all (credentials and a client)."""
        return bool(self.auth) and self.http is not None

    def allowed_type(self, content_type: str) -> bool:
        """Whether a media type is one of ``PODIUM_MMS_TYPES`` (prefixes)."""
        kind = base_type(content_type)
        return bool(kind) and any(kind.startswith(prefix) for prefix in self.types)

    def type_refused(self, content_type: str) -> NotKept:
        """The refusal of a type that is not allowed."""
        shown = base_type(content_type)[:100] or "no media type"
        return NotKept("type", f"not stored: {shown} is not an allowed type (PODIUM_MMS_TYPES)")

    def media_host(self, url: URL) -> bool:
        """Whether ``url`` is on a media host: ``host:port`` as listed, or a bare listed
        host over HTTPS on its default port."""
        host = (url.host or "").lower()
        if url.scheme not in _DEFAULT_PORTS or not host:
            return False
        shown = f"[{host}]" if ":" in host else host
        names = {f"{shown}:{url.port}"}
        if url.scheme == "https" and url.port == _DEFAULT_PORTS["https"]:
            names.add(shown)
        return not names.isdisjoint(self.hosts)

    async def fetch(self, media_url: str) -> Fetched:
        """The media at ``media_url``; :class:`NotKept` when it cannot or may not be kept."""
        if not self.configured or self.http is None:
            raise NotKept("not-configured", NOT_CONFIGURED)
        try:
            url = URL(media_url)
            on_host = url.absolute and self.media_host(url)
        except (ValueError, TypeError):
            raise NotKept("host", "not downloaded: not a URL") from None
        if not on_host:
            host = (url.host or "")[:100]
            where = f"{host} is not" if host else "it is not on"
            raise NotKept(
                "host", f"not downloaded: {where} a Twilio media host (PODIUM_TWILIO_MEDIA_HOSTS)"
            )
        origin = _origin(url)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                # The credentials go to the media host itself, never to a redirect's target.
                headers = {"Accept-Encoding": "identity"}
                if _origin(url) == origin:
                    headers["Authorization"] = self.auth
                async with self.http.get(url, headers=headers, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        url = self._redirect(url, resp)
                        continue
                    return await self._read(resp)
        except NotKept:
            raise
        except TimeoutError:
            raise NotKept("failed", "not downloaded: the media host was too slow") from None
        except (aiohttp.ClientError, ValueError) as err:
            log.info("mms media not downloaded", extra={"error": type(err).__name__})
            raise NotKept(
                "failed", f"not downloaded: could not reach the media host ({type(err).__name__})"
            ) from None
        raise NotKept("failed", f"not downloaded: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _redirect(url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location", "")
        if not location:
            raise NotKept("failed", f"not downloaded: HTTP {resp.status} without a Location")
        target = url.join(URL(location))
        if target.scheme not in _DEFAULT_PORTS or not target.host:
            raise NotKept("failed", "not downloaded: redirected to a URL that is not HTTP(S)")
        return target

    async def _read(self, resp: aiohttp.ClientResponse) -> Fetched:
        if resp.status != 200:
            raise NotKept("failed", f"not downloaded: the media host answered HTTP {resp.status}")
        served = resp.headers.get("Content-Type", "")
        if served and not self.allowed_type(served):
            raise self.type_refused(served)
        limit = self.max_bytes
        declared = resp.content_length
        if declared is not None and declared > limit:
            raise NotKept("too-large", self._over(), size=declared)
        data = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            data += chunk
            if len(data) > limit:
                # Past the limit whatever the headers said: stop reading here.
                raise NotKept("too-large", self._over())
        return Fetched(bytes(data), base_type(served))

    def _over(self) -> str:
        return f"not stored: over the {self.max_bytes} byte limit (PODIUM_MMS_MAX_BYTES)"
