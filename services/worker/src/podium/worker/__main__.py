"""``python -m podium.worker``: run the worker service."""

from __future__ import annotations

import asyncio

from podium.common.config import load_or_exit
from podium.common.runtime import configure_logging, run, serve_forever
from podium.worker.config import WorkerSettings
from podium.worker.service import WorkerService


async def amain(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    """Run the worker until SIGTERM/SIGINT or ``stop``."""
    await run(WorkerService(settings), settings, stop=stop)


def main() -> None:
    """Entry point: settings from the environment, then run."""
    settings = load_or_exit(WorkerSettings, "worker")
    configure_logging("worker", settings)
    serve_forever(amain(settings), "worker")


if __name__ == "__main__":
    main()
