"""The consumer loop: ack/nak/term policy, dead letters, ordering, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import defaultdict
from typing import cast

import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.cli.natsserver import NatsServer
from podium.common import provision
from podium.common.backoff import JITTER, backoff
from podium.common.bus import publish
from podium.common.consumer import Delivery, PullConsumer
from podium.common.errors import Reject, Retry
from podium.common.metrics import Metrics
from podium.contracts import streams, subjects
from podium.contracts.events import AnyEvent, DeadLetter, InboundMessage, decode
from podium.testing.bus import settled

SPEC = dataclasses.replace(
    streams.conductor_inbound(0),
    durable="test-consumer",
    filter_subjects=(subjects.INBOUND_ALL,),
    ack_wait_s=2.0,
    max_deliver=3,
)


def message(n: int, conversation: str = "api-c1") -> InboundMessage:
    return InboundMessage(
        event_id=f"e{n}",
        correlation_id=f"e{n}",
        conversation_id=conversation,
        channel="api",
        sender="tester",
        text=f"message {n}",
    )


async def dead_letters(js: JetStreamContext, timeout: float = 5.0) -> list[DeadLetter]:
    found: list[DeadLetter] = []
    sub = await js.pull_subscribe(subjects.DEADLETTER_ALL, stream="DEADLETTER")
    try:
        for msg in await sub.fetch(10, timeout=timeout):
            event = decode(msg.data)
            assert isinstance(event, DeadLetter)
            found.append(event)
    except TimeoutError:
        pass
    return found


def consumer(
    nc: Client, js: JetStreamContext, handler: object, **kwargs: object
) -> tuple[PullConsumer, Metrics]:
    metrics = Metrics(CollectorRegistry(), "test")
    return (
        PullConsumer(nc, js, SPEC, handler, service="test", metrics=metrics, **kwargs),  # type: ignore[arg-type]
        metrics,
    )


@pytest.fixture
async def jsc(js: JetStreamContext) -> JetStreamContext:
    await js.add_consumer(SPEC.stream, provision.consumer_config(SPEC))
    return js


async def test_poison_message_is_dead_lettered_and_consuming_goes_on(
    jsc: JetStreamContext, nc: Client
) -> None:
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        handled.append(event.event_id)
        if len(handled) == 2:
            done.set()

    c, _ = consumer(nc, jsc, handler)
    c.start()
    await publish(jsc, "inbound.api.api-c1", message(1))
    await jsc.publish(
        "inbound.api.api-c1", b"\xff\xfenot an event", headers={"Nats-Msg-Id": "poison"}
    )
    await publish(jsc, "inbound.api.api-c1", message(2))
    await asyncio.wait_for(done.wait(), 10)
    await c.stop(5)
    assert handled == ["e1", "e2"]
    letters = await dead_letters(jsc)
    assert len(letters) == 1
    assert letters[0].payload_encoding == "base64"
    assert "undecodable" in letters[0].reason
    assert letters[0].stream_seq == 2
    info = await jsc.consumer_info(SPEC.stream, SPEC.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_reject_terminates_at_once_and_retry_comes_back(
    jsc: JetStreamContext, nc: Client
) -> None:
    seen: dict[str, int] = defaultdict(int)
    done = asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        seen[event.event_id] += 1
        if event.event_id == "e1":
            raise Reject("never going to work")
        if event.event_id == "e2" and seen["e2"] < 2:
            raise Retry("not yet", delay_s=0.2)
        done.set()

    c, _ = consumer(nc, jsc, handler)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    await publish(jsc, "inbound.api.b", message(2, "b"))
    await asyncio.wait_for(done.wait(), 10)
    await settled(jsc, SPEC)
    await c.stop(5)
    assert seen == {"e1": 1, "e2": 2}
    letters = await dead_letters(jsc)
    assert [d.reason for d in letters] == ["never going to work"]


async def test_a_crashing_handler_is_retried_then_dead_lettered(
    jsc: JetStreamContext, nc: Client
) -> None:
    attempts: list[int] = []

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        raise RuntimeError("bug")

    c, metrics = consumer(nc, jsc, handler)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    letters = await dead_letters(jsc, timeout=15)
    await c.stop(5)
    assert attempts == [1, 2, 3]
    assert len(letters) == 1 and "gave up" in letters[0].reason
    exhausted = metrics.registry.get_sample_value(
        "podium_dead_letters_total", {"consumer": SPEC.durable, "reason": "exhausted"}
    )
    assert exhausted == 1


async def test_same_key_is_serial_and_ordered_other_keys_run_in_parallel(
    jsc: JetStreamContext, nc: Client
) -> None:
    running: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    order: dict[str, list[str]] = defaultdict(list)
    overall_peak = 0
    total = 0
    done = asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        nonlocal overall_peak, total
        key = event.conversation_id
        running[key] += 1
        peak[key] = max(peak[key], running[key])
        overall_peak = max(overall_peak, sum(running.values()))
        await asyncio.sleep(0.05)
        order[key].append(event.event_id)
        running[key] -= 1
        total += 1
        if total == 30:
            done.set()

    c, _ = consumer(nc, jsc, handler, concurrency=8, order_key=lambda e: e.conversation_id)
    c.start()
    for n in range(30):
        conv = f"c{n % 3}"
        await publish(jsc, f"inbound.api.{conv}", message(n, conv))
    await asyncio.wait_for(done.wait(), 20)
    await c.stop(5)
    assert all(p == 1 for p in peak.values())
    assert overall_peak > 1
    for n in range(3):
        assert order[f"c{n}"] == [f"e{i}" for i in range(30) if i % 3 == n]


async def test_stop_hands_unfinished_work_back_for_redelivery(
    jsc: JetStreamContext, nc: Client
) -> None:
    started = asyncio.Event()

    async def slow(event: AnyEvent, delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(60)

    c, _ = consumer(nc, jsc, slow)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    await asyncio.wait_for(started.wait(), 10)
    await c.stop(0.2)

    got: list[int] = []
    done = asyncio.Event()

    async def quick(event: AnyEvent, delivery: Delivery) -> None:
        got.append(delivery.num_delivered)
        done.set()

    c2, _ = consumer(nc, jsc, quick)
    c2.start()
    # Nak'ed at shutdown: back well before ack_wait would have expired.
    await asyncio.wait_for(done.wait(), 1.5)
    await c2.stop(5)
    assert got == [2]


class SwallowsCancellation:
    """A JetStream context whose consumer_info swallows a cancellation, as nats-py's
    requests (``asyncio.wait_for`` on Python 3.11) do when the reply and the
    cancellation arrive together."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.asked = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._js, name)

    async def consumer_info(self, stream: str, durable: str) -> object:
        self.asked.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.5)
        return await self._js.consumer_info(stream, durable)


