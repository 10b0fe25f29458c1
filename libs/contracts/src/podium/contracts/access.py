"""Who may do what on the bus: one NATS user per service, least privilege.

Each service connects as its own user in the ``PODIUM`` account and may
publish and subscribe only where its work takes it. The permission sets are
*derived* from the registry (:mod:`podium.contracts.registry`: who produces and
consumes each channel, who owns and reads each bucket) and the consumers of
:mod:`podium.contracts.streams`, so a new channel, consumer or bucket updates them,
and ``podium generate`` renders them as the NATS server configuration that
docker-compose and Kubernetes use (``deploy/nats/accounts.conf``; a test keeps
the file current and runs every service against a real nats-server configured
with it).

What a service needs besides its own event subjects, in JetStream's API:

- ``$JS.API.STREAM.INFO.<stream>`` for readiness, and to bind KV buckets and
  object stores;
- ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` (fetch),
  ``$JS.ACK.<stream>.<durable>.>`` (ack, nak, term, in-progress) and
  ``$JS.API.CONSUMER.INFO.<stream>.<durable>`` (lag gauge) for each durable
  consumer it runs; the conductor also ``$JS.API.CONSUMER.RESET`` of its
  partition consumers (taking over a partition rewinds them to their ack floor);
- KV reads: ``$JS.API.DIRECT.GET.KV_<bucket>.>`` (and the older
  ``$JS.API.STREAM.MSG.GET.KV_<bucket>``); writes: ``$KV.<bucket>.>``;
  listing keys: an ordered consumer, ``$JS.API.CONSUMER.CREATE.KV_<bucket>``
  and ``…DELETE``, with its flow control on ``$JS.FC.KV_<bucket>.>``;
- object store: ``$O.<bucket>.>``, its stream's direct get, ordered consumers
  and ``$JS.API.STREAM.PURGE.OBJ_<bucket>`` (replacing an object purges its
  old chunks);
- replies only on its own inbox, ``_INBOX.<service>.>`` (see
  :func:`podium.contracts.subjects.inbox_prefix`), so no service can read
  another's replies or fetched messages.

No service may create, update or delete a stream, a durable consumer or a
bucket: that is ``podium provision``'s work, run with the ``admin`` user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from podium.contracts import registry, streams, subjects
from podium.contracts.streams import ConsumerSpec

#: The one NATS account every Podium user belongs to (it owns the streams).
ACCOUNT = "PODIUM"
#: The user that provisions and operates (``podium provision``, ``podium replay``).
ADMIN = "admin"

JS_API = subjects.JS_API


@dataclass(frozen=True)
class Role:
    """One NATS user: what it may publish to and subscribe to."""

    user: str
    description: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    #: False: no restriction (the admin user).
    restricted: bool = True
    #: What this user publishes and consumes, for the AsyncAPI document.
    sends: tuple[str, ...] = field(default=())
    receives: tuple[str, ...] = field(default=())

    @property
    def password_env(self) -> str:
        """The environment variable holding this user's password (server and client side)."""
        return f"PODIUM_NATS_{self.user.upper()}_PASSWORD"


def stream_info(*names: str) -> list[str]:
    """Reading a stream's configuration and state."""
    return [f"{JS_API}.STREAM.INFO.{name}" for name in names]


def consume(spec: ConsumerSpec) -> list[str]:
    """Fetching from, acknowledging and watching one durable pull consumer."""
    return [
        subjects.pull_request(spec.stream, spec.durable),
        f"{JS_API}.CONSUMER.INFO.{spec.stream}.{spec.durable}",
        f"$JS.ACK.{spec.stream}.{spec.durable}.>",
    ]


def rewind(spec: ConsumerSpec) -> list[str]:
    """Resetting one durable consumer to its ack floor (a conductor taking a partition)."""
    return [f"{JS_API}.CONSUMER.RESET.{spec.stream}.{spec.durable}"]


def _direct_get(stream: str) -> list[str]:
    return [
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
    ]


