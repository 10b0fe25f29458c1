"""``python -m podium.console``: run the operators' console."""

from __future__ import annotations

import asyncio

from podium.common.config import load_or_exit
from podium.common.runtime import configure_logging, run, serve_forever
from podium.console.config import ConsoleSettings
from podium.console.service import ConsoleService


async def amain(settings: ConsoleSettings, stop: asyncio.Event | None = None) -> None:
    """Run the console until SIGTERM/SIGINT or ``stop``."""
    await run(ConsoleService(settings), settings, stop=stop)


def main() -> None:
    """Entry point: settings from the environment, then run."""
    settings = load_or_exit(ConsoleSettings, "console")
    configure_logging("console", settings)
    serve_forever(amain(settings), "console")


if __name__ == "__main__":
    main()
