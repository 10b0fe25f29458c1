"""Stream, consumer and bucket definitions: what ``podium.common.provision`` creates.

Streams use Limits retention with an age limit (not WorkQueue) so operators can
inspect and replay them with the NATS CLI; consumers are durable pull
consumers with explicit ack. Pure data: the nats-py configurations and the
idempotent provisioning are in :mod:`podium.common.provision`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from podium.contracts import registry, subjects

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
    share=0.17,
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


TURNS = StreamSpec(
    "TURNS",
    registry.stream_subjects("TURNS"),
    "What each conductor turn was given and answered (the console's timelines)",
    max_age_s=30 * DAY,
    share=0.05,
    # Full: the oldest turns go (a timeline, not work to be done).
    discard_new=False,
)
AUDIT = StreamSpec(
    "AUDIT",
    registry.stream_subjects("AUDIT"),
    "What operators did in the console",
    max_age_s=365 * DAY,
    share=0.01,
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
#: Object store of the files workers leave under ``outputs/`` (``Artifact.object``).
ARTIFACTS = "artifacts"
OBJECT_STORE_DESCRIPTIONS = {
    TRANSCRIPTS: "Agent transcripts and workspaces",
    ATTACHMENTS: "Inbound email attachments and MMS media",
    ARTIFACTS: "Files workers made (task outputs), sent as attachments or links",
}
#: Object stores' shares of PODIUM_STORE_BUDGET_BYTES. Attachments (up to 20 x 10 MiB
#: per email, kept 30 days) get their own, so a flood of them fills their store, not
#: the file store INBOUND needs to take new messages.
OBJECT_STORE_SHARES = {TRANSCRIPTS: 0.16, ATTACHMENTS: 0.22, ARTIFACTS: 0.12}

TOPOLOGY = Topology(
    streams=(INBOUND, TASKS, RESULTS, COMMANDS, DELIVERY, DEADLETTER, TURNS, AUDIT),
    consumers=(*CONDUCTOR_CONSUMERS, WORKER_TASKS, NOTIFIER_COMMANDS, NOTIFIER_DELIVERY),
    buckets=(CONVERSATIONS, TASK_STATE, OUTBOX, SESSIONS, CONDUCTORS, SUPPRESSIONS, REPLIES),
    object_stores=(TRANSCRIPTS, ATTACHMENTS, ARTIFACTS),
)


def store_shares(topology: Topology = TOPOLOGY) -> dict[str, float]:
    """Each stream's and object store's share of the storage budget.

    Buckets get none: state (conversations, tasks, the outbox, suppressions) must
    always be writable, and a full bucket would refuse even updates of existing
    keys; what ages out of the streams and object stores leaves them the rest.
    """
    shares = {spec.name: spec.share for spec in topology.streams}
    shares |= {f"OBJ_{o}": OBJECT_STORE_SHARES.get(o, 0.0) for o in topology.object_stores}
    return shares


def max_bytes(share: float, budget: int) -> int:
    """A share of ``budget`` in bytes; -1 (no limit) without a budget or a share."""
    return int(share * budget) if budget and share else -1
