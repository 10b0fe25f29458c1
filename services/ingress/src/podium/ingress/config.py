"""Ingress settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated

import msgspec

from podium.common.config import CommonSettings, Secret, setting
from podium.ingress.auth import sendgrid_public_key


class IngressSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of ``podium-ingress``."""

    host: Annotated[str, setting("Address the public HTTP server binds.")] = "0.0.0.0"  # noqa: S104
    port: Annotated[int, setting("Port of the public HTTP server.", ge=0, le=65535)] = 8080
    public_url: Annotated[
        str,
        setting(
            "Base URL providers call (e.g. https://podium.example.com); Twilio signatures "
            "are computed over this, not the pod's own address. Empty = http://localhost:PORT."
        ),
    ] = ""
    api_tokens: Annotated[
        Secret,
        setting(
            "Bearer tokens for /v1, as name:token pairs separated by commas "
            "(a bare token is named 'default')."
        ),
    ]
    twilio_auth_token: Annotated[
        Secret, setting("Twilio auth token; when set, X-Twilio-Signature is required and checked.")
    ] = Secret("")
    sendgrid_basic_auth: Annotated[
        Secret,
        setting("user:password that SendGrid Inbound Parse must send (basic auth); empty = off."),
    ] = Secret("")
    sendgrid_webhook_public_key: Annotated[
        str,
        setting(
            "Public key of the Inbound Parse security policy (base64 DER ECDSA, as SendGrid "
            "shows it); when set, X-Twilio-Email-Event-Webhook-Signature is required and checked."
        ),
    ] = ""
    sendgrid_webhook_max_age_s: Annotated[
        float,
        setting(
            "Freshness window of a signed SendGrid webhook: an older (or future) "
            "X-Twilio-Email-Event-Webhook-Timestamp is refused as a replay.",
            gt=0,
        ),
    ] = 300.0
    require_webhook_auth: Annotated[
        bool,
        setting(
            "Refuse to start when a webhook would be unauthenticated (no Twilio auth token, "
            "or neither SendGrid signature key nor basic auth). Set it in production."
        ),
    ] = False
    attachment_max_bytes: Annotated[
        int,
        setting(
            "Largest email attachment kept in the attachments object store; larger ones are "
            "listed (name, type, size) but not stored.",
            ge=0,
        ),
    ] = 10 * 1024 * 1024
    attachments_max_count: Annotated[
        int, setting("Most attachments kept from one email (the rest are listed only).", ge=0)
    ] = 20
    twilio_account_sid: Annotated[
        str,
        setting(
            "Twilio account SID: with PODIUM_TWILIO_AUTH_TOKEN, the credentials inbound MMS "
            "media are downloaded with (empty = media kept as URLs only)."
        ),
    ] = ""
    twilio_media_hosts: Annotated[
        list[str],
        setting(
            "Hosts MMS media are downloaded from, with the account's credentials "
            "(comma-separated; a bare host means HTTPS on port 443, host:port any scheme); a "
            "MediaUrl elsewhere is not fetched. Redirects are followed, but the credentials "
            "go to the MediaUrl's own host only."
        ),
    ] = msgspec.field(default_factory=lambda: ["api.twilio.com"])
    mms_max_bytes: Annotated[
        int,
        setting(
            "Largest MMS media item kept in the attachments object store; larger ones are "
            "kept as their URL, with a note.",
            ge=0,
        ),
    ] = 5 * 1024 * 1024
    mms_types: Annotated[
        list[str],
        setting(
            "Media types (prefixes, comma-separated) of MMS media that are downloaded and "
            "kept; others are kept as their URL, with a note."
        ),
    ] = msgspec.field(
        default_factory=lambda: ["image/", "audio/", "video/", "text/", "application/pdf"]
    )
    mms_download_timeout_s: Annotated[
        float,
        setting(
            "How long the media of one MMS may take to download (all of them, in parallel); "
            "keep it plus PODIUM_PUBLISH_TIMEOUT_S below Twilio's 15 s webhook timeout.",
            gt=0,
        ),
    ] = 4.0
    link_secret: Annotated[
        Secret,
        setting(
            "Key (16+ characters) of the signed download links GET /v1/files/<token> serves "
            "artifacts by; the notifier, which makes the links, needs the same. "
            "Empty = download links are off (404)."
        ),
    ] = Secret("")
    sms_opt_out_keywords: Annotated[
        list[str],
        setting("Whole-message SMS keywords that opt a number out (Twilio's defaults)."),
    ] = msgspec.field(
        default_factory=lambda: [
            "STOP",
            "STOPALL",
            "UNSUBSCRIBE",
            "CANCEL",
            "END",
            "QUIT",
            "OPTOUT",
            "REVOKE",
        ]
    )
    sms_opt_in_keywords: Annotated[
        list[str], setting("Whole-message SMS keywords that opt a number back in.")
    ] = msgspec.field(default_factory=lambda: ["START", "YES", "UNSTOP"])
    sms_help_keywords: Annotated[
        list[str],
        setting(
            "Whole-message SMS keywords that ask for help (answered by Twilio; not forwarded)."
        ),
    ] = msgspec.field(default_factory=lambda: ["HELP", "INFO"])
    own_addresses: Annotated[
        list[str],
        setting(
            "Our own email addresses/numbers (comma-separated): mail from them is never answered."
        ),
    ] = []
    api_max_bytes: Annotated[
        int, setting("Largest accepted /v1 request body, in bytes.", ge=1024)
    ] = 256 * 1024
    webhook_max_bytes: Annotated[
        int, setting("Largest accepted webhook body (email with attachments), in bytes.", ge=1024)
    ] = 30 * 1024 * 1024
    publish_timeout_s: Annotated[
        float,
        setting(
            "How long to keep trying to store an event (through a stream leader election) "
            "before answering 503; keep it below Twilio's 15 s webhook timeout.",
            gt=0,
        ),
    ] = 10.0

    def tokens(self) -> dict[str, str]:
        """{name: token} parsed from ``api_tokens``."""
        out: dict[str, str] = {}
        for item in self.api_tokens.reveal().split(","):
            item = item.strip()  # noqa: PLW2901
            if not item:
                continue
            name, sep, token = item.partition(":")
            out[name.strip() if sep else "default"] = token.strip() if sep else name.strip()
        return out

    def __post_init__(self) -> None:
        tokens = self.tokens()
        if not tokens or any(len(t) < 16 for t in tokens.values()):
            raise ValueError("PODIUM_API_TOKENS must hold tokens of at least 16 characters")
        user, sep, password = self.sendgrid_basic_auth.reveal().partition(":")
        if self.sendgrid_basic_auth and not (sep and user and password):
            raise ValueError("PODIUM_SENDGRID_BASIC_AUTH must be user:password")
        if self.sendgrid_webhook_public_key:
            try:
                sendgrid_public_key(self.sendgrid_webhook_public_key)
            except ValueError as err:
                raise ValueError(f"PODIUM_SENDGRID_WEBHOOK_PUBLIC_KEY: {err}") from err
        if self.link_secret and len(self.link_secret.reveal()) < 16:
            raise ValueError("PODIUM_LINK_SECRET must be at least 16 characters")
        if self.require_webhook_auth:
            if not self.twilio_auth_token:
                raise ValueError("PODIUM_TWILIO_AUTH_TOKEN is required (require_webhook_auth)")
            if not (self.sendgrid_basic_auth or self.sendgrid_webhook_public_key):
                raise ValueError(
                    "PODIUM_SENDGRID_WEBHOOK_PUBLIC_KEY or PODIUM_SENDGRID_BASIC_AUTH is required "
                    "(require_webhook_auth)"
                )

    def media_credentials(self) -> tuple[str, str] | None:
        """(account SID, auth token) to download MMS media with, if both are set."""
        if self.twilio_account_sid and self.twilio_auth_token:
            return self.twilio_account_sid, self.twilio_auth_token.reveal()
        return None

    def base_url(self) -> str:
        """The public base URL, without a trailing slash."""
        return (self.public_url or f"http://localhost:{self.port}").rstrip("/")
