"""Console settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated

from podium.common.config import CommonSettings, Secret, setting


class ConsoleSettings(CommonSettings, frozen=True, kw_only=True):
    """Settings of ``podium-console``."""

    console_host: Annotated[
        str, setting("Address the console binds (keep it off the public network).")
    ] = "127.0.0.1"
    console_port: Annotated[
        int, setting("Port of the console's web UI and API.", ge=0, le=65535)
    ] = 8090
    console_url: Annotated[
        str,
        setting(
            "The console's own URL as operators reach it; https:// marks its session cookie "
            "Secure. Empty = http://HOST:PORT."
        ),
    ] = ""
    console_operators: Annotated[
        Secret,
        setting(
            "Who may sign in: name:role:hash entries separated by commas; role is operator "
            "or viewer (read-only); hash is what `podium console-operator NAME` prints "
            "(the token itself is never stored)."
        ),
    ]
    console_session_secret: Annotated[
        Secret,
        setting("Key that signs session cookies (at least 32 characters; rotate to sign all out)."),
    ]
    console_session_ttl_s: Annotated[float, setting("How long a sign-in lasts.", gt=0)] = 8 * 3600.0
    max_spend_usd: Annotated[
        float,
        setting("The conductor's spend limit of one conversation, shown beside its spend.", gt=0),
    ] = 10.0
    console_timeline_max: Annotated[
        int, setting("Most events of each kind one conversation's timeline shows.", ge=10)
    ] = 500

    def __post_init__(self) -> None:
        if len(self.console_session_secret.reveal()) < 32:
            raise ValueError("PODIUM_CONSOLE_SESSION_SECRET must be at least 32 characters")
        if self.console_url and not self.console_url.startswith(("https://", "http://")):
            raise ValueError("PODIUM_CONSOLE_URL must start with https:// (or http://)")

    @property
    def secure_cookies(self) -> bool:
        """Whether its session cookie is marked Secure (served over https)."""
        return self.console_url.startswith("https://")
