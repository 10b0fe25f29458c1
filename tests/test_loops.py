"""A service's long-lived loops have one owner (a task group in the runtime).

A loop that fails stops the service (gracefully) and its error is raised, instead
of leaving it ready with nothing running; loops still running when the service
stops are cancelled; a StartupError from start is raised as itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from podium.cli.natsserver import NatsServer
from podium.common.config import CommonSettings
from podium.common.errors import StartupError
from podium.common.runtime import Context, run


class Looping:
    """A service with two loops: one that runs until cancelled, one that may fail."""

    name = "looping"
    streams: Sequence[str] = ()

    def __init__(self, fail_after_s: float | None) -> None:
        self.fail_after_s = fail_after_s
        self.forever: asyncio.Task[None] | None = None
        self.started = asyncio.Event()
        self.stopped = False
        self.refuse_start = False

    async def check(self) -> None:
        """Nothing to check."""

    async def start(self, ctx: Context) -> None:
        if self.refuse_start:
            raise StartupError("PODIUM_PORT=1: cannot listen")
        self.forever = ctx.spawn(self._forever(), "forever")
        if self.fail_after_s is not None:
            ctx.spawn(self._fails(self.fail_after_s), "fails")
        self.started.set()

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(3600)

    async def _fails(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        raise RuntimeError("the loop broke")

    async def stop(self, timeout_s: float) -> None:
        """Leaves its forever loop running: the runtime must cancel it."""
        self.stopped = True

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"


def settings(nats_server: NatsServer) -> CommonSettings:
    return CommonSettings(nats_url=nats_server.url, health_port=0, provision=False)


async def test_a_failing_loop_stops_the_service_and_says_why(nats_server: NatsServer) -> None:
    service = Looping(fail_after_s=0.2)
    with pytest.raises(RuntimeError, match="the loop broke"):
        await asyncio.wait_for(run(service, settings(nats_server), signals=False), 15)
    # The service was stopped as on SIGTERM, and its other loop cancelled.
    assert service.stopped
    assert service.forever is not None and service.forever.cancelled()


async def test_a_startup_error_in_start_is_raised_as_itself(nats_server: NatsServer) -> None:
    # serve_forever turns a StartupError into exit status 2 (not restarted): it must not
    # arrive wrapped in the task group's ExceptionGroup.
    service = Looping(fail_after_s=None)
    service.refuse_start = True
    with pytest.raises(StartupError, match="cannot listen"):
        await asyncio.wait_for(run(service, settings(nats_server), signals=False), 15)


async def test_loops_left_running_are_cancelled_when_the_service_stops(
    nats_server: NatsServer,
) -> None:
    service = Looping(fail_after_s=None)
    stop = asyncio.Event()
    task = asyncio.create_task(run(service, settings(nats_server), stop=stop, signals=False))
    await asyncio.wait_for(service.started.wait(), 15)
    stop.set()
    await asyncio.wait_for(task, 15)
    assert service.forever is not None and service.forever.cancelled()
