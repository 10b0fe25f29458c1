"""The pull-consumer loop every service uses, with the redelivery policy in one place.

What happens to a message is decided here, by the type of what the handler
raises (see :mod:`podium.common.errors`):

=====================  =========================================================
handler outcome        action
=====================  =========================================================
returns                ``ack``
``Retry(delay_s)``     ``nak(delay_s)``; dead-lettered once ``max_deliver`` is hit
``Reject(reason)``     ``term`` + dead letter (the message can never succeed)
undecodable payload    ``term`` + dead letter (a poison message)
any other exception    ``nak`` with exponential backoff, dead-lettered at the end
shutdown cancellation  ``nak`` at once, so another replica takes it
=====================  =========================================================

Before a decodable message is dead-lettered, the service's ``on_dead_letter``
hook turns it into a visible outcome (the worker: a FAILED result; the
conductor: an escalation to the operator), so no request is stranded. An
undecodable one cannot be attributed: it is counted (``podium_dead_letters_total``,
alerted on) and kept in DEADLETTER.

An ordered consumer (``retry_in_place=True``, the conductor's) retries a
``Retry`` or a crash in place, holding the message and its lane, so that the
next message of the same conversation can never overtake it.

While a handler runs, ``in_progress`` is sent every third of ``ack_wait`` so
JetStream does not redeliver work that is still going on. Messages that share
an ``order_key`` (a conversation) are handled strictly one after another, in
the order they were fetched; others run concurrently up to ``concurrency``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext

from podium.common import logs
from podium.common.backoff import backoff
from podium.common.bus import publish
from podium.common.errors import Reject, Retry
from podium.common.metrics import Metrics
from podium.common.runtime import Spawn, detached, wait_set
from podium.contracts import subjects
from podium.contracts.events import AnyEvent, DeadLetter, decode, event_type
from podium.contracts.ids import stable_id
from podium.contracts.streams import ConsumerSpec

log = logging.getLogger(__name__)

#: How long one pull request stays open at the server (its ``expires``). The consumer
#: keeps requests open all the time, so this is only how often an idle one renews them.
PULL_EXPIRES_S = 5.0
#: How long past its expiry a pull request is still counted on, waiting for the
#: server's 408 that ends it; after that (a reconnect or a server restart lost it, or
#: the 408) the consumer asks again.
_PULL_GRACE_S = 1.0
#: How often a consumer with a ``hold`` asks it, while it waits.
_HOLD_CHECK_S = 0.5
#: After the server refused a pull (no such consumer), about how long until the next one.
_PULL_PAUSE_S = 1.0


@dataclass
class _Pull:
    """One pull request open at the server: messages it may still bring, and when the
    server has surely ended it."""

    remaining: int
    until: float


@dataclass(frozen=True)
class Delivery:
    """What a handler may want to know about the message besides its event."""

    subject: str
    stream_seq: int
    num_delivered: int
    msg: Msg
    #: Which attempt this is: deliveries so far, plus retries in place (see PullConsumer).
    attempt: int = 1
    #: Gives the handler's slot back before it returns (see :meth:`release`).
    _release: Callable[[], None] = field(default=lambda: None, repr=False)

    def release(self) -> None:
        """Done with what the slot stands for (a worker: its agent has answered).

        What is left of the handler (storing, publishing) no longer counts against the
        consumer's concurrency, so the next message may start meanwhile. Idempotent.
        """
        self._release()

    async def in_progress(self) -> None:
        """Tell JetStream the message is still being worked on (resets ack_wait)."""
        with contextlib.suppress(Exception):
            await self.msg.in_progress()


Handler = Callable[[AnyEvent, Delivery], Awaitable[None]]
#: Called with an event and the reason before it is dead-lettered: the service turns
#: it into a visible outcome (a FAILED result, an escalation). It must be idempotent
#: (stable event ids), since a dead letter that cannot be recorded is tried again.
DeadLetterHook = Callable[[AnyEvent, str], Awaitable[None]]


class Lanes:
    """Per-key ordering and handler slots; consumers of one service may share them."""

    def __init__(self, concurrency: int) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        # Last task per order key: the next message with that key waits for it.
        self.tails: dict[str, asyncio.Task[None]] = {}


OrderKey = Callable[[AnyEvent], str | None]


class PullConsumer:
    """Pulls from one durable pull consumer and runs a handler per message.

    Messages are pulled the way nats.go's and nats.js's ``consume`` do, which
    nats-py 2.16 does not offer: pull requests (JetStream's documented
    ``{"batch", "expires"}`` request on ``$JS.API.CONSUMER.MSG.NEXT``, published
    with nats-py on the service's connection) stay open at the server for as many
    messages as the consumer has room for, and the server delivers each message to
    the consumer's inbox the moment it is stored. nats-py's ``fetch`` instead
    returns a batch only once it is full or its timeout has passed (nats.py #986),
    so a consumer had to choose between waiting (latency: a message sat out the
    timeout) and asking again and again (three or four requests a message at a
    conductor partition's rate: most of a conversation's bus traffic). Here a message
    costs no request of its own: one request asks for up to half the room at once.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        service: str,
        metrics: Metrics,
        concurrency: int = 16,
        max_held: int | None = None,
        order_key: OrderKey | None = None,
        pull_expires_s: float = PULL_EXPIRES_S,
        lanes: Lanes | None = None,
        retry_in_place: bool = False,
        lag_interval_s: float = 15.0,
        on_dead_letter: DeadLetterHook | None = None,
        hold: Callable[[], bool] | None = None,
        spawn: Spawn = detached,
    ) -> None:
        self.nc = nc
        self.js = js
        self.spec = spec
        self.handler = handler
        self.service = service
        self.metrics = metrics
        self.concurrency = concurrency
        self.order_key = order_key
        self.pull_expires_s = pull_expires_s
        self.lag_interval_s = lag_interval_s
        # Handlers running at once, and messages held (fetched, not yet settled):
        # held ones include those waiting behind an earlier message of their key.
        self.lanes = lanes or Lanes(concurrency)
        self.retry_in_place = retry_in_place
        self.on_dead_letter = on_dead_letter
        #: While it returns True, nothing new is fetched (the service cannot do the work
        #: now; another replica should get it first).
        self.hold = hold
        self.max_held = max_held or concurrency * 4
        #: Why pulling fails now ("" while it works): the service is not ready meanwhile.
        self.problem = ""
        # The pull requests open at the server, oldest first.
        self._pulls: collections.deque[_Pull] = collections.deque()
        # After a refusal or a 409, no request before this; refusals in a row.
        self._paused_until = 0.0
        self._refusals = 0
        # Set when there may be room to ask for more: a handler finished, a request ended.
        self._wake = asyncio.Event()
        # Running handlers that gave their slot back (Delivery.release).
        self._released = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        #: Who owns the fetch and lag loops: the service's (``Context.spawn``).
        self._spawn = spawn

    @property
    def name(self) -> str:
        """The durable consumer's name."""
        return self.spec.durable

    def start(self) -> None:
        """Start fetching in the background."""
        self._loop_task = self._spawn(self._run(), f"consume:{self.name}")
        self._lag_task = self._spawn(self._watch_lag(), f"lag:{self.name}")

    @property
    def in_flight(self) -> int:
        """Messages being handled now."""
        return len(self._tasks)

    async def stop(self, timeout_s: float) -> None:
        """Stop fetching, let in-flight handlers finish up to ``timeout_s``, cancel the rest.

        Cancelled handlers nak their message, so nothing is lost: another
        replica (or this one, restarted) handles it.
        """
        self._stopping.set()
        await self._stop_watching_lag()
        if self._loop_task is not None:
            await _cancel(self._loop_task, "fetch loop")
        # Drop the inbox now: the server then drops the requests still open on it.
        await self._unsubscribe()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "drain timeout: cancelled in-flight handlers",
                    extra={"consumer": self.name, "cancelled": len(pending)},
                )
                await asyncio.wait(pending, timeout=5)

    async def _run(self) -> None:
        subject = subjects.pull_request(self.spec.stream, self.spec.durable)
        inbox = self.nc.new_inbox()
        # Half the room at least per request: few requests in a burst, none per message.
        refill = max(1, self.max_held // 2)
        expires_ns = int(self.pull_expires_s * 1e9)
        reconnects = self.nc.stats["reconnects"]
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            if now < self._paused_until:
                await wait_set(self._stopping, self._paused_until - now)
                continue
            if not self.nc.is_connected:
                # Requests published now would wait in nats-py's buffer and all go out at
                # the reconnect, each for the whole room.
                await wait_set(self._stopping, 0.2)
                continue
            if self.nc.stats["reconnects"] != reconnects:
                # The requests went with the old connection.
                reconnects = self.nc.stats["reconnects"]
                self._pulls.clear()
            # A request the server has surely ended by now, whose 408 never came (a
            # restart, a lost connection), counts no more.
            while self._pulls and self._pulls[0].until <= now:
                self._pulls.popleft()
            if self.hold is not None and self.hold():
                if self._pulls:
                    # What the open requests would still bring goes back (nak), unfetched
                    # messages stay for another replica; asked again after the hold.
                    self._pulls.clear()
                    await self._unsubscribe()
                await wait_set(self._stopping, 0.5)
                continue
            credit = self._credit
            # Handlers that gave their slot back (Delivery.release) hold no room.
            room = self.max_held - len(self._tasks) + self._released - credit
            if room > 0 and (credit == 0 or room >= refill):
                try:
                    if self._sub is None:
                        self._sub = await self.nc.subscribe(inbox, cb=self._on_message)
                    request = json.dumps({"batch": room, "expires": expires_ns}).encode()
                    await self.nc.publish(subject, request, reply=inbox)
                except ConnectionClosedError:
                    return
                self._pulls.append(_Pull(room, now + self.pull_expires_s + _PULL_GRACE_S))
            # Until something frees room or ends a request, or the oldest request lapses;
            # with none open (no room), until a handler finishes.
            if self._pulls:
                timeout = max(0.01, self._pulls[0].until - time.monotonic())
            else:
                timeout = self.pull_expires_s
            if self.hold is not None:
                # hold() is asked, not told: look again soon.
                timeout = min(timeout, _HOLD_CHECK_S)
            await wait_set(self._wake, timeout)

    @property
    def _credit(self) -> int:
        """Messages asked for and not yet delivered (nor ended by the server)."""
        return sum(pull.remaining for pull in self._pulls)

    async def _on_message(self, msg: Msg) -> None:
        """A message for this consumer, or the server's word on a pull request."""
        status = msg.headers.get("Status") if msg.headers else None
        if not status:
            # The server serves a consumer's waiting requests in the order they came.
            if self._pulls:
                self._pulls[0].remaining -= 1
                if self._pulls[0].remaining <= 0:
                    self._pulls.popleft()
            self.problem = ""
            if self._stopping.is_set():
                with contextlib.suppress(Exception):
                    await msg.nak()  # another replica (or this one, restarted) takes it
                return
            self._dispatch(msg)
            return
        if status == "100":
            return  # an idle heartbeat (none is asked for)
        headers = msg.headers or {}
        description = headers.get("Description", "")
        if status in ("408", "409") and "Nats-Pending-Messages" in headers:
            # The oldest request ended (expired, or cut short), the others are still open.
            if self._pulls:
                self._pulls.popleft()
        else:
            # A leader change, too many waiting requests, a refusal: none is open any more.
            self._pulls.clear()
        why = ""
        if status == "503":
            why = "no JetStream consumer answers (it is not provisioned, or JetStream is down)"
        elif status == "409" and "deleted" in description.lower():
            why = "it was deleted"
        elif status not in ("408", "409"):
            why = f"{status} {description}"
        # A 408 or another 409 came from the consumer itself: it is there and answers.
        self.problem = f"consumer {self.spec.stream}/{self.name} cannot fetch: {why}" if why else ""
        if self.problem:
            log.warning(
                "pull refused",
                extra={"consumer": self.name, "status": status, "description": description},
            )
        if status != "408":
            # Not at once again: a refusal, or a 409 that would come back as fast as asked.
            self._refusals += 1
            self._paused_until = time.monotonic() + backoff(
                self._refusals, base=_PULL_PAUSE_S / 4, cap=_PULL_PAUSE_S * 5
            )
        else:
            self._refusals = 0
        self._wake.set()

    async def _watch_lag(self) -> None:
        """Poll the consumer's pending counts into gauges (its lag, for alerts and dashboards).

        Separate from the fetch loop, so a replica whose handlers are all busy
        still reports the backlog growing behind them.
        """
        labels = (self.spec.stream, self.spec.durable)
        # Not `while True`: nats-py's requests wait with `wait_for`, which on Python 3.11
        # can swallow the cancellation stop() sends (seen: a stop that hung for good).
        while not self._stopping.is_set():
            try:
                info = await self.js.consumer_info(*labels)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a gauge is not worth failing for
                log.debug("consumer info failed", extra={"consumer": self.name, "error": repr(err)})
            else:
                self.metrics.consumer_pending.labels(*labels).set(info.num_pending or 0)
                self.metrics.consumer_ack_pending.labels(*labels).set(info.num_ack_pending or 0)
            await wait_set(self._stopping, self.lag_interval_s)

    async def _stop_watching_lag(self) -> None:
        task, self._lag_task = self._lag_task, None
        if task is not None:
            await _cancel(task, "lag watcher")
        # A consumer this replica no longer runs is reported by whoever runs it now.
        labels = (self.spec.stream, self.spec.durable)
        for gauge in (self.metrics.consumer_pending, self.metrics.consumer_ack_pending):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    async def _unsubscribe(self) -> None:
        """Stop the server delivering here; what it sent already is handed back (nak)."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            # Drain: the server drops the requests still open on the inbox, and messages
            # already on their way reach _on_message, which gives them back while stopping.
            async with asyncio.timeout(2.0):
                await sub.drain()  # type: ignore[no-untyped-call]
        except Exception:  # noqa: BLE001 - closed, draining or slow: just stop listening
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _dispatch(self, msg: Msg) -> None:
        event: AnyEvent | None
        try:
            event = decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            event = None
            poison_reason = f"undecodable: {err}"
        predecessor: asyncio.Task[None] | None = None
        key = self.order_key(event) if (event is not None and self.order_key) else None
        if key is not None:
            predecessor = self.lanes.tails.get(key)
        task = asyncio.create_task(
            self._handle(msg, event, predecessor, poison_reason if event is None else "")
        )
        self._tasks.add(task)
        self.metrics.in_flight.labels(self.name).inc()
        task.add_done_callback(self._done)
        if key is not None:
            self.lanes.tails[key] = task
            task.add_done_callback(functools.partial(self._forget_tail, key))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.in_flight.labels(self.name).dec()
        self._wake.set()

    def _forget_tail(self, key: str, task: asyncio.Task[None]) -> None:
        if self.lanes.tails.get(key) is task:
            del self.lanes.tails[key]

    async def _handle(
        self,
        msg: Msg,
        event: AnyEvent | None,
        predecessor: asyncio.Task[None] | None,
        poison_reason: str,
    ) -> None:
        meta = msg.metadata
        delivery = Delivery(
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            num_delivered=meta.num_delivered,
            msg=msg,
            attempt=meta.num_delivered,
        )
        if delivery.num_delivered > 1:
            self.metrics.redeliveries.labels(self.name).inc()
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        if event is None:
            try:
                await self._dead_letter(msg, delivery, poison_reason, kind="poison")
            finally:
                heartbeat.cancel()
            self.metrics.events_in.labels(self.name, "unknown", "dead_letter").inc()
            return
        kind = event_type(event)
        context = logs.bound(
            correlation_id=event.correlation_id,
            event_id=event.event_id,
            conversation_id=event.conversation_id,
        )
        try:
            with context:
                if predecessor is not None:
                    # Strict per-key order: wait for the earlier message, whatever its fate.
                    await asyncio.wait({predecessor})
                await self.lanes.slots.acquire()
                released = False

                def release() -> None:
                    nonlocal released
                    if not released:
                        released = True
                        self.lanes.slots.release()
                        self._released += 1
                        self._wake.set()

                started = time.perf_counter()
                try:
                    outcome = await self._run_handler(
                        event, dataclasses.replace(delivery, _release=release)
                    )
                finally:
                    if released:
                        self._released -= 1
                    else:
                        released = True
                        self.lanes.slots.release()
                self.metrics.handle_seconds.labels(self.name, kind).observe(
                    time.perf_counter() - started
                )
                self.metrics.events_in.labels(self.name, kind, outcome).inc()
        except asyncio.CancelledError:
            # Cancelled before it was settled (shutdown): hand it back at once.
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        finally:
            heartbeat.cancel()

    async def _run_handler(self, event: AnyEvent, delivery: Delivery) -> str:
        if not self.retry_in_place:
            return await self._attempt(event, delivery)
        # Ordered consumers retry without giving the message back: a nak would let
        # the next message of its key overtake it. The lane stays held meanwhile.
        while True:
            outcome, delay = await self._attempt_in_place(event, delivery)
            if delay is None:
                return outcome
            log.info(
                "retrying in place",
                extra={"consumer": self.name, "attempt": delivery.attempt, "delay_s": delay},
            )
            await asyncio.sleep(delay)
            delivery = dataclasses.replace(delivery, attempt=delivery.attempt + 1)

    async def _attempt_in_place(
        self, event: AnyEvent, delivery: Delivery
    ) -> tuple[str, float | None]:
        """One attempt; (outcome, None) when settled, or ("retry", delay) to try again."""
        last_try = delivery.attempt >= self.spec.max_deliver
        try:
            await self.handler(event, delivery)
        except Retry as err:
            if last_try:
                reason = f"gave up: {err.reason}"
                await self._dead_letter(
                    delivery.msg, delivery, reason, kind="exhausted", event=event
                )
                return "dead_letter", None
            return "retry", err.delay_s
        except Reject as err:
            await self._dead_letter(
                delivery.msg, delivery, err.reason, kind="rejected", event=event
            )
            return "rejected", None
        except Exception as err:
            log.exception("handler failed", extra={"consumer": self.name})
            if last_try:
                reason = f"gave up: {err!r}"
                await self._dead_letter(
                    delivery.msg, delivery, reason, kind="exhausted", event=event
                )
                return "dead_letter", None
            return "retry", backoff(delivery.attempt, base=1.0, cap=60.0)
        await delivery.msg.ack()
        return "ok", None

    async def _attempt(self, event: AnyEvent, delivery: Delivery) -> str:
        msg = delivery.msg
        last_try = delivery.num_delivered >= self.spec.max_deliver
        try:
            await self.handler(event, delivery)
        except Reject as err:
            log.warning("rejected", extra={"consumer": self.name, "reason": err.reason})
            await self._dead_letter(msg, delivery, err.reason, kind="rejected", event=event)
            return "rejected"
        except Retry as err:
            if last_try:
                reason = f"gave up: {err.reason}"
                await self._dead_letter(msg, delivery, reason, kind="exhausted", event=event)
                return "dead_letter"
            log.info(
                "retry later",
                extra={"consumer": self.name, "reason": err.reason, "delay_s": err.delay_s},
            )
            await msg.nak(delay=err.delay_s)
            return "retry"
        except Exception as err:
            log.exception("handler failed", extra={"consumer": self.name})
            if last_try:
                reason = f"gave up: {err!r}"
                await self._dead_letter(msg, delivery, reason, kind="exhausted", event=event)
                return "dead_letter"
            await msg.nak(delay=backoff(delivery.num_delivered, base=1.0, cap=60.0))
            return "error"
        await msg.ack()
        return "ok"

    async def _heartbeat(self, delivery: Delivery) -> None:
        interval = max(self.spec.ack_wait_s / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            await delivery.in_progress()

    async def _dead_letter(
        self,
        msg: Msg,
        delivery: Delivery,
        reason: str,
        *,
        kind: str,
        event: AnyEvent | None = None,
    ) -> None:
        """Turn ``msg`` into its visible outcome, record it in DEADLETTER, then terminate it.

        The service's ``on_dead_letter`` hook runs first (a FAILED result, an
        escalation), then the record is written, then the message is terminated.
        Until both succeed they are tried again here, holding the message: a nak
        would not bring back a message that has used up its ``max_deliver``.
        """
        record = self._record(msg, delivery, reason)
        hook_done = event is None or self.on_dead_letter is None
        tries = 0
        # A shutdown meanwhile cancels this; the message is then lost to JetStream if it
        # used up its deliveries (the server's MAX_DELIVERIES advisory still tells).
        while True:
            try:
                if not hook_done and event is not None and self.on_dead_letter is not None:
                    await self.on_dead_letter(event, reason)
                    hook_done = True
                await publish(self.js, subjects.dead_letter(self.service, self.spec.stream), record)
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                tries += 1
                delay = backoff(tries, base=0.5, cap=5.0)
                log.exception(
                    "could not dead-letter the message; trying again",
                    extra={"consumer": self.name, "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
        await msg.term()
        self.metrics.dead_letters.labels(self.name, kind).inc()
        log.error(
            "dead letter",
            extra={
                "consumer": self.name,
                "subject": delivery.subject,
                "stream_seq": delivery.stream_seq,
                "reason": reason[:500],
            },
        )

    def _record(self, msg: Msg, delivery: Delivery, reason: str) -> DeadLetter:
        try:
            text = msg.data.decode("utf-8")
            payload, encoding = text, "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(msg.data).decode(), "base64"
        headers = dict(msg.headers or {})
        return DeadLetter(
            event_id=stable_id("deadletter", self.spec.stream, str(delivery.stream_seq)),
            correlation_id=headers.get(subjects.HDR_CORRELATION, ""),
            conversation_id="",
            service=self.service,
            stream=self.spec.stream,
            consumer=self.name,
            subject=delivery.subject,
            stream_seq=delivery.stream_seq,
            deliveries=delivery.num_delivered,
            reason=reason[:2000],
            headers=headers,
            payload=payload,
            payload_encoding=encoding,  # type: ignore[arg-type]
        )


async def _cancel(task: asyncio.Task[None], what: str, timeout_s: float = 5.0) -> None:
    """Cancel one of the consumer's own loops and wait for it to end.

    ``asyncio.wait``, not ``await task`` under ``suppress(CancelledError)``: that
    would also swallow a cancellation of the caller. The loops check the stop flag
    too, since nats-py can swallow the cancellation (its ``wait_for`` on 3.11).
    """
    task.cancel()
    _, pending = await asyncio.wait({task}, timeout=timeout_s)
    if pending:
        log.error("a consumer loop did not stop when cancelled", extra={"loop": what})
