"""The conductor service: two consumers feeding one serial turn loop per conversation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from podium.common import streams
from podium.common.agents import AgentRuntime, build_runtime, role_prompt
from podium.common.agents.sessions import Agents
from podium.common.consumer import Lanes, PullConsumer
from podium.common.events import AnyEvent
from podium.common.kv import Store
from podium.common.runtime import Context
from podium.common.state import Conversation, TaskRecord
from podium.conductor.config import ConductorSettings
from podium.conductor.handlers import Conductor
from podium.conductor.metrics import ConductorMetrics
from podium.conductor.prompts import ROLE

log = logging.getLogger(__name__)


def by_conversation(event: AnyEvent) -> str:
    """Order key: all events of one conversation are handled one at a time, in order."""
    return event.conversation_id


class ConductorService:
    """Consumes INBOUND and RESULTS; one agent turn at a time per conversation."""

    name = "conductor"
    streams: Sequence[str] = (streams.INBOUND.name, streams.RESULTS.name)

    def __init__(self, settings: ConductorSettings, runtime: AgentRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.consumers: list[PullConsumer] = []
        self.agents: Agents | None = None

    async def start(self, ctx: Context) -> None:
        """Open the buckets and start both consumers."""
        runtime = self.runtime or build_runtime(
            self.settings, Path(self.settings.state_dir), self.name
        )
        ctx.metrics.info.labels(self.name, runtime.kind).set(1)
        self.agents = Agents(
            runtime, role="conductor", settings=self.settings, metrics=ctx.metrics, js=ctx.js
        )
        await self.agents.start()
        conductor = Conductor(
            settings=self.settings,
            nc=ctx.nc,
            js=ctx.js,
            agents=self.agents,
            role_prompt=role_prompt(self.settings.claude_role_prompt_file, ROLE),
            conversations=await Store.open(ctx.js, streams.CONVERSATIONS.name, Conversation),
            tasks=await Store.open(ctx.js, streams.TASK_STATE.name, TaskRecord),
            metrics=ctx.metrics,
            own_metrics=ConductorMetrics(ctx.registry),
            max_deliver=streams.CONDUCTOR_INBOUND.max_deliver,
        )
        # Both consumers share one ordering map, so an inbound message and a worker
        # result of the same conversation never run at the same time.
        lanes = Lanes(self.settings.concurrency)
        inbound = PullConsumer(
            ctx.js,
            streams.CONDUCTOR_INBOUND,
            conductor.handle,
            service=self.name,
            metrics=ctx.metrics,
            order_key=by_conversation,
            lanes=lanes,
        )
        results = PullConsumer(
            ctx.js,
            streams.CONDUCTOR_RESULTS,
            conductor.handle,
            service=self.name,
            metrics=ctx.metrics,
            order_key=by_conversation,
            lanes=lanes,
        )
        self.consumers = [inbound, results]
        for consumer in self.consumers:
            consumer.start()

    async def stop(self, timeout_s: float) -> None:
        """Stop fetching; finish turns in flight up to ``timeout_s``."""
        await asyncio.gather(*(consumer.stop(timeout_s) for consumer in self.consumers))
        if self.agents is not None:
            await self.agents.close()

    def ready(self) -> bool:
        """Ready once consuming."""
        return bool(self.consumers)