async def test_stop_is_prompt_even_when_a_request_swallows_the_cancellation(
    jsc: JetStreamContext, nc: Client
) -> None:
    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        pass

    swallowing = SwallowsCancellation(jsc)
    c, _ = consumer(nc, cast("JetStreamContext", swallowing), handler, lag_interval_s=60)
    c.start()
    await asyncio.wait_for(swallowing.asked.wait(), 5)
    # Before: the lag watcher went on to sleep 60 s and stop() waited for it.
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(c.stop(1), 5)
    assert time.monotonic() - started < 3


async def test_ordered_consumer_retries_in_place_so_nothing_overtakes(
    jsc: JetStreamContext, nc: Client
) -> None:
    seen: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        seen.append((event.event_id, delivery.attempt))
        if event.event_id == "e1" and delivery.attempt < 3:
            raise Retry("agent busy", delay_s=0.1)
        if event.event_id == "e2":
            done.set()

    c, _ = consumer(nc, jsc, handler, order_key=lambda e: e.conversation_id, retry_in_place=True)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    await publish(jsc, "inbound.api.a", message(2, "a"))
    await asyncio.wait_for(done.wait(), 10)
    await c.stop(5)
    # e1 was retried in place (attempts 1, 2, 3) and e2 waited for it.
    assert seen == [("e1", 1), ("e1", 2), ("e1", 3), ("e2", 1)]


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    for attempt, plain in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (9, 5.0)):
        delays = [backoff(attempt, base=0.5, cap=5.0) for _ in range(200)]
        assert min(delays) >= plain * (1 - JITTER) - 1e-9
        assert max(delays) <= min(plain * (1 + JITTER), 5.0) + 1e-9
        # Spread, so that replicas that failed together do not retry together.
        assert max(delays) > min(delays)


async def test_one_pull_request_serves_many_messages(jsc: JetStreamContext, nc: Client) -> None:
    """Messages come to an open pull request: none costs a request of its own."""
    requests = 0

    async def count(msg: object) -> None:
        nonlocal requests
        requests += 1

    spy = await nc.subscribe(subjects.pull_request(SPEC.stream, SPEC.durable), cb=count)
    await nc.flush()
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        handled.append(event.event_id)
        if len(handled) == 20:
            done.set()

    c, _ = consumer(nc, jsc, handler, concurrency=8, max_held=64, pull_expires_s=30.0)
    c.start()
    for n in range(20):
        await publish(jsc, f"inbound.api.c{n}", message(n, f"c{n}"))
    await asyncio.wait_for(done.wait(), 10)
    await settled(jsc, SPEC)
    await c.stop(5)
    await spy.unsubscribe()
    assert sorted(handled) == sorted(f"e{n}" for n in range(20))
    # The first request asked for all the room; more only as handlers freed half of it.
    assert requests <= 3


