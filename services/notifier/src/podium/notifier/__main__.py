"""``python -m podium.notifier``: run the notifier service."""

from __future__ import annotations

import asyncio

from podium.common.config import load_or_exit
from podium.common.runtime import configure_logging, run, serve_forever
from podium.notifier.config import NotifierSettings
from podium.notifier.service import NotifierService


async def amain(settings: NotifierSettings, stop: asyncio.Event | None = None) -> None:
    """Run the notifier until SIGTERM/SIGINT or ``stop``."""
    await run(NotifierService(settings), settings, stop=stop)


def main() -> None:
    """Entry point: settings from the environment, then run."""
    settings = load_or_exit(NotifierSettings, "notifier")
    configure_logging("notifier", settings)
    serve_forever(amain(settings), "notifier")


if __name__ == "__main__":
    main()
