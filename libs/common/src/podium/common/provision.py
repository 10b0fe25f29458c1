"""Idempotent provisioning of the streams, consumers and buckets of :mod:`podium.contracts.streams`.

``provision`` creates or updates all of it and is safe to run any number of
times, by every service at start (``PODIUM_PROVISION``) and by ``podium provision``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Iterator
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from podium.common.errors import ProvisionError
from podium.contracts.streams import (
    DAY,
    OBJECT_STORE_DESCRIPTIONS,
    OBJECT_STORE_SHARES,
    TOPOLOGY,
    ConsumerSpec,
    StreamSpec,
    Topology,
)
from podium.contracts.streams import (
    max_bytes as share_bytes,
)

log = logging.getLogger(__name__)

# BadRequest error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


def stream_config(spec: StreamSpec, *, replicas: int = 1, budget: int = 0) -> StreamConfig:
    """The nats-py configuration of a stream (``budget``: PODIUM_STORE_BUDGET_BYTES)."""
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=spec.max_age_s,
        max_bytes=share_bytes(spec.share, budget),
        discard=DiscardPolicy.NEW if spec.discard_new else DiscardPolicy.OLD,
        duplicate_window=spec.duplicate_window_s,
        num_replicas=replicas,
        subject_transform=SubjectTransform(src=spec.transform[0], dest=spec.transform[1])
        if spec.transform
        else None,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    """The nats-py configuration of a durable pull consumer."""
    filters = list(spec.filter_subjects)
    return ConsumerConfig(
        durable_name=spec.durable,
        description=spec.description,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=spec.ack_wait_s,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


async def ensure_stream(
    js: JetStreamContext, spec: StreamSpec, *, replicas: int = 1, budget: int = 0
) -> None:
    """Create ``spec``'s stream, or bring an existing one to this configuration."""
    config = stream_config(spec, replicas=replicas, budget=budget)
    with _refused("stream", spec.name):
        try:
            await js.add_stream(config)
        except BadRequestError as err:
            if err.err_code != _STREAM_NAME_IN_USE:
                raise
            _fits(spec.name, (await js.stream_info(spec.name)).state.bytes, config.max_bytes)
            await js.update_stream(config)
            log.info("stream updated", extra={"stream": spec.name})


async def provision(
    js: JetStreamContext, topology: Topology = TOPOLOGY, *, replicas: int = 1, budget: int = 0
) -> None:
    """Create or update every stream, consumer, bucket and object store. Idempotent.

    An existing bucket or object store is brought to the asked replicas, history, TTL
    and size too (they are streams underneath). What the server refuses — more
    replicas than it has nodes, more storage than it allows — raises
    :class:`ProvisionError` naming the object and the server's reason.
    """
    for stream in topology.streams:
        await ensure_stream(js, stream, replicas=replicas, budget=budget)
    for consumer in topology.consumers:
        # CONSUMER.CREATE without an action is create-or-update on the server.
        with _refused("consumer", consumer.durable):
            await js.add_consumer(consumer.stream, consumer_config(consumer))
    for bucket in topology.buckets:
        config = KeyValueConfig(
            bucket=bucket.name,
            description=bucket.description,
            history=bucket.history,
            ttl=bucket.ttl_s or None,
            replicas=replicas,
            storage=StorageType.FILE,
            # Reads as direct gets: the server answers them from the stream without the
            # JSON/base64 wrapping and API advisory of STREAM.MSG.GET (a third of the
            # bus's requests a conversation). Any replica may answer one; a stale
            # answer only fails the compare-and-set that every write here makes.
            direct=True,
        )
        with _refused("bucket", bucket.name):
            if not await _created(js.create_key_value(config)):
                await _update(
                    js,
                    f"KV_{bucket.name}",
                    description=bucket.description,
                    num_replicas=replicas,
                    max_msgs_per_subject=bucket.history,
                    max_age=bucket.ttl_s,
                    allow_direct=True,
                )
    for store in topology.object_stores:
        description = OBJECT_STORE_DESCRIPTIONS.get(store, store)
        limit = share_bytes(OBJECT_STORE_SHARES.get(store, 0.0), budget)
        object_config = ObjectStoreConfig(
            bucket=store,
            description=description,
            storage=StorageType.FILE,
            replicas=replicas,
            ttl=30 * DAY,
            max_bytes=limit,
        )
        with _refused("object store", store):
            if not await _created(js.create_object_store(bucket=store, config=object_config)):
                await _update(
                    js,
                    f"OBJ_{store}",
                    description=description,
                    num_replicas=replicas,
                    max_age=30 * DAY,
                    max_bytes=limit,
                )


async def _created(create: Awaitable[object]) -> bool:
    """Run ``create``; False if the bucket exists already (then it is updated instead)."""
    try:
        await create
    except BadRequestError as err:
        if err.err_code != _STREAM_NAME_IN_USE:
            raise
        return False
    return True


async def _update(js: JetStreamContext, stream: str, **changes: Any) -> None:
    """Bring a bucket's or object store's stream to ``changes`` (only what differs)."""
    info = await js.stream_info(stream)
    _fits(stream, info.state.bytes, changes.get("max_bytes", -1))
    config = info.config
    wanted = {k: v for k, v in changes.items() if getattr(config, k) != v}
    if not wanted:
        return
    await js.update_stream(config.evolve(**wanted))
    log.info("updated", extra={"stream": stream, "changed": sorted(wanted)})


def _fits(stream: str, stored: int, max_bytes: int | None) -> None:
    """Refuse a size limit below what a stream already holds: the server would take it,
    and the stream would then refuse every new message."""
    if max_bytes is not None and max_bytes > 0 and stored > max_bytes:
        raise ProvisionError(
            f"{stream} holds {stored} bytes, more than its new limit of {max_bytes} "
            "(PODIUM_STORE_BUDGET_BYTES' share): raise the budget, or let it age out first"
        )


@contextlib.contextmanager
def _refused(kind: str, name: str) -> Iterator[None]:
    """A server refusal as a ProvisionError that names what was refused, and why."""
    try:
        yield
    except APIError as err:
        raise ProvisionError(
            f"the server refused {kind} {name}: {err.description or err} "
            f"(error {err.err_code or err.code})"
        ) from err


async def missing_streams(js: JetStreamContext, names: tuple[str, ...]) -> list[str]:
    """The names among ``names`` that do not exist on the server (for readiness)."""
    missing = []
    for name in names:
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    return missing
