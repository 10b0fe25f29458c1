"""Conductor replicas share the conversation space by owning partitions.

The server puts every inbound message and worker result in one of
``streams.PARTITIONS`` partitions (by conversation id). Each replica:

- heartbeats ``member.<replica>`` in the ``conductors`` bucket;
- computes, from the live members, which partitions are its own (rendezvous
  hashing: a join or a departure moves only the partitions that must move);
- holds a lease ``partition.<p>`` for each partition it consumes (compare-and-
  set, renewed every third of the TTL). It starts consuming only once it holds
  the lease, and gives a partition up — stop fetching, finish its turns, then
  release the lease — when it is no longer its own.

So one conversation is only ever handled by one replica at a time, and the
partitions of a replica that dies are taken over once its lease lapses (within
about one TTL, ``PODIUM_PARTITION_LEASE_TTL_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.errors import NoKeysError

from podium.common.errors import Conflict
from podium.common.kv import Store
from podium.common.runtime import Spawn, detached, wait_set

log = logging.getLogger(__name__)


class Lease(msgspec.Struct, kw_only=True):
    """A member heartbeat or a partition lease."""

    holder: str
    until: float


def owner(partition: int, members: list[str]) -> str | None:
    """The member that owns ``partition`` (highest random weight; None without members)."""

    def weight(member: str) -> bytes:
        return hashlib.sha256(f"{partition}:{member}".encode()).digest()

    return max(members, key=weight) if members else None


Starter = Callable[[int], Awaitable[None]]
#: Stops consuming a partition; ``urgent``: cancel its turns at once, do not let them finish.
Stopper = Callable[[int, bool], Awaitable[None]]


class PartitionsFailed(Exception):
    """Some partitions of this replica could not be started (the others were)."""


class PartitionManager:
    """Keeps this replica's share of the partitions, and only that, under lease."""

    def __init__(
        self,
        store: Store[Lease],
        *,
        replica: str,
        partitions: int,
        ttl_s: float,
        start: Starter,
        stop: Stopper,
        problem: Callable[[], str] = lambda: "",
        spawn: Spawn = detached,
    ) -> None:
        self.store = store
        self._spawn = spawn
        self.replica = replica
        self.partitions = partitions
        self.ttl_s = ttl_s
        self._start = start
        self._stop = stop
        #: Why this replica cannot serve partitions now ("" if it can): its agent cannot
        #: start. It then steps aside for the other replicas, if there are any.
        self._problem = problem
        #: Whether it stepped aside in the last round.
        self.aside = False
        self.owned: set[int] = set()
        #: The partitions that are this replica's by the last round's membership.
        self.mine: set[int] = set()
        #: Why the last round failed ("" if it did not); the replica is not ready meanwhile.
        self.problem = ""
        self._balanced = False
        # Partitions being handed over: their turns are finishing, their lease still held.
        self.releasing: dict[int, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._release = True

    def start(self) -> None:
        """Start balancing in the background."""
        self._task = self._spawn(self._loop(), "partitions")

    def wake(self) -> None:
        """Balance now, not at the next round (the replica's health changed)."""
        self._wake.set()

    async def close(self, *, release: bool = True) -> None:
        """Stop balancing, give up every partition, leave the membership.

        ``release=False`` (no server to tell, NATS is gone): stop consuming but leave
        the leases to lapse on their own, instead of waiting on requests that cannot
        be answered.
        """
        self._closing = True
        self._release = release
        if self._task is not None:
            self._task.cancel()
            _, pending = await asyncio.wait({self._task}, timeout=10)
            if pending:
                log.error("the partition loop did not stop when cancelled")
        for partition in sorted(self.owned):
            self._hand_over(partition)
        if self.releasing:
            await asyncio.wait(set(self.releasing.values()))
        if release:
            await self._forget(f"member.{self.replica}")

    async def _loop(self) -> None:
        # Not only cancellation: a KV request's `wait_for` (nats-py) can swallow it on
        # Python 3.11, and a loop that went on would take partitions while closing.
        while not self._closing:
            try:
                await self.rebalance()
                self.problem = ""
                self._balanced = True
            except asyncio.CancelledError:
                raise
            except PartitionsFailed as err:
                self.problem = str(err)
            except Exception as err:
                self.problem = repr(err)
                log.exception("partition rebalance failed; will try again")
            if self._closing:
                return
            await wait_set(self._wake, self.ttl_s / 3)
            self._wake.clear()

    async def rebalance(self) -> None:
        """One round: heartbeat, renew, give up what is no longer ours, take what is."""
        now = time.time()
        members = await self.members(now)
        others = [m for m in members if m != self.replica]
        # A replica that cannot run its agent leaves its partitions to the healthy ones
        # (its heartbeat lapses at once); with no other replica it keeps serving them,
        # so its turns fail visibly (dead letters, escalations) rather than wait unseen.
        self.aside = bool(self._problem()) and bool(others)
        if self.aside:
            await self._forget(f"member.{self.replica}")
            members = others
        else:
            await self._put(f"member.{self.replica}")
        mine = {p for p in range(self.partitions) if owner(p, members) == self.replica}
        self.mine = mine
        for partition in sorted(self.owned | set(self.releasing)):
            if not await self._renew(partition):
                log.error("partition lease lost; stopping it", extra={"partition": partition})
                self.owned.discard(partition)
                await self._stop(partition, True)
            elif partition in self.owned and partition not in mine:
                # Stepping aside: its turns cannot succeed here, so they are handed back
                # at once (nak'ed, in order) for a healthy replica, not retried to the end.
                self._hand_over(partition, urgent=self.aside)
        failed: list[str] = []
        for partition in sorted(mine - self.owned - set(self.releasing)):
            if not await self._take(partition):
                continue
            try:
                await self._start(partition)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await self._forget(f"partition.{partition}")
                raise
            except Exception as err:
                # Not consumed here: free the lease rather than hold a partition nobody
                # serves, go on with the others, and try it again next round (the
                # replica is not ready meanwhile, and says why).
                failed.append(f"partition {partition}: {err!r}")
                log.exception("could not start a partition", extra={"partition": partition})
                with contextlib.suppress(Exception):
                    await self._forget(f"partition.{partition}")
                continue
            log.info("took partition", extra={"partition": partition})
            self.owned.add(partition)
        if failed:
            raise PartitionsFailed("; ".join(failed))

    def readiness(self) -> tuple[bool, str]:
        """Ready while it consumes partitions, or as a standby that has none to own."""
        total = self.partitions
        if self.problem:
            return False, f"partition rebalance failing: {self.problem}"
        if not self._balanced:
            return False, "balancing partitions"
        waiting = len(self.mine - self.owned)
        if self.owned:
            reason = f"owns {len(self.owned)} of {total} partitions"
            if waiting:
                reason += f"; {waiting} more once another replica's lease lapses"
            return True, reason
        if self.aside:
            return False, f"standing aside for the other replicas: {self._problem()}"
        if not self.mine:
            return True, f"standby: the other replicas own all {total} partitions"
        return False, f"waiting for {waiting} partition leases held by another replica to lapse"

    async def members(self, now: float) -> list[str]:
        """Replicas whose heartbeat has not lapsed."""
        try:
            # All keys, filtered here: nats-py warns on every filtered listing.
            keys = [k for k in await self.store.kv.keys() if k.startswith("member.")]
        except NoKeysError:
            return [self.replica]
        live = []
        for key in keys:
            found = await self.store.get(key)
            if found is not None and found[0].until >= now:
                live.append(found[0].holder)
        if self.replica not in live:
            live.append(self.replica)
        return sorted(live)

    async def _put(self, key: str) -> None:
        lease = Lease(holder=self.replica, until=time.time() + self.ttl_s)

        def change(current: Lease | None) -> Lease:
            return lease

        await self.store.mutate(key, change)

    async def _take(self, partition: int) -> bool:
        """Acquire ``partition``'s lease if it is free, lapsed or already ours."""
        key = f"partition.{partition}"
        now = time.time()
        found = await self.store.get(key)
        lease = Lease(holder=self.replica, until=now + self.ttl_s)
        try:
            if found is None:
                await self.store.create(key, lease)
                return True
            current, revision = found
            if current.holder == self.replica or current.until < now or not current.holder:
                await self.store.update(key, lease, revision)
                return True
        except Conflict:
            return False
        return False

    async def _renew(self, partition: int) -> bool:
        key = f"partition.{partition}"
        found = await self.store.get(key)
        if found is None or found[0].holder != self.replica:
            return False
        try:
            await self.store.update(
                key, Lease(holder=self.replica, until=time.time() + self.ttl_s), found[1]
            )
        except Conflict:
            return False
        return True

    def _hand_over(self, partition: int, *, urgent: bool = False) -> None:
        """In the background: stop consuming, let turns finish, then free the lease."""
        log.info("handing over partition", extra={"partition": partition, "urgent": urgent})
        self.owned.discard(partition)

        async def release() -> None:
            try:
                await self._stop(partition, urgent)
                if self._release:
                    await self._forget(f"partition.{partition}")
            finally:
                self.releasing.pop(partition, None)

        self.releasing[partition] = asyncio.create_task(release())

    async def _forget(self, key: str) -> None:
        found = await self.store.get(key)
        if found is None or found[0].holder != self.replica:
            return
        with contextlib.suppress(Conflict):
            await self.store.update(key, Lease(holder="", until=0.0), found[1])
