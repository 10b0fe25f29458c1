"""Notifier settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated, Literal

from podium.common.config import CommonSettings, Secret, setting


class NotifierSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of ``podium-notifier``."""

    email_transport: Annotated[
        Literal["outbox", "smtp"],
        setting("How email leaves: outbox (a local JSON-lines file) or smtp."),
    ] = "outbox"
    sms_transport: Annotated[
        Literal["outbox"], setting("How SMS leaves: outbox (Twilio comes with the channels work).")
    ] = "outbox"
    outbox_path: Annotated[
        str, setting("The outbox file: one JSON line per message sent (email, SMS, API reply).")
    ] = ".podium/outbox.jsonl"
    email_from: Annotated[
        str, setting("From address of outgoing email (its domain also names Message-IDs).")
    ] = "podium@localhost"
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
    concurrency: Annotated[int, setting("Commands sent at once.", ge=1, le=1024)] = 16
