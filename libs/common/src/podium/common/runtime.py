"""The service runtime: connect, provision, serve, and stop gracefully.

Every service's ``main()`` reads its settings, builds its ``Service`` and calls
:func:`run`. The runtime owns what all four have in common:

1. JSON logging, a ``/healthz`` ``/readyz`` ``/metrics`` side port;
2. the service's own start-up checks (its agent CLI), then connecting to NATS
   (retrying until it answers, refusing a server too old for Podium) and
   idempotent provisioning;
3. on SIGTERM/SIGINT: stop taking work, let in-flight work finish up to
   ``PODIUM_DRAIN_TIMEOUT_S``, cancel the rest (their messages are nak'ed and
   redelivered elsewhere), then drain the NATS connection — all of it within
   the drain timeout plus :data:`CLOSE_GRACE_S`, even if NATS is gone.

A fault that a restart cannot fix stops the service at start with one line
naming it and exit status 2 (:class:`~podium.common.errors.StartupError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from podium.common import logs
from podium.common.backoff import backoff
from podium.common.bus import connect, server_problem, shown_url
from podium.common.config import CommonSettings
from podium.common.errors import EXIT_STARTUP, NatsUnreachable, StartupError
from podium.common.metrics import Metrics
from podium.common.provision import missing_streams, provision
from podium.contracts import subjects
from podium.contracts.streams import TOPOLOGY

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a running service gets from the runtime."""

    name: str
    nc: Client
    js: JetStreamContext
    metrics: Metrics
    registry: CollectorRegistry
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    #: The NATS URL(s) as they may be shown (no password).
    nats_url: str = ""
    #: The owner of the service's long-lived loops (fetching, lag, leases, watchdogs).
    loops: Loops | None = None

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a long-lived loop owned by the service (see :class:`Loops`)."""
        return self.loops.spawn(work, name) if self.loops else detached(work, name)


#: How a component starts a long-lived loop: ``Context.spawn``, or ``detached`` where no
#: service owns it (a component used on its own, in a tool or a test).
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def detached(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A loop nobody owns (no service): a plain task."""
    return asyncio.create_task(work, name=name)


