"""Least privilege on the bus, against a real nats-server configured with deploy/nats/accounts.conf.

Each service's user may do its own work and nothing else: a publish or a
subscription outside its rights is refused by the server, and no service may
create, change or delete streams, durable consumers or buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common.provision import provision
from podium.contracts import access, registry, streams, subjects
from tests.conftest import NATS_PASSWORDS


class Session:
    """A connection as one user, keeping the errors the server sent it."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        self._sentinels = 0

    async def refused(self, what: str, timeout_s: float = 3.0) -> bool:
        """Whether the server reported a permissions violation naming ``what``.

        The server handles a connection's operations in order: once it has refused
        a sentinel sent after ``what``, a missing refusal of ``what`` means allowed.
        """
        self._sentinels += 1
        sentinel = f"podium-test.sentinel.{self._sentinels}"
        await self.nc.publish(sentinel, b"")
        await self.nc.flush()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if self._saw(what):
                return True
            if self._saw(sentinel):
                return False
            await asyncio.sleep(0.01)
        return self._saw(what)

    def _saw(self, what: str) -> bool:
        # nats-py lower-cases the server's error text.
        return any(
            "permissions violation" in e.lower() and f'"{what.lower()}"' in e.lower()
            for e in self.errors
        )

    async def publish_refused(self, subject: str, timeout_s: float = 3.0) -> bool:
        """Publish ``subject`` and say whether the server refused it."""
        await self.nc.publish(subject, b"{}")
        return await self.refused(subject, timeout_s)

    async def subscribe_refused(self, subject: str) -> bool:
        """Subscribe to ``subject`` and say whether the server refused it."""
        sub = await self.nc.subscribe(subject)
        try:
            return await self.refused(subject)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


@contextlib.asynccontextmanager
async def session(url: str, user: str) -> AsyncIterator[Session]:
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    nc = await nats.connect(
        url,
        user=user,
        password=NATS_PASSWORDS[user],
        error_cb=on_error,
        inbox_prefix=subjects.inbox_prefix(user),
        allow_reconnect=False,
    )
    try:
        yield Session(nc, errors)
    finally:
        await nc.close()


@pytest.fixture
async def provisioned(secure_nats: NatsServer, admin_js: JetStreamContext) -> NatsServer:
    return secure_nats


# What each service must never do: publish to another service's subjects, write
# state it does not own, or manage streams and consumers.
FORBIDDEN_PUBLISH = {
    "ingress": [
        "tasks.t1",
        "commands.email.c1",
        "control.tasks.t1.kill",
        "$KV.conversations.c1",
        "$KV.tasks.t1",
        "$KV.sessions.conductor.c1",
        # The notifier's state: the ingress only stores facts for it.
        "$KV.outbox.cmd1",
        "$KV.suppressions.sms.15550100001",
        "$KV.replies.c1",
        "results.c1.cmd1",
        "$JS.API.STREAM.CREATE.EVIL",
        "$JS.API.STREAM.DELETE.INBOUND",
        "$JS.API.CONSUMER.DURABLE.CREATE.INBOUND.evil",
        # Operators speak through the console only: an exposed ingress cannot pose as one.
        "inbound.operator.c1",
        "inbound.anything.c1",
        "audit.answer",
    ],
    "console": [
        "$KV.conversations.c1",
        "$KV.outbox.cmd1",
        "$KV.replies.c1",
        "control.tasks.t1.kill",
        "$JS.API.STREAM.PURGE.AUDIT",
        "$JS.API.STREAM.DELETE.TURNS",
        "$JS.API.CONSUMER.DURABLE.CREATE.INBOUND.evil",
        "$JS.API.CONSUMER.MSG.NEXT.INBOUND.conductor-inbound-p0",
    ],
    "conductor": [
        "inbound.api.c1",
        "results.c1.t1",
        "$KV.outbox.cmd1",
        # The workers' task state and the workers' sessions.
        "$KV.tasks.t1",
        "$KV.sessions.worker.t1",
        "$JS.API.STREAM.CREATE.INBOUND",
        "$JS.API.STREAM.PURGE.INBOUND",
        "$JS.API.CONSUMER.CREATE.INBOUND.evil",
        "$JS.API.CONSUMER.MSG.NEXT.TASKS.worker-tasks",
    ],
    "worker": [
        "inbound.api.c1",
        "tasks.t1",
        "commands.sms.c1",
        "tasks.t1.cancel",
        "$KV.conversations.c1",
        "$KV.outbox.cmd1",
        "$KV.sessions.conductor.c1",
        "$JS.API.STREAM.UPDATE.TASKS",
        "deadletter.notifier.COMMANDS",
    ],
    "notifier": [
        "tasks.t1",
        "tasks.t1.followup",
        "commands.email.c1",
        "inbound.api.c1",
        "$KV.conversations.c1",
        "$KV.tasks.t1",
        "$JS.API.STREAM.PURGE.COMMANDS",
        "$JS.API.STREAM.DELETE.OBJ_transcripts",
        "$JS.API.CONSUMER.MSG.NEXT.INBOUND.conductor-inbound-p0",
        "$JS.API.DIRECT.GET.KV_conversations.$KV.conversations.c1",
        "deadletter.conductor.INBOUND",
    ],
}

