"""Connecting to NATS and publishing events with Podium's headers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from podium.common.config import CommonSettings
from podium.common.errors import IncompatibleServer, NatsUnreachable
from podium.contracts import subjects
from podium.contracts.events import SCHEMA_VERSION, Event, encode, event_type

log = logging.getLogger(__name__)


def headers_for(event: Event, *, msg_id: str | None = None) -> dict[str, str]:
    """Headers of a publish: event type, schema version, correlation id, Nats-Msg-Id."""
    return {
        subjects.HDR_EVENT_TYPE: event_type(event),
        subjects.HDR_SCHEMA: str(SCHEMA_VERSION),
        subjects.HDR_CORRELATION: event.correlation_id,
        subjects.HDR_MSG_ID: msg_id or event.event_id,
    }


async def publish(
    js: JetStreamContext,
    subject: str,
    event: Event,
    *,
    msg_id: str | None = None,
    timeout_s: float = 5.0,
) -> PubAck:
    """Publish ``event`` durably and wait for JetStream's acknowledgement.

    ``msg_id`` (default: the event id) is the de-duplication key: publishing the
    same id again within the stream's duplicate window stores nothing and
    returns an ack with ``duplicate=True``.
    """
    ack: PubAck = await js.publish(
        subject, encode(event), timeout=timeout_s, headers=headers_for(event, msg_id=msg_id)
    )
    return ack


async def publish_soon(
    js: JetStreamContext, subject: str, event: Event, *, msg_id: str | None = None
) -> asyncio.Future[PubAck]:
    """Publish ``event`` durably without waiting: JetStream's acknowledgement comes in the
    returned future (await it with a timeout; nats-py's ``publish_async``). For what
    may be stored alongside other publishes rather than before them."""
    future: asyncio.Future[PubAck] = await js.publish_async(
        subject, encode(event), headers=headers_for(event, msg_id=msg_id)
    )
    return future


#: The oldest nats-server Podium works with: the conductor rewinds a partition's
#: consumers to their ack floor when it takes the partition over
#: (``$JS.API.CONSUMER.RESET``, server 2.14), and INBOUND and RESULTS partition
#: messages with stream subject transforms (2.10). Against an older server those
#: requests time out, so a service refuses it at connect instead.
MIN_SERVER_VERSION = (2, 14, 0)


def version_text(version: tuple[int, int, int]) -> str:
    """``(2, 14, 0)`` as ``2.14.0``."""
    return ".".join(str(part) for part in version)


def check_server(nc: Client, url: str) -> None:
    """Raise :class:`IncompatibleServer` if the connected server is too old for Podium."""
    needed = version_text(MIN_SERVER_VERSION)
    reported = nc.connected_server_version
    try:
        found = (reported.major, reported.minor, reported.patch)
    except ValueError:
        raise IncompatibleServer(url, f"an unreadable version ({reported!r})", needed) from None
    if found < MIN_SERVER_VERSION:
        raise IncompatibleServer(url, version_text(found), needed)


def server_problem(nc: Client, url: str) -> str | None:
    """Why the server ``nc`` is connected to cannot be used, or None if it can."""
    try:
        check_server(nc, url)
    except IncompatibleServer as err:
        return str(err)
    return None


def shown_url(settings: CommonSettings | str) -> str:
    """``NATS_URL`` as it may be shown: any user, password or token in it masked.

    nats-py reads ``nats://user:password@host`` and ``nats://token@host``; both
    are credentials, so the whole user part becomes ``***``.
    """
    url = settings if isinstance(settings, str) else settings.nats_url
    shown = []
    for server in (part.strip() for part in url.split(",")):
        scheme, sep, rest = server.rpartition("://")
        userinfo, at, hostport = rest.rpartition("@")
        shown.append(f"{scheme}{sep}***@{hostport}" if at and userinfo else server)
    return ",".join(shown)


async def connect(settings: CommonSettings, *, name: str, **options: Any) -> Client:
    """Connect to NATS, check the server, then stay connected (reconnecting forever).

    The first connection is bounded: each server is tried twice
    (``PODIUM_NATS_CONNECT_TIMEOUT_S`` per attempt), then :class:`NatsUnreachable`
    names the URL and the last error, so the caller decides whether to retry,
    stop or give up — nats-py's ``max_reconnect_attempts=-1`` would retry inside
    ``connect`` for ever, out of reach of a stop request. Once connected, lost
    connections are retried for ever. A server older than
    :data:`MIN_SERVER_VERSION` raises :class:`IncompatibleServer`.
    """
    url = shown_url(settings)
    client: list[Client] = []
    attempts: list[Exception] = []

    async def on_error(err: Exception) -> None:
        # Failed attempts of the first connection are reported once, by the caller.
        if client:
            log.warning("nats error", extra={"nats_url": url, "error": repr(err)})
        else:
            attempts.append(err)

    async def on_disconnect() -> None:
        # Also called by close()/drain(): only an unplanned loss is worth a warning.
        if client and not (client[0].is_closed or client[0].is_draining):
            log.warning("nats disconnected", extra={"nats_url": url})

    async def on_reconnect() -> None:
        problem = server_problem(client[0], url) if client else None
        if problem is not None:
            # A cluster node of another version: readiness reports it as well.
            log.error("reconnected to an incompatible NATS server", extra={"error": problem})
        else:
            log.info("nats reconnected", extra={"nats_url": url})

    auth: dict[str, Any] = {}
    if settings.nats_creds:
        auth["user_credentials"] = settings.nats_creds
    if settings.nats_user:
        auth["user"] = settings.nats_user
        auth["password"] = settings.nats_password.reveal()
    # A dict typed Any: nats-py annotates these timeouts as int, yet takes (and needs) floats.
    settings_for_client: dict[str, Any] = {
        "servers": [s.strip() for s in settings.nats_url.split(",") if s.strip()],
        "name": name,
        # Bounded while connecting for the first time (see above), unbounded after.
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": settings.nats_connect_timeout_s,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        **auth,
        **options,
    }
    nc = Client()
    try:
        await nc.connect(**settings_for_client)
    except asyncio.CancelledError:
        # Given up from outside (a stop request, a verb's timeout): leave nothing open.
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    except Exception as err:
        # What the last attempt ran into (refused, timed out, auth), not "no servers left".
        reason = attempts[-1] if attempts else err
        with contextlib.suppress(Exception):
            await nc.close()
        raise NatsUnreachable(url, _reason(reason)) from err
    try:
        check_server(nc, url)
    except IncompatibleServer:
        await nc.close()
        raise
    # From now on a lost connection is retried for ever: a service rides out a
    # server restart or a cluster failover. nats-py reads the option at each
    # reconnect; it has no other way to bound only the first connection.
    nc.options["max_reconnect_attempts"] = -1
    client.append(nc)
    return nc


def _reason(err: BaseException) -> str:
    return str(err).strip() or type(err).__name__
