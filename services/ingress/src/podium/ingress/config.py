"""Ingress settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated

from podium.common.config import CommonSettings, Secret, setting


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
        setting("How long to wait for JetStream to store an event before answering 503.", gt=0),
    ] = 5.0

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

    def base_url(self) -> str:
        """The public base URL, without a trailing slash."""
        return (self.public_url or f"http://localhost:{self.port}").rstrip("/")