FORBIDDEN_SUBSCRIBE = {
    "ingress": ["commands.>", "_INBOX.>", "_INBOX.conductor.abc"],
    "conductor": ["inbound.>", "_INBOX.worker.>"],
    "worker": ["tasks.>", "_INBOX.conductor.>", ">"],
    "notifier": ["inbound.>", "commands.>", "_INBOX.ingress.>"],
    "console": ["inbound.>", "_INBOX.conductor.>", "control.tasks.*.kill"],
}


@pytest.mark.parametrize("user", sorted(FORBIDDEN_PUBLISH))
async def test_a_service_cannot_publish_outside_its_rights(
    provisioned: NatsServer, user: str
) -> None:
    async with session(provisioned.url, user) as s:
        for subject in FORBIDDEN_PUBLISH[user]:
            assert await s.publish_refused(subject), f"{user} may publish {subject}"


@pytest.mark.parametrize("user", sorted(FORBIDDEN_SUBSCRIBE))
async def test_a_service_cannot_subscribe_outside_its_rights(
    provisioned: NatsServer, user: str
) -> None:
    async with session(provisioned.url, user) as s:
        for subject in FORBIDDEN_SUBSCRIBE[user]:
            assert await s.subscribe_refused(subject), f"{user} may subscribe to {subject}"


async def test_each_service_may_do_its_own_work(provisioned: NatsServer) -> None:
    # The refusal checks above are only worth something if the same check passes
    # where the right exists.
    allowed = {
        "ingress": ["inbound.api.c1", "delivery.status.cmd1", "delivery.preference.c1"],
        "conductor": [
            "tasks.t1",
            "tasks.t1.cancel",
            "commands.email.c1",
            "control.tasks.t1.kill",
        ],
        "worker": ["results.c1.t1", "deadletter.worker.TASKS", "control.tasks.t1.kill"],
        "notifier": ["deadletter.notifier.COMMANDS", "$KV.outbox.cmd1", "results.c1.cmd1"],
        "console": ["inbound.operator.c1", "audit.answer"],
        access.ADMIN: ["tasks.t2", "$KV.conversations.c1"],
    }
    for user, subjects_ in allowed.items():
        async with session(provisioned.url, user) as s:
            for subject in subjects_:
                # The admin may publish the sentinel too: then only time tells.
                refused = await s.publish_refused(subject, timeout_s=1.0)
                assert not refused, f"{user} was refused {subject}"
    async with session(provisioned.url, "worker") as s:
        assert not await s.subscribe_refused(subjects.KILL_ALL)