def _ordered_consumers(stream: str) -> list[str]:
    return [
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _stream_reads(stream: str) -> list[str]:
    """Reading what a stream holds: single messages and ordered consumers."""
    return [*_direct_get(stream), *_ordered_consumers(stream)]


def kv_read(bucket: str) -> list[str]:
    """Getting keys of a KV bucket."""
    stream = f"KV_{bucket}"
    return [*stream_info(stream), *_direct_get(stream)]


#: nats-py's ``ObjectStore.get`` finds the stream of an object's chunks by subject
#: (``STREAM.NAMES``) before it subscribes to them: names only, no contents.
_STREAM_NAMES = f"{JS_API}.STREAM.NAMES"


def object_store(bucket: str) -> list[str]:
    """Reading and writing objects of an object store."""
    stream = f"OBJ_{bucket}"
    return [
        *stream_info(stream),
        *_direct_get(stream),
        *_ordered_consumers(stream),
        _STREAM_NAMES,
        f"{JS_API}.STREAM.PURGE.{stream}",
        f"$O.{bucket}.>",
    ]


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _own_inbox(service: str) -> str:
    return subjects.inbox_prefix(service) + ".>"


def _writes(spec: registry.BucketSpec, role: str) -> list[str]:
    """What owning a bucket lets ``role`` publish: its keys (its own, when shared)."""
    if spec.kind == "object":
        return object_store(spec.name)
    extra = _ordered_consumers(f"KV_{spec.name}") if spec.lists_keys else []
    keys = f"$KV.{spec.name}.{role}.>" if spec.shared else f"$KV.{spec.name}.>"
    return [*kv_read(spec.name), keys, *extra]


def _reads(spec: registry.BucketSpec) -> list[str]:
    if spec.kind == "object":
        stream = f"OBJ_{spec.name}"
        return [
            *stream_info(stream),
            *_direct_get(stream),
            *_ordered_consumers(stream),
            _STREAM_NAMES,
        ]
    return kv_read(spec.name)


def derive(user: str, description: str) -> Role:
    """A service's user, from the registry: it publishes what it produces, consumes its
    durable consumers, writes the buckets it owns and reads those it may read."""
    produces = [c for c in registry.CHANNELS if user in c.producers]
    consumes = [c for c in registry.CHANNELS if user in c.consumers]
    own_consumers = [spec for spec in streams.TOPOLOGY.consumers if spec.role == user]
    used_streams = [c.stream for c in (*produces, *consumes) if c.stream]
    readback = dict.fromkeys(c.stream for c in produces if c.readback and c.stream)
    reads = [c for c in registry.CHANNELS if user in c.readers and c.stream]
    read_streams = list(dict.fromkeys(c.stream for c in reads))
    used_streams += read_streams
    publish = [
        *(s for c in produces for s in c.producer_subjects(user)),
        *(s for stream in readback for s in _direct_get(stream)),
        *(
            s
            for stream in read_streams
            for s in (*_direct_get(stream), *_ordered_consumers(stream))
        ),
        *stream_info(*dict.fromkeys(used_streams)),
        *(s for spec in own_consumers for s in consume(spec)),
        # The conductor: on taking a partition, what a dead predecessor held comes back first.
        *(s for spec in own_consumers if user == "conductor" for s in rewind(spec)),
    ]
    for spec in registry.BUCKETS:
        if user in spec.owners:
            publish += _writes(spec, user)
        elif user in spec.readers:
            publish += _reads(spec)
            if user in spec.listers:
                publish += _ordered_consumers(f"KV_{spec.name}")
    if user in registry.REPLAYERS:
        # A dead letter goes back to its original subject, in a stream a service consumes.
        consumed = {s.stream for s in streams.TOPOLOGY.consumers}
        publish += [f"{c.namespace}.>" for c in registry.CHANNELS if c.stream in consumed]
    core = [c.wildcard() for c in consumes if not c.stream]
    return Role(
        user,
        description,
        publish=_unique(publish),
        subscribe=(_own_inbox(user), *core),
        sends=tuple(dict.fromkeys(s for c in produces for s in c.producer_subjects(user))),
        receives=tuple(dict.fromkeys(c.wildcard() for c in consumes)),
    )


INGRESS = derive(
    "ingress",
    "Stores inbound messages, their attachments and what providers report (delivery "
    "statuses, opt-outs) for the notifier; reads conversations and replies for the API.",
)
CONDUCTOR = derive(
    "conductor",
    "Consumes inbound messages and results of its partitions; publishes tasks, "
    "cancels, commands and kills; keeps conversation, partition lease and session state.",
)
WORKER = derive(
    "worker",
    "Consumes tasks and cancels, runs agents, publishes results; keeps task state; "
    "obeys kill requests.",
)
NOTIFIER = derive(
    "notifier",
    "Consumes commands and provider facts; sole writer of the outbox, the suppression "
    "list and the replies read model; reports undeliverable commands to the conductor.",
)
CONSOLE = derive(
    "console",
    "The operators' console: reads conversations, replies and the streams for its pages; "
    "sends the conductor operators' answers, kills and closes; records every action; "
    "replays dead letters.",
)

ADMIN_ROLE = Role(
    ADMIN,
    "Operators and the provisioning job: streams, consumers, buckets, replay.",
    restricted=False,
)

SERVICES: dict[str, Role] = {r.user: r for r in (INGRESS, CONDUCTOR, WORKER, NOTIFIER, CONSOLE)}
ROLES: tuple[Role, ...] = (ADMIN_ROLE, *SERVICES.values())


def _list(items: tuple[str, ...], indent: str) -> str:
    # JSON strings are valid NATS configuration strings; quoted, "$JS…" is not a variable.
    return "[\n" + "".join(f"{indent}  {json.dumps(i)}\n" for i in items) + f"{indent}]"


def render_accounts() -> str:
    """The ``accounts`` block of the NATS server configuration (include it from nats.conf).

    Passwords are not in it: each is the environment variable
    :attr:`Role.password_env` of the server process (a NATS config variable),
    filled from a Secret in Kubernetes and from ``.env`` in docker-compose.
    """
    lines = [
        "# Generated by `podium generate` from podium/contracts/access.py: do not edit.",
        "# One user per service, each allowed only its own subjects; passwords come from",
        "# the server's environment (PODIUM_NATS_<USER>_PASSWORD).",
        "accounts {",
        f"  {ACCOUNT} {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    for role in ROLES:
        lines.append(f"      # {role.user}: {role.description}")
        lines.append("      {")
        lines.append(f"        user: {json.dumps(role.user)}")
        lines.append(f"        password: ${role.password_env}")
        if role.restricted:
            indent = " " * 10
            lines.append("        permissions: {")
            lines.append(f"          publish: {{allow: {_list(role.publish, indent)}}}")
            lines.append(f"          subscribe: {{allow: {_list(role.subscribe, indent)}}}")
            lines.append("        }")
        lines.append("      }")
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)