async def test_consuming_goes_on_after_the_server_restarts(
    nats_server: NatsServer, jsc: JetStreamContext, nc: Client
) -> None:
    """The open pull requests die with the server; the consumer asks again."""
    handled: list[str] = []
    first, second = asyncio.Event(), asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        handled.append(event.event_id)
        (first if event.event_id == "e1" else second).set()

    c, _ = consumer(nc, jsc, handler, pull_expires_s=1.0)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    await asyncio.wait_for(first.wait(), 10)
    nats_server.stop()
    nats_server.start()
    deadline = time.monotonic() + 20
    while not nc.is_connected:
        assert time.monotonic() < deadline, "the client never reconnected"
        await asyncio.sleep(0.05)
    # JetStream takes a moment longer than the client to come back.
    while True:
        try:
            await publish(jsc, "inbound.api.a", message(2, "a"), timeout_s=1.0)
            break
        except (TimeoutError, NatsTimeoutError):
            assert time.monotonic() < deadline, "JetStream never came back"
    await asyncio.wait_for(second.wait(), 20)
    await c.stop(5)
    assert handled == ["e1", "e2"]


async def test_a_missing_consumer_is_a_problem_until_it_exists(
    js: JetStreamContext, nc: Client
) -> None:
    """Pulling from a consumer nobody provisioned says so (readiness shows it)."""
    handled = asyncio.Event()

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        handled.set()

    c, _ = consumer(nc, js, handler)
    c.start()
    deadline = time.monotonic() + 10
    while not c.problem:
        assert time.monotonic() < deadline, "no problem reported"
        await asyncio.sleep(0.02)
    assert f"{SPEC.stream}/{SPEC.durable}" in c.problem
    await js.add_consumer(SPEC.stream, provision.consumer_config(SPEC))
    await publish(js, "inbound.api.a", message(1, "a"))
    await asyncio.wait_for(handled.wait(), 10)
    assert c.problem == ""
    await c.stop(5)


async def test_a_released_slot_lets_the_next_message_start(
    jsc: JetStreamContext, nc: Client
) -> None:
    """With one slot, a handler that releases it (a worker whose agent has answered)
    lets the next message run while it finishes its own bookkeeping."""
    finishing = asyncio.Event()
    second_ran = asyncio.Event()
    order: list[str] = []

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        order.append(f"start {event.event_id}")
        if event.event_id == "e1":
            delivery.release()
            delivery.release()  # idempotent: a second call frees nothing more
            await finishing.wait()
        else:
            second_ran.set()
        order.append(f"end {event.event_id}")

    c, _ = consumer(nc, jsc, handler, concurrency=1, max_held=1)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    await publish(jsc, "inbound.api.b", message(2, "b"))
    await asyncio.wait_for(second_ran.wait(), 10)
    finishing.set()
    await settled(jsc, SPEC)
    await c.stop(5)
    assert order == ["start e1", "start e2", "end e2", "end e1"]


async def test_a_held_consumer_takes_nothing_until_it_lets_go(
    jsc: JetStreamContext, nc: Client
) -> None:
    """While hold() says so (a worker whose agent cannot start), what it had asked for
    stops coming: the next message waits at the server for another replica, or for it."""
    holding = False
    asked_while_holding = asyncio.Event()
    handled: list[str] = []
    first = asyncio.Event()

    def hold() -> bool:
        if holding:
            asked_while_holding.set()
        return holding

    async def handler(event: AnyEvent, delivery: Delivery) -> None:
        handled.append(event.event_id)
        first.set()

    c, _ = consumer(nc, jsc, handler, hold=hold, pull_expires_s=30.0)
    c.start()
    await publish(jsc, "inbound.api.a", message(1, "a"))
    await asyncio.wait_for(first.wait(), 10)
    await settled(jsc, SPEC)
    holding = True
    asked_while_holding.clear()
    # The loop has seen the hold (and dropped the open request) before this is stored.
    await asyncio.wait_for(asked_while_holding.wait(), 10)
    await publish(jsc, "inbound.api.a", message(2, "a"))
    await nc.flush()
    info = await jsc.consumer_info(SPEC.stream, SPEC.durable)
    assert (info.num_pending, info.num_ack_pending, handled) == (1, 0, ["e1"])
    holding = False
    await settled(jsc, SPEC)
    await c.stop(5)
    assert handled == ["e1", "e2"]