@pytest.mark.parametrize("user", registry.SERVICES)
async def test_only_a_buckets_owner_may_write_it(provisioned: NatsServer, user: str) -> None:
    # The registry's ownership, as the server enforces it: a service that writes a
    # bucket it does not own is refused (and fails wherever it runs under these rights).
    async with session(provisioned.url, user) as s:
        for bucket in registry.BUCKETS:
            if bucket.kind == "object":
                subject = f"$O.{bucket.name}.C.test"
                owns = user in bucket.owners
            else:
                # Shared buckets: each owner writes only keys under its own name.
                owners = bucket.owners if bucket.shared else ()
                prefix = f"{owners[0]}." if owners else ""
                subject = f"$KV.{bucket.name}.{prefix}k1"
                owns = user in bucket.owners and (not owners or user == owners[0])
            refused = await s.publish_refused(subject, timeout_s=1.0)
            assert refused != owns, f"{user} {'refused' if refused else 'may write'} {subject}"


def test_every_provisioned_bucket_has_one_owner_entry() -> None:
    provisioned = {b.name for b in streams.TOPOLOGY.buckets} | set(streams.TOPOLOGY.object_stores)
    assert {b.name for b in registry.BUCKETS} == provisioned
    for bucket in registry.BUCKETS:
        assert bucket.owners, bucket.name
        assert not set(bucket.owners) & set(bucket.readers), bucket.name


async def test_ingress_stores_events_and_reads_state_but_cannot_write_it(
    provisioned: NatsServer,
) -> None:
    async with session(provisioned.url, "ingress") as s:
        js = s.nc.jetstream(timeout=2)
        ack = await js.publish("inbound.api.c1", b"{}", headers={"Nats-Msg-Id": "m1"})
        assert ack.stream == "INBOUND"
        # It reads back what it stored (a reused Idempotency-Key is compared with it).
        stored = await js.get_msg("INBOUND", ack.seq)
        assert stored.data == b"{}"
        kv = await js.key_value(streams.CONVERSATIONS.name)
        with pytest.raises(Exception):  # noqa: B017, PT011 - a timeout or a KeyNotFound
            await kv.get("nothing-here")
        with pytest.raises(nats.errors.TimeoutError):
            await kv.put("c1", b"{}")
        assert await s.refused("$KV.conversations.c1")


async def test_no_service_can_manage_streams(provisioned: NatsServer) -> None:
    for user in access.SERVICES:
        async with session(provisioned.url, user) as s:
            js = s.nc.jetstream(timeout=1)
            with pytest.raises(nats.errors.TimeoutError):
                await provision(js)
            assert await s.refused("$JS.API.STREAM.CREATE.INBOUND")
            with pytest.raises(nats.errors.TimeoutError):
                await js.delete_stream("INBOUND")
    async with session(provisioned.url, access.ADMIN) as s:
        info = await s.nc.jetstream().stream_info("INBOUND")
        assert info.config.name == "INBOUND"


async def test_services_read_the_files_they_are_given(
    provisioned: NatsServer, admin_js: JetStreamContext
) -> None:
    # nats-py's ObjectStore.get looks the chunks' stream up by subject first: each reader
    # of an object store needs that lookup as well as the chunks.
    await (await admin_js.object_store("attachments")).put("in-1/0", b"a,b\n1,2\n")
    await (await admin_js.object_store("artifacts")).put("t1/report.csv", b"x,y\n")
    reads = {
        "worker": ("attachments", "in-1/0", b"a,b\n1,2\n"),
        "notifier": ("artifacts", "t1/report.csv", b"x,y\n"),
        "ingress": ("artifacts", "t1/report.csv", b"x,y\n"),
    }
    for user, (store, name, data) in reads.items():
        nc = await nats.connect(
            provisioned.url,
            user=user,
            password=NATS_PASSWORDS[user],
            inbox_prefix=subjects.inbox_prefix(user),
            allow_reconnect=False,
        )
        try:
            js = nc.jetstream(timeout=3)
            assert (await (await js.object_store(store)).get(name)).data == data, user
        finally:
            await nc.close()
