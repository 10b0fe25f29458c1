"""Notifier settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated, Literal

from podium.common.config import CommonSettings, Secret, setting

DAY = 24 * 3600.0
MIB = 1024 * 1024


class NotifierSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of ``podium-notifier``."""

    email_transport: Annotated[
        Literal["outbox", "smtp", "sendgrid"],
        setting("How email leaves: outbox (a local JSON-lines file), smtp or sendgrid (v3 API)."),
    ] = "outbox"
    sms_transport: Annotated[
        Literal["outbox", "twilio"],
        setting("How SMS leaves: outbox (a local JSON-lines file) or twilio (REST API)."),
    ] = "outbox"
    outbox_path: Annotated[
        str, setting("The outbox file: one JSON line per message sent (email, SMS, API reply).")
    ] = ".podium/outbox.jsonl"
    email_from: Annotated[
        str, setting("From address of outgoing email (its domain also names Message-IDs).")
    ] = "podium@localhost"
    email_reply_to: Annotated[
        str,
        setting(
            "Address replies should go to, plus-addressed per conversation (podium+TOKEN@…) "
            "so a reply finds its thread even without References; it must reach the "
            "ingress's inbound parse. Empty = no Reply-To."
        ),
    ] = ""
    sms_from: Annotated[str, setting("Default sender number of outgoing SMS.")] = ""
    smtp_host: Annotated[str, setting("SMTP server host (email_transport=smtp).")] = "localhost"
    smtp_port: Annotated[int, setting("SMTP server port.", ge=1, le=65535)] = 25
    smtp_username: Annotated[str, setting("SMTP user; empty = no authentication.")] = ""
    smtp_password: Annotated[Secret, setting("SMTP password.")] = Secret("")
    smtp_security: Annotated[
        Literal["none", "starttls", "tls"],
        setting("none, starttls (upgrade after connect) or tls (implicit TLS, port 465)."),
    ] = "none"
    smtp_timeout_s: Annotated[float, setting("SMTP connect/command timeout.", gt=0)] = 30.0
    smtp_ca_file: Annotated[
        str, setting("CA bundle that signs the SMTP server's certificate (empty = system CAs).")
    ] = ""
    sendgrid_api_key: Annotated[Secret, setting("SendGrid API key (email_transport=sendgrid).")] = (
        Secret("")
    )
    sendgrid_api_base: Annotated[
        str, setting("SendGrid API base URL (https://api.eu.sendgrid.com for EU residency).")
    ] = "https://api.sendgrid.com"
    twilio_account_sid: Annotated[str, setting("Twilio account SID (sms_transport=twilio).")] = ""
    twilio_auth_token: Annotated[Secret, setting("Twilio auth token.")] = Secret("")
    twilio_api_base: Annotated[str, setting("Twilio REST API base URL.")] = "https://api.twilio.com"
    twilio_messaging_service_sid: Annotated[
        str,
        setting("Send through this Messaging Service (MG…) instead of a From number when set."),
    ] = ""
    twilio_status_callback_url: Annotated[
        str,
        setting(
            "Public URL of the ingress's /webhooks/twilio/status; Twilio reports each "
            "message's delivery there. Empty = no status callbacks."
        ),
    ] = ""
    sms_max_chars: Annotated[
        int,
        setting(
            "Longest SMS sent as one message (Twilio's limit is 1600); longer text is split.",
            ge=160,
            le=1600,
        ),
    ] = 1600
    send_timeout_s: Annotated[
        float,
        setting(
            "Limit of one provider call (Twilio, SendGrid). Past it the outcome is unknown: "
            "the message is marked ambiguous, never re-sent blindly.",
            gt=0,
        ),
    ] = 15.0
    retry_base_s: Annotated[
        float,
        setting("First delay before re-trying a transient failure (doubles each time).", gt=0),
    ] = 5.0
    retry_max_s: Annotated[
        float, setting("Longest delay between retries of a transient failure.", gt=0)
    ] = 300.0
    concurrency: Annotated[int, setting("Commands sent at once.", ge=1, le=1024)] = 16
    public_url: Annotated[
        str,
        setting(
            "The ingress's public base URL (the same PODIUM_PUBLIC_URL as the ingress's): "
            "download links to files start with it. Empty = no links (SMS, API replies and "
            "email past its attachment limit then say the file could not be linked)."
        ),
    ] = ""
    link_secret: Annotated[
        Secret,
        setting(
            "Key (16+ characters) that signs download links (HMAC-SHA256); the ingress "
            "needs the same one to serve them. Empty = no links."
        ),
    ] = Secret("")
    link_ttl_s: Annotated[
        float,
        setting(
            "How long a download link works, counted from when the command was written (every "
            "attempt at one message carries the same link). At most 30 days: the artifacts "
            "object store keeps files that long.",
            gt=0,
            le=30 * DAY,
        ),
    ] = 7 * DAY
    email_attachments_max_bytes: Annotated[
        int,
        setting(
            "Total size of the files attached to one email as MIME parts, in the order the "
            "command lists them; a file that would pass it goes as a download link instead "
            "(0 = links only).",
            ge=0,
        ),
    ] = 10 * MIB

    def __post_init__(self) -> None:
        if self.public_url and not self.public_url.startswith(("https://", "http://")):
            raise ValueError("PODIUM_PUBLIC_URL must start with https:// (or http://)")
        if self.link_secret and len(self.link_secret.reveal()) < 16:
            raise ValueError("PODIUM_LINK_SECRET must be at least 16 characters")
        if self.email_transport == "sendgrid" and not self.sendgrid_api_key:
            raise ValueError("PODIUM_SENDGRID_API_KEY is required with email_transport=sendgrid")
        if self.sms_transport == "twilio":
            if not (self.twilio_account_sid and self.twilio_auth_token):
                raise ValueError(
                    "PODIUM_TWILIO_ACCOUNT_SID and PODIUM_TWILIO_AUTH_TOKEN are required with "
                    "sms_transport=twilio"
                )
            if not (self.sms_from or self.twilio_messaging_service_sid):
                raise ValueError(
                    "PODIUM_SMS_FROM or PODIUM_TWILIO_MESSAGING_SERVICE_SID is required with "
                    "sms_transport=twilio"
                )
