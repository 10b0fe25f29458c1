"""KV stores: compare-and-set, and the owner's cache of its own writes."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from podium.common.errors import Conflict
from podium.common.kv import Store
from podium.contracts import streams
from podium.contracts.state import Conversation

BUCKET = streams.CONVERSATIONS.name


class Reads:
    """Counts the bucket's reads (direct gets) that reached the server: a subscription
    to the requests, read after a round trip (the server relays them before its PONG)."""

    def __init__(self, nc: Client, sub: Subscription) -> None:
        self.nc = nc
        self.sub = sub

    async def count(self) -> int:
        await self.nc.flush()
        return self.sub.delivered


@pytest.fixture
async def reads(nc: Client, js: JetStreamContext) -> Reads:
    sub = await nc.subscribe(f"$JS.API.DIRECT.GET.KV_{BUCKET}.>")
    await nc.flush()
    return Reads(nc, sub)


def conversation(reply_to: str) -> Conversation:
    return Conversation(conversation_id="api-c1", channel="api", reply_to=reply_to)


async def test_the_owner_reads_back_its_own_writes_without_a_round_trip(
    nc: Client, js: JetStreamContext, reads: Reads
) -> None:
    store = await Store.open(js, BUCKET, Conversation, cache=10)
    written = conversation("a")
    revision = await store.create("api-c1", written)
    found = await store.get("api-c1")
    assert found is not None and found == (written, revision)
    # Each read is its own copy: changing it changes nothing stored or cached.
    found[0].reply_to = "changed"
    again = await store.get("api-c1")
    assert again is not None and again[0].reply_to == "a"
    assert await reads.count() == 0


async def test_a_write_by_someone_else_is_found_out_at_the_next_write(
    nc: Client, js: JetStreamContext, reads: Reads
) -> None:
    owner = await Store.open(js, BUCKET, Conversation, cache=10)
    other = await Store.open(js, BUCKET, Conversation)
    first = await owner.create("api-c1", conversation("a"))
    await other.update("api-c1", conversation("b"), first)

    # The cache still says "a" at the first revision; its compare-and-set fails...
    stale = await owner.get("api-c1")
    assert stale is not None and stale[0].reply_to == "a"
    with pytest.raises(Conflict):
        await owner.update("api-c1", conversation("c"), stale[1])
    # ...which forgets the key: the next read (and so mutate's retry) goes to the bucket.
    fresh = await owner.get("api-c1")
    assert fresh is not None and fresh[0].reply_to == "b"

    def append(current: Conversation | None) -> Conversation | None:
        assert current is not None
        current.reply_to += "+d"
        return current

    await other.update("api-c1", conversation("e"), fresh[1])
    changed = await owner.mutate("api-c1", append)
    assert changed is not None and changed.reply_to == "e+d"


async def test_forgotten_keys_are_read_from_the_bucket_again(
    nc: Client, js: JetStreamContext, reads: Reads
) -> None:
    store = await Store.open(js, BUCKET, Conversation, cache=10)
    await store.create("api-c1", conversation("a"))
    await store.create("api-c2", conversation("a"))
    store.forget(lambda key: key == "api-c1")
    await store.get("api-c1")
    await store.get("api-c2")
    assert await reads.count() == 1


async def test_the_cache_keeps_only_the_most_recent_keys(
    nc: Client, js: JetStreamContext, reads: Reads
) -> None:
    store = await Store.open(js, BUCKET, Conversation, cache=2)
    for key in ("api-c1", "api-c2", "api-c3"):
        await store.create(key, conversation(key))
    for key in ("api-c3", "api-c2", "api-c1"):
        found = await store.get(key)
        assert found is not None and found[0].reply_to == key
    # c2 and c3, the newest, were remembered; c1 had to be read.
    assert await reads.count() == 1
