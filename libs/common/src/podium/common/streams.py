"""Stream, consumer and bucket definitions, and idempotent provisioning.

Streams use Limits retention with an age limit (not WorkQueue) so operators can
inspect and replay them with the NATS CLI; consumers are durable pull
consumers with explicit ack. ``provision`` creates or updates all of it and is
safe to run any number of times, by every service at start and by
``podium provision``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
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

from podium.common import registry, subjects
from podium.common.errors import ProvisionError

log = logging.getLogger(__name__)

DAY = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    """One JetStream stream."""

    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_s: float = 7 * DAY
    # How long a Nats-Msg-Id is remembered: covers provider retries (Twilio retries
    # within minutes; replays after an outage come later and are handled by state).
    duplicate_window_s: float = 3600.0
    #: Subject transform applied as messages are stored: (source, destination).
    transform: tuple[str, str] | None = None
    #: Its share of PODIUM_STORE_BUDGET_BYTES (see ``STORE_SHARES``), when a budget is set.
    share: float = 0.0
    #: When full: refuse new messages (the publisher sees it, retries, an alert fires)
    #: rather than drop the oldest, which may be unhandled work.
    discard_new: bool = True


@dataclass(frozen=True)
class ConsumerSpec:
    """One durable pull consumer."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    description: str
    ack_wait_s: float = 30.0
    max_deliver: int = 10
    max_ack_pending: int = 1000
    #: The service that consumes it (its NATS permissions follow).
    role: str = ""


@dataclass(frozen=True)
class BucketSpec:
    """One KV bucket."""

    name: str
    description: str
    history: int = 1
    ttl_s: float = 0.0


@dataclass(frozen=True)
class Topology:
    """Everything ``provision`` creates."""

    streams: tuple[StreamSpec, ...]
    consumers: tuple[ConsumerSpec, ...]
    buckets: tuple[BucketSpec, ...]
    object_stores: tuple[str, ...] = field(default=())


#: Conductor partitions. Conversations are spread over them by the server (FNV-1a of
#: the conversation id); replicas share them out. Fixed: changing it re-partitions
#: messages still stored under the old count, so change it only when both streams
#: are drained.
PARTITIONS = 16

INBOUND = StreamSpec(
    "INBOUND",
    registry.stream_subjects("INBOUND"),
    "Messages received by ingress",
    share=0.19,
    transform=(
        "inbound.*.*",
        f"inbound.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({PARTITIONS},2)}}}}",
    ),
)
TASKS = StreamSpec(
    "TASKS",
    registry.stream_subjects("TASKS"),
    "Tasks, follow-ups and cancels for workers",
    share=0.03,
)
RESULTS = StreamSpec(
    "RESULTS",
    registry.stream_subjects("RESULTS"),
    "Worker results and progress for the conductor",
    share=0.06,
    transform=(
        "results.*.*",
        f"results.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({PARTITIONS},1)}}}}",
    ),
)
COMMANDS = StreamSpec(
    "COMMANDS", registry.stream_subjects("COMMANDS"), "Outbound email/SMS/API replies", share=0.06
)
DELIVERY = StreamSpec(
    "DELIVERY",
    registry.stream_subjects("DELIVERY"),
    "Facts from providers for the notifier: delivery statuses, opt-outs and opt-ins",
    share=0.02,
)
DEADLETTER = StreamSpec(
    "DEADLETTER",
    registry.stream_subjects("DEADLETTER"),
    "Messages a service could never handle",
    max_age_s=30 * DAY,
    share=0.06,
    # Full: the oldest dead letters go (a consumer must always be able to record one).
    discard_new=False,
)


def conductor_inbound(partition: int) -> ConsumerSpec:
    """The conductor's consumer of one partition's inbound messages."""
    return ConsumerSpec(
        "INBOUND",
        f"conductor-inbound-p{partition}",
        (subjects.inbound_partition(partition),),
        f"Conductor: inbound messages of partition {partition}",
        # Turns in progress send heartbeats; a crashed replica's message returns in 30 s.
        ack_wait_s=30.0,
        role="conductor",
    )


def conductor_results(partition: int) -> ConsumerSpec:
    """The conductor's consumer of one partition's worker results."""
    return ConsumerSpec(
        "RESULTS",
        f"conductor-results-p{partition}",
        (subjects.results_partition(partition),),
        f"Conductor: worker results of partition {partition}",
        ack_wait_s=30.0,
        role="conductor",
    )


