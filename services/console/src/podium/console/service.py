"""The console service: its read models, its actions and its web server."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web

from podium.common.errors import ConfigError, StartupError
from podium.common.operators import BadOperators, Tokens, parse_operators
from podium.common.runtime import Context, listen
from podium.console.actions import Operations
from podium.console.auth import Sessions
from podium.console.config import ConsoleSettings
from podium.console.handlers import Console
from podium.console.metrics import ConsoleMetrics
from podium.console.readmodel import Index, Spend
from podium.contracts import streams

log = logging.getLogger(__name__)


class ConsoleService:
    """Serves the operators' pages and API; acts only through events."""

    name = "console"
    streams: Sequence[str] = (
        streams.INBOUND.name,
        streams.RESULTS.name,
        streams.COMMANDS.name,
        streams.TURNS.name,
        streams.AUDIT.name,
        streams.DEADLETTER.name,
    )

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.port = settings.console_port
        self.index: Index | None = None
        self._runner: web.AppRunner | None = None
        self._tokens: Tokens | None = None

    async def check(self) -> None:
        """Nobody could sign in with operators that cannot be read: stop, saying why."""
        try:
            operators = parse_operators(self.settings.console_operators.reveal())
        except BadOperators as err:
            raise ConfigError([f"PODIUM_CONSOLE_OPERATORS: {err}"]) from err
        if not operators:
            raise ConfigError(["PODIUM_CONSOLE_OPERATORS has no operator: nobody could sign in"])
        self._tokens = Tokens(operators)
        log.info(
            "console operators",
            extra={"operators": [f"{o.name} ({o.role})" for o in operators.values()]},
        )

    async def start(self, ctx: Context) -> None:
        """Follow the conversations, then listen."""
        if self._tokens is None:
            await self.check()
        assert self._tokens is not None  # noqa: S101 - set by check()
        ctx.metrics.info.labels(self.name, "none").set(1)
        self.index = Index(ctx.js, self.settings.max_spend_usd)
        await self.index.start(ctx.spawn)
        metrics = ConsoleMetrics(ctx.registry)
        index = self.index
        metrics.escalated.set_function(
            lambda: sum(1 for c in index.conversations.values() if c.state == "escalated")
        )
        spend = Spend(ctx.js)
        await spend.start(ctx.spawn)
        console = Console(
            self.settings,
            index=self.index,
            spend=spend,
            operations=Operations(ctx.js, self.index),
            tokens=self._tokens,
            sessions=Sessions(
                self.settings.console_session_secret.reveal(),
                self.settings.console_session_ttl_s,
            ),
            metrics=metrics,
        )
        app = web.Application(client_max_size=256 * 1024)
        app.add_routes(console.routes())
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.settings.drain_timeout_s
        )
        await self._runner.setup()
        host, port = self.settings.console_host, self.settings.console_port
        try:
            self.port = await listen(self._runner, host, port)
        except OSError as err:
            await self.stop(0)
            raise StartupError(
                f"PODIUM_CONSOLE_PORT={port}: cannot listen on {host}:{port} "
                f"({err.strerror or err})"
            ) from err
        log.info("console listening", extra={"port": self.port, "url": self.url})

    async def stop(self, timeout_s: float) -> None:
        """Stop serving (pages being sent finish up to ``timeout_s``; live feeds end)."""
        if self.index is not None:
            self.index.hang_up()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        """Where operators reach it (the port it really listens on, when asked for 0)."""
        if self.settings.console_url:
            return self.settings.console_url.rstrip("/")
        return f"http://{self.settings.console_host}:{self.port}"

    def readiness(self) -> tuple[bool, str]:
        """Ready once every conversation has been read and it follows their changes."""
        if self.index is None:
            return False, "starting"
        if self.index.problem:
            return False, self.index.problem
        if not self.index.loaded.is_set():
            return False, "reading the conversations"
        return True, (f"listening on {self.url}; {len(self.index.conversations)} conversations")
