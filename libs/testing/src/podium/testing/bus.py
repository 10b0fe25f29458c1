"""Waiting on the bus the way a test should: until a consumer has nothing left.

A negative check ("nothing happened") after a fixed sleep proves nothing; after
:func:`settled` it does: every message the consumer was given has been
acknowledged or terminated, so whatever it was going to do is done.
"""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext

from podium.contracts.streams import TOPOLOGY, ConsumerSpec


async def settled(js: JetStreamContext, spec: ConsumerSpec, timeout_s: float = 30.0) -> None:
    """Wait until ``spec``'s consumer has no message pending or unacknowledged."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await js.consumer_info(spec.stream, spec.durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{spec.durable} never settled: {info.num_pending} pending, "
                f"{info.num_ack_pending} unacknowledged"
            )
        await asyncio.sleep(0.02)


async def quiescent(
    js: JetStreamContext,
    specs: tuple[ConsumerSpec, ...] = TOPOLOGY.consumers,
    timeout_s: float = 120.0,
) -> None:
    """Wait until every consumer of ``specs`` (all of Podium's, by default) has settled.

    Then the platform has done all it was going to do with what it was given: a
    test may assert that something did *not* happen (no second reply, no extra task).
    """
    deadline = time.monotonic() + timeout_s
    for spec in specs:
        await settled(js, spec, timeout_s=max(1.0, deadline - time.monotonic()))