CONDUCTOR_CONSUMERS = tuple(
    spec for p in range(PARTITIONS) for spec in (conductor_inbound(p), conductor_results(p))
)
WORKER_TASKS = ConsumerSpec(
    "TASKS",
    "worker-tasks",
    (subjects.TASKS_ALL,),
    "Workers: tasks and follow-ups",
    # Long tasks stay claimed through heartbeats (in_progress) every ack_wait/3.
    ack_wait_s=60.0,
    max_deliver=5,
    role="worker",
)
NOTIFIER_COMMANDS = ConsumerSpec(
    "COMMANDS",
    "notifier-commands",
    (subjects.COMMANDS_ALL,),
    "Notifier: outbound commands",
    role="notifier",
)
NOTIFIER_DELIVERY = ConsumerSpec(
    "DELIVERY",
    "notifier-delivery",
    (subjects.DELIVERY_ALL,),
    "Notifier: delivery statuses and opt-outs to apply to the outbox and suppression list",
    role="notifier",
)

CONVERSATIONS = BucketSpec("conversations", "Conversation state: session, participants, tasks")
TASK_STATE = BucketSpec("tasks", "Worker-side task state: session id, workdir, last outcome")
OUTBOX = BucketSpec("outbox", "Notifier outbox: one record per command id", ttl_s=30 * DAY)
CONDUCTORS = BucketSpec(
    "conductors",
    "Conductor replicas: membership heartbeats and partition leases",
    ttl_s=DAY,
)
SESSIONS = BucketSpec(
    "sessions",
    "Agent sessions: lease, latest session id, transcript generation",
    ttl_s=30 * DAY,
)
SUPPRESSIONS = BucketSpec(
    "suppressions",
    "Recipients never to write to: SMS opt-outs (STOP until START), hard bounces",
    history=5,
)
REPLIES = BucketSpec(
    "replies",
    "Read model for the API: each conversation's replies and their delivery states",
    ttl_s=30 * DAY,
)
#: Object store of agent transcripts and worker workspaces, so sessions move between replicas.
TRANSCRIPTS = "transcripts"
#: Object store of inbound email attachments (``Media.object`` names them).
ATTACHMENTS = "attachments"
OBJECT_STORE_DESCRIPTIONS = {
    TRANSCRIPTS: "Agent transcripts and workspaces",
    ATTACHMENTS: "Inbound email attachments",
}
#: Object stores' shares of PODIUM_STORE_BUDGET_BYTES. Attachments (up to 20 x 10 MiB
#: per email, kept 30 days) get their own, so a flood of them fills their store, not
#: the file store INBOUND needs to take new messages.
OBJECT_STORE_SHARES = {TRANSCRIPTS: 0.18, ATTACHMENTS: 0.25}

TOPOLOGY = Topology(
    streams=(INBOUND, TASKS, RESULTS, COMMANDS, DELIVERY, DEADLETTER),
    consumers=(*CONDUCTOR_CONSUMERS, WORKER_TASKS, NOTIFIER_COMMANDS, NOTIFIER_DELIVERY),
    buckets=(CONVERSATIONS, TASK_STATE, OUTBOX, SESSIONS, CONDUCTORS, SUPPRESSIONS, REPLIES),
    object_stores=(TRANSCRIPTS, ATTACHMENTS),
)

# BadRequest error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


def store_shares(topology: Topology = TOPOLOGY) -> dict[str, float]:
    """Each stream's and object store's share of the storage budget.

    Buckets get none: state (conversations, tasks, the outbox, suppressions) must
    always be writable, and a full bucket would refuse even updates of existing
    keys; what ages out of the streams and object stores leaves them the rest.
    """
    shares = {spec.name: spec.share for spec in topology.streams}
    shares |= {f"OBJ_{o}": OBJECT_STORE_SHARES.get(o, 0.0) for o in topology.object_stores}
    return shares


def _max_bytes(share: float, budget: int) -> int:
    return int(share * budget) if budget and share else -1


def stream_config(spec: StreamSpec, *, replicas: int = 1, budget: int = 0) -> StreamConfig:
    """The nats-py configuration of a stream (``budget``: PODIUM_STORE_BUDGET_BYTES)."""
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=spec.max_age_s,
        max_bytes=_max_bytes(spec.share, budget),
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
                )
    for store in topology.object_stores:
        description = OBJECT_STORE_DESCRIPTIONS.get(store, store)
        max_bytes = _max_bytes(OBJECT_STORE_SHARES.get(store, 0.0), budget)
        object_config = ObjectStoreConfig(
            bucket=store,
            description=description,
            storage=StorageType.FILE,
            replicas=replicas,
            ttl=30 * DAY,
            max_bytes=max_bytes,
        )
        with _refused("object store", store):
            if not await _created(js.create_object_store(bucket=store, config=object_config)):
                await _update(
                    js,
                    f"OBJ_{store}",
                    description=description,
                    num_replicas=replicas,
                    max_age=30 * DAY,
                    max_bytes=max_bytes,
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
