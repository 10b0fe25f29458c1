"""Connecting to NATS and publishing events with Podium's headers."""

from __future__ import annotations

import logging
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from podium.common import subjects
from podium.common.config import CommonSettings
from podium.common.events import SCHEMA_VERSION, Event, encode, event_type

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


async def connect(settings: CommonSettings, *, name: str, **options: Any) -> Client:
    """Connect to NATS with reconnects forever and logged connection events."""

    async def on_error(err: Exception) -> None:
        log.warning("nats error", extra={"error": repr(err)})

    client: list[Client] = []

    async def on_disconnect() -> None:
        # Also called by close()/drain(): only an unplanned loss is worth a warning.
        if client and not (client[0].is_closed or client[0].is_draining):
            log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    auth: dict[str, Any] = {}
    if settings.nats_creds:
        auth["user_credentials"] = settings.nats_creds
    if settings.nats_user:
        auth["user"] = settings.nats_user
        auth["password"] = settings.nats_password.reveal()
    nc = await nats.connect(
        servers=[s.strip() for s in settings.nats_url.split(",") if s.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **auth,
        **options,
    )
    client.append(nc)
    return nc
