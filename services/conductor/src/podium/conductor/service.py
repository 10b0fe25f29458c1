"""The conductor service: the partitions this replica owns, one serial lane per conversation."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from podium.agents import AgentRuntime, build_runtime, role_prompt
from podium.agents.sessions import Agents
from podium.common import repositories
from podium.common.config import ignored_variables
from podium.common.consumer import Handler, Lanes, PullConsumer
from podium.common.kv import Store
from podium.common.procs import not_dumpable
from podium.common.runtime import Context
from podium.conductor.config import ConductorSettings
from podium.conductor.handlers import Conductor
from podium.conductor.metrics import ConductorMetrics
from podium.conductor.partitions import Lease, PartitionManager
from podium.conductor.prompts import ROLE
from podium.contracts import streams
from podium.contracts.events import AnyEvent
from podium.contracts.state import Conversation
from podium.contracts.subjects import partition_of

log = logging.getLogger(__name__)

#: Conversation records this replica remembers as it last wrote them: the next event of
#: a conversation reads its record without a round trip. Partitions give one replica
#: each conversation, and the cache of a partition is dropped when it is taken.
CACHED_CONVERSATIONS = 2000


def by_conversation(event: AnyEvent) -> str:
    """Order key: all events of one conversation are handled one at a time, in order."""
    return event.conversation_id


class ConductorService:
    """Consumes the INBOUND and RESULTS partitions it owns; one turn at a time per conversation."""

    name = "conductor"
    streams: Sequence[str] = (streams.INBOUND.name, streams.RESULTS.name)

    def __init__(self, settings: ConductorSettings, runtime: AgentRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.agents: Agents | None = None
        self.partitions: PartitionManager | None = None
        # Consumers of each owned partition (inbound and results).
        self.consumers: dict[int, list[PullConsumer]] = {}
        self._ctx: Context | None = None
        self._handler: Handler | None = None
        # One set of lanes for all partitions: the ``concurrency`` setting bounds turns
        # across the replica, and a conversation's events share one lane.
        self._lanes = Lanes(settings.concurrency)
        self._role_prompt = ROLE
        self.repositories: dict[str, repositories.Repository] = {}
        #: What runs its agents, as the start-up check found it.
        self._agent = ""
        self._conductor: Conductor | None = None

    async def check(self) -> None:
        """Build the agent runtime and check that it can run (before connecting)."""
        # Its agents run as this user: they must not read this process's credentials.
        if not not_dumpable():
            log.warning("could not protect this process's environment from its agents")
        for ignored in ignored_variables(type(self.settings), os.environ):
            log.warning("setting ignored by this role", extra={"variable": ignored})
        self.repositories = repositories.load(self.settings.repositories_file)
        base = role_prompt(self.settings.claude_role_prompt_file, ROLE)
        self._role_prompt = base + repositories.prompt_lines(self.repositories)
        if self.runtime is None:
            self.runtime = build_runtime(self.settings, Path(self.settings.state_dir), self.name)
        if not self.settings.operator_email:
            log.warning(
                "PODIUM_OPERATOR_EMAIL is not set: escalations and messages no turn could "
                "handle are only logged and counted (podium_conductor_escalations_total)"
            )
        self._agent = await self.runtime.check()
        log.info("agent checked", extra={"agent": self.runtime.kind, "runs": self._agent})

    async def start(self, ctx: Context) -> None:
        """Open the buckets, then start taking this replica's share of the partitions."""
        if self.runtime is None:
            await self.check()
        runtime = self.runtime
        assert runtime is not None  # noqa: S101 - set by check()
        ctx.metrics.info.labels(self.name, runtime.kind).set(1)
        # exclusive: a conversation's turns run only on the replica that holds its
        # partition, so its session needs no lease of its own.
        self.agents = Agents(
            runtime,
            role="conductor",
            settings=self.settings,
            metrics=ctx.metrics,
            js=ctx.js,
            exclusive=True,
        )
        own = ConductorMetrics(ctx.registry)
        await self.agents.start(ctx.spawn)
        conductor = Conductor(
            settings=self.settings,
            nc=ctx.nc,
            js=ctx.js,
            agents=self.agents,
            role_prompt=self._role_prompt,
            repositories=self.repositories,
            conversations=await Store.open(
                ctx.js, streams.CONVERSATIONS.name, Conversation, cache=CACHED_CONVERSATIONS
            ),
            metrics=ctx.metrics,
            own_metrics=own,
        )
        self._ctx = ctx
        self._handler = conductor.handle
        self._conductor = conductor
        # New conversations adopt a CLI started ahead instead of waiting for one.
        self.agents.keep_spares(conductor.role_prompt, conductor.schema)
        self.partitions = PartitionManager(
            await Store.open(ctx.js, streams.CONDUCTORS.name, Lease),
            replica=self.agents.replica,
            partitions=streams.PARTITIONS,
            ttl_s=self.settings.partition_lease_ttl_s,
            start=self._start_partition,
            stop=self._stop_partition,
            problem=self.agents.problem,
            spawn=ctx.spawn,
        )
        # An agent that cannot start makes it step aside now, not at the next round.
        self.agents.problem_listeners.append(self.partitions.wake)
        partitions = self.partitions
        own.partitions_owned.set_function(lambda: len(partitions.owned))
        self.partitions.start()

    async def _start_partition(self, partition: int) -> None:
        if self._ctx is None or self._handler is None:
            raise RuntimeError("partitions start only after the service has started")
        consumers = [
            PullConsumer(
                self._ctx.nc,
                self._ctx.js,
                spec,
                self._handler,
                service=self.name,
                metrics=self._ctx.metrics,
                order_key=by_conversation,
                lanes=self._lanes,
                max_held=self.settings.concurrency,
                retry_in_place=True,
                on_dead_letter=self._conductor.on_dead_letter if self._conductor else None,
                spawn=self._ctx.spawn,
            )
            for spec in (streams.conductor_inbound(partition), streams.conductor_results(partition))
        ]

        # Its conversations (their records and sessions) may have moved on elsewhere
        # meanwhile.
        def ours(conversation: str) -> bool:
            return partition_of(conversation, streams.PARTITIONS) == partition

        if self._conductor is not None:
            self._conductor.conversations.forget(ours)
        if self.agents is not None:
            self.agents.forget_seen(ours)
        # Whatever a previous owner held without acknowledging (it may have died) is
        # delivered again now, in stream order, before anything newer: a conversation's
        # messages cannot be overtaken on a takeover. What it did finish is skipped.
        for consumer in consumers:
            await self._ctx.js.reset_consumer(consumer.spec.stream, consumer.spec.durable)
        self.consumers[partition] = consumers
        for consumer in consumers:
            consumer.start()

    async def _stop_partition(self, partition: int, urgent: bool) -> None:
        consumers = self.consumers.pop(partition, [])
        timeout_s = 0.0 if urgent else self.settings.drain_timeout_s
        await asyncio.gather(*(c.stop(timeout_s) for c in consumers))
        # Its sessions are stored before its lease goes (the next owner resumes them),
        # even for turns whose handler was cancelled while it waited for that.
        if self.agents is not None:
            await self.agents.settle_all()

    async def stop(self, timeout_s: float) -> None:
        """Hand every partition back (turns in flight finish up to ``timeout_s``)."""
        if self.partitions is not None:
            connected = self._ctx is not None and self._ctx.nc.is_connected
            await self.partitions.close(release=connected)
        if self.agents is not None:
            await self.agents.close()

    def readiness(self) -> tuple[bool, str]:
        """Ready while it owns partitions and consumes them, or as a standby.

        Not ready while its partitions cannot be balanced or consumed, or its agent
        cannot start: the reason says which.
        """
        if self.partitions is None:
            return False, "starting"
        if self.partitions.aside:
            return self.partitions.readiness()
        if self.agents is not None and (problem := self.agents.problem()):
            return False, problem
        for consumers in self.consumers.values():
            for consumer in consumers:
                if consumer.problem:
                    return False, consumer.problem
        ready, reason = self.partitions.readiness()
        return ready, f"{reason}; agent: {self._agent}"
