"""A service's long-lived loops have one owner (a task group in the runtime).

A loop that fails takes the service down, loudly, instead of leaving it ready
with nothing running; loops still running when the service stops are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from podium.cli.natsserver import NatsServer
from podium.common.config import CommonSettings
from podium.common.runtime import Context, run


class Looping:
    """A service with two loops: one that runs until cancelled, one that may fail."""

    name = "looping"
    streams: Sequence[str] = ()

    def __init__(self, fail_after_s: float | None) -> None:
        self.fail_after_s = fail_after_s
        self.forever: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    async def check(self) -> None:
        """Nothing to check."""

    async def start(self, ctx: Context) -> None:
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

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"


def settings(nats_server: NatsServer) -> CommonSettings:
    return CommonSettings(nats_url=nats_server.url, health_port=0, provision=False)


async def test_a_failing_loop_stops_the_service_and_says_why(nats_server: NatsServer) -> None:
    service = Looping(fail_after_s=0.2)
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(run(service, settings(nats_server), signals=False), 15)
    assert raised.group_contains(RuntimeError, match="the loop broke")
    # Its sibling was cancelled with it: nothing is left running.
    assert service.forever is not None and service.forever.cancelled()


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
