"""``python -m podium.conductor``: run the conductor service."""

from __future__ import annotations

import asyncio

from podium.common.config import load_or_exit
from podium.common.runtime import configure_logging, run, serve_forever
from podium.conductor.config import ConductorSettings
from podium.conductor.service import ConductorService


async def amain(settings: ConductorSettings, stop: asyncio.Event | None = None) -> None:
    """Run the conductor until SIGTERM/SIGINT or ``stop``."""
    await run(ConductorService(settings), settings, stop=stop)


def main() -> None:
    """Entry point: settings from the environment, then run."""
    settings = load_or_exit(ConductorSettings, "conductor")
    configure_logging("conductor", settings)
    serve_forever(amain(settings), "conductor")


if __name__ == "__main__":
    main()
