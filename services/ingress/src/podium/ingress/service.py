"""The ingress service: a public aiohttp server in front of JetStream."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from nats.aio.client import Client

from podium.common.errors import StartupError
from podium.common.kv import Store
from podium.common.runtime import Context, listen
from podium.contracts import streams
from podium.contracts.state import Conversation, ConversationReplies
from podium.ingress.config import IngressSettings
from podium.ingress.handlers import Deps, Handlers
from podium.ingress.metrics import IngressMetrics
from podium.ingress.sender import DnsFunc

log = logging.getLogger(__name__)


class IngressService:
    """Serves the API and webhooks; every accepted message is stored in INBOUND first."""

    name = "ingress"
    streams: Sequence[str] = (streams.INBOUND.name, streams.DELIVERY.name)

    def __init__(self, settings: IngressSettings, *, dkim_dns: DnsFunc | None = None) -> None:
        self.settings = settings
        #: DKIM key lookups (None: DNS); tests inject their own.
        self.dkim_dns = dkim_dns
        self.port = settings.port
        self._runner: web.AppRunner | None = None
        self._nc: Client | None = None
        self._http: aiohttp.ClientSession | None = None

    def build_app(self, deps: Deps) -> web.Application:
        """The public application (separate from the health side port)."""
        app = web.Application(
            client_max_size=max(self.settings.api_max_bytes, self.settings.webhook_max_bytes)
        )
        app.add_routes(Handlers(deps).routes())
        return app

    async def check(self) -> None:
        """Nothing to check before connecting: settings were checked as they were read."""

    async def start(self, ctx: Context) -> None:
        """Bind the buckets and start listening."""
        ctx.metrics.info.labels(self.name, "none").set(1)
        # Inbound events are stored through the service's one nats-py connection, like
        # every other publish (TLS, creds, cluster updates, write back-pressure included).
        self._nc = ctx.nc
        deps = Deps(
            settings=self.settings,
            js=ctx.js,
            metrics=IngressMetrics(ctx.registry),
            conversations=await Store.open(ctx.js, streams.CONVERSATIONS.name, Conversation),
            replies=await Store.open(ctx.js, streams.REPLIES.name, ConversationReplies),
            attachments=await ctx.js.object_store(streams.ATTACHMENTS),
            artifacts=await ctx.js.object_store(streams.ARTIFACTS),
            http=self._media_client(),
            dkim_dns=self.dkim_dns,
        )
        if not self.settings.link_secret:
            log.warning(
                "PODIUM_LINK_SECRET is not set: download links are off "
                "(GET /v1/files/… answers 404)"
            )
        if self.settings.media_credentials() is None:
            # Worth a warning where Twilio is in use (its token set), not where it is not.
            (log.warning if self.settings.twilio_auth_token else log.info)(
                "PODIUM_TWILIO_ACCOUNT_SID/PODIUM_TWILIO_AUTH_TOKEN not set: MMS media are "
                "kept as URLs, not downloaded"
            )
        if not self.settings.twilio_auth_token:
            log.warning("PODIUM_TWILIO_AUTH_TOKEN is not set: Twilio signatures are NOT checked")
        if not (self.settings.sendgrid_basic_auth or self.settings.sendgrid_webhook_public_key):
            log.warning(
                "neither PODIUM_SENDGRID_WEBHOOK_PUBLIC_KEY nor PODIUM_SENDGRID_BASIC_AUTH is "
                "set: the SendGrid webhook is NOT authenticated"
            )
        self._runner = web.AppRunner(
            self.build_app(deps),
            access_log=None,
            # How long requests in flight may still run once SIGTERM arrives.
            shutdown_timeout=self.settings.drain_timeout_s,
        )
        await self._runner.setup()
        host, port = self.settings.host, self.settings.port
        try:
            self.port = await listen(self._runner, host, port)
        except OSError as err:
            await self.stop(0)
            raise StartupError(
                f"PODIUM_PORT={port}: cannot listen on {host}:{port} ({err.strerror or err})"
            ) from err
        log.info(
            "ingress listening", extra={"port": self.port, "public_url": self.settings.base_url()}
        )

    def _media_client(self) -> aiohttp.ClientSession:
        """The client MMS media are downloaded with: redirects are followed by hand
        (credentials go to Twilio's hosts only), and no proxy or netrc from the environment."""
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.mms_download_timeout_s),
            auto_decompress=False,
            trust_env=False,
        )
        return self._http

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting connections; requests in flight finish (up to ``timeout_s``)."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def readiness(self) -> tuple[bool, str]:
        """Ready once the public server is listening and events can be stored."""
        if self._runner is None or self._nc is None:
            return False, "starting"
        return True, f"listening on port {self.port}"
