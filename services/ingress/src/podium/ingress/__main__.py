"""``python -m podium.ingress``: run the ingress service."""

from __future__ import annotations

import asyncio

from podium.common.config import load_or_exit
from podium.common.runtime import configure_logging, run, serve_forever
from podium.ingress.config import IngressSettings
from podium.ingress.service import IngressService


async def amain(settings: IngressSettings, stop: asyncio.Event | None = None) -> None:
    """Run the ingress until SIGTERM/SIGINT or ``stop``."""
    await run(IngressService(settings), settings, stop=stop)


def main() -> None:
    """Entry point: settings from the environment, then run."""
    settings = load_or_exit(IngressSettings, "ingress")
    configure_logging("ingress", settings)
    serve_forever(amain(settings), "ingress")


if __name__ == "__main__":
    main()