class Loops:
    """A service's long-lived loops, owned together by one :class:`asyncio.TaskGroup`.

    Components stop their own loops in order as the service stops (the consumer
    first stops fetching, then lets handlers finish); what is left when the
    service has stopped is cancelled here, so :func:`run` never returns with a
    loop still running. A loop that *fails* (raises) is a bug no retry inside it
    caught: it is logged, and the service stops (gracefully, as on SIGTERM) and
    :func:`run` raises that error, so the process exits and is restarted instead
    of staying ready with a loop that no longer runs.
    """

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._running: set[asyncio.Task[None]] = set()
        self._failed = asyncio.Event()
        #: The first loop failure, raised by ``run`` once the service has stopped.
        self.failure: BaseException | None = None

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start ``work`` as one of the service's loops."""
        task = self._group.create_task(self._loud(work, name), name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _loud(self, work: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("a long-lived loop failed; the service stops", extra={"loop": name})
            if self.failure is None:
                self.failure = err
            self._failed.set()

    async def until(self, stop: asyncio.Event) -> None:
        """Wait until ``stop`` is set or a loop has failed."""
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._failed.wait())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()

    async def cancel_rest(self, timeout_s: float = 5.0) -> None:
        """Cancel the loops still running (the service has stopped); wait for them.

        Cancelled again every half second: a loop may swallow one cancellation (a
        library call that catches it), and the task group waits for every loop.
        """
        deadline = time.monotonic() + timeout_s
        while self._running:
            for task in self._running:
                task.cancel()
            await asyncio.wait(set(self._running), timeout=0.5)
            if self._running and time.monotonic() > deadline:
                log.error(
                    "loops do not stop when cancelled",
                    extra={"loops": sorted(t.get_name() for t in self._running)},
                )
                deadline = time.monotonic() + timeout_s


class Service(Protocol):
    """A Podium service, driven by :func:`run`."""

    name: str
    #: Streams that must exist for the service to be ready.
    streams: Sequence[str]

    async def check(self) -> None:
        """Check what the service needs besides NATS (its agent CLI, …), before connecting.

        Raises :class:`~podium.common.errors.StartupError` naming the fault.
        """

    async def start(self, ctx: Context) -> None:
        """Start consuming/serving; return once started."""

    async def stop(self, timeout_s: float) -> None:
        """Stop taking work; wait for in-flight work up to ``timeout_s``; cancel the rest."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): whether the service can do its work now, beyond NATS and streams."""


class HealthServer:
    """The HTTP side port: liveness, readiness and Prometheus metrics."""

    def __init__(self, service: Service, registry: CollectorRegistry, host: str, port: int) -> None:
        self.service = service
        self.registry = registry
        self.host = host
        self.port = port
        self.ctx: Context | None = None
        self._runner: web.AppRunner | None = None
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "starting")

    async def start(self) -> None:
        """Listen; with port 0, ``self.port`` becomes the port picked."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            self.port = await listen(self._runner, self.host, self.port)
        except OSError as err:
            await self._runner.cleanup()
            raise StartupError(
                f"PODIUM_HEALTH_PORT={self.port}: cannot listen on {self.host}:{self.port} "
                f"({err.strerror or err})"
            ) from err

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": self.service.name})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, reason = await self.readiness()
        return web.json_response(
            {"ready": ready, "reason": reason, "service": self.service.name},
            status=200 if ready else 503,
        )

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): NATS connected to a usable server, streams present, the service
        able to work, not stopping. The reason says why not, or what the service reports."""
        ctx = self.ctx
        if ctx is None:
            return False, "connecting to NATS"
        if ctx.stopping.is_set():
            return False, "stopping"
        if not ctx.nc.is_connected:
            return False, "NATS disconnected"
        problem = server_problem(ctx.nc, ctx.nats_url)
        if problem is not None:
            return False, problem
        ready, reason = self.service.readiness()
        if not ready:
            return False, reason
        checked_at, ok, stream_reason = self._ready_cache
        # Checking streams costs a request per stream: cache the answer briefly.
        if time.monotonic() - checked_at > 5.0:
            try:
                missing = await missing_streams(ctx.js, tuple(self.service.streams))
            except Exception as err:  # noqa: BLE001 - any failure means not ready
                ok, stream_reason = False, f"stream check failed: {err!r}"
            else:
                ok = not missing
                stream_reason = "ok" if ok else "missing streams: " + ", ".join(missing)
            self._ready_cache = (time.monotonic(), ok, stream_reason)
        return (True, reason) if ok else (False, stream_reason)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def connect_until_ready(
    settings: CommonSettings, name: str, stop: asyncio.Event
) -> Client | None:
    """Connect as service ``name``, retrying with backoff until NATS answers or ``stop`` is set.

    None once ``stop`` is set (a SIGTERM is obeyed even if NATS never answered).
    An incompatible server raises :class:`~podium.common.errors.IncompatibleServer`:
    no retry makes it usable. Replies come to the service's own inbox prefix, the
    only one its NATS user may subscribe to (see :mod:`podium.contracts.access`).
    """
    tries = 0
    while not stop.is_set():
        attempt = asyncio.create_task(
            connect(settings, name=f"podium-{name}", inbox_prefix=subjects.inbox_prefix(name))
        )
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({attempt, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if attempt not in done:
            attempt.cancel()
            await asyncio.wait({attempt}, timeout=2)
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                await attempt.result().close()
            return None
        tries += 1
        delay = backoff(tries, base=0.25, cap=5.0)
        try:
            return attempt.result()
        except NatsUnreachable as err:
            log.warning(
                "NATS not reachable, retrying",
                extra={"nats_url": err.url, "error": err.reason, "retry_in_s": delay},
            )
        await wait_set(stop, delay)
    return None


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``event``; whether it was set.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11, ``wait_for`` can
    swallow a cancellation that arrives as its timeout fires, and a loop built on
    it then never stops (seen here: a conductor that would not shut down).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


#: How long closing may take after in-flight work had its drain timeout: the whole
#: stop takes at most ``PODIUM_DRAIN_TIMEOUT_S`` + this (Kubernetes' grace is above it).
CLOSE_GRACE_S = 5.0


async def run(
    service: Service,
    settings: CommonSettings,
    *,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
    stop: asyncio.Event | None = None,
    signals: bool = True,
    health: HealthServer | None = None,
) -> None:
    """Run ``service`` until SIGTERM/SIGINT (or ``stop`` is set), then stop gracefully.

    A fault a restart cannot fix (settings, an incompatible server, an agent CLI
    that cannot run, a port in use) raises :class:`~podium.common.errors.StartupError`.
    """
    stop = stop or asyncio.Event()
    if signals:
        install_signal_handlers(stop)
    registry = registry or CollectorRegistry()
    metrics = metrics or Metrics(registry, service.name)
    health = health or HealthServer(service, registry, settings.health_host, settings.health_port)
    await health.start()
    log.info("health port listening", extra={"port": health.port})
    try:
        if not await _unless_stopped(service.check(), stop):
            log.info("stopped during the start-up checks")
            return
        nc = await connect_until_ready(settings, service.name, stop)
        if nc is None:
            log.info("stopped before NATS answered", extra={"nats_url": shown_url(settings)})
            return
        try:
            js = nc.jetstream()
            if settings.provision:
                await provision(
                    js,
                    TOPOLOGY,
                    replicas=settings.stream_replicas,
                    budget=settings.store_budget_bytes,
                )
            try:
                async with asyncio.TaskGroup() as group:
                    loops = Loops(group)
                    ctx = Context(
                        service.name,
                        nc,
                        js,
                        metrics,
                        registry,
                        nats_url=shown_url(settings),
                        loops=loops,
                    )
                    await service.start(ctx)
                    health.ctx = ctx
                    # What start-up built lives as long as the process: moved out of the
                    # collector's way, so that a full collection scans only what the work
                    # made since (a full one took 20-50 ms: the whole loop's p99).
                    gc.collect()
                    gc.freeze()
                    log.info("started", extra={"nats_url": ctx.nats_url})
                    await loops.until(stop)
                    log.info("stopping", extra={"drain_timeout_s": settings.drain_timeout_s})
                    ctx.stopping.set()
                    await _stop_within(service, nc, settings.drain_timeout_s)
                    await loops.cancel_rest()
                    if loops.failure is not None:
                        raise loops.failure
            except BaseExceptionGroup as group:
                # The task group wraps what its body raised: raise it as it was (a
                # StartupError must reach serve_forever as one, for its exit status).
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()
        log.info("stopped")
    finally:
        await health.stop()


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it); whether it finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task in done:
        task.result()
        return True
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    return False


async def _stop_within(service: Service, nc: Client, drain_timeout_s: float) -> None:
    """``service.stop`` then draining the connection, all within the drain timeout plus
    :data:`CLOSE_GRACE_S`: even with NATS gone, the process exits in time."""
    try:
        async with asyncio.timeout(drain_timeout_s + CLOSE_GRACE_S):
            await service.stop(drain_timeout_s)
            # Drain only if the server is there to drain to; else closing is all.
            if nc.is_connected:
                with contextlib.suppress(Exception):
                    await nc.drain()
    except TimeoutError:
        log.error(  # noqa: TRY400 - a deadline, not a fault: no traceback
            "stopping took longer than the drain timeout allows; exiting anyway",
            extra={"drain_timeout_s": drain_timeout_s, "grace_s": CLOSE_GRACE_S},
        )


async def listen(runner: web.AppRunner, host: str, port: int) -> int:
    """Serve ``runner`` (set up) on ``host:port``; the port bound, the one picked for 0."""
    site = web.TCPSite(runner, host, port)
    await site.start()
    # aiohttp has no public accessor for the bound port.
    for sock in getattr(site._server, "sockets", None) or []:  # noqa: SLF001
        return int(sock.getsockname()[1])
    return port


def serve_forever(main: Coroutine[Any, Any, None], service: str) -> None:
    """Run a service's main coroutine to completion, on uvloop where it is installed.

    uvloop (libuv) runs the same asyncio code with a much cheaper event loop: the
    ingress's webhook path spends a fifth of its time in the loop itself. A
    :class:`~podium.common.errors.StartupError` ends the process with one line
    naming the fault and status :data:`~podium.common.errors.EXIT_STARTUP`, which
    tells a supervisor (``podium up``) that restarting will not help.
    """
    try:
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:  # pragma: no cover - a platform without uvloop wheels
            asyncio.run(main)
            return
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    except StartupError as err:
        print(f"podium-{service}: cannot start: {err}", file=sys.stderr, flush=True)  # noqa: T201
        raise SystemExit(EXIT_STARTUP) from None


def configure_logging(service: str, settings: CommonSettings) -> None:
    """JSON logs for ``service`` at the configured level."""
    logs.configure(service, settings.log_level)
