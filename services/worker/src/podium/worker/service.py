"""The worker service: task slots fed by the TASKS consumer, plus kill requests."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from nats.aio.subscription import Subscription

from podium.agents import AgentRuntime, agent_kind, build_runtime, role_prompt
from podium.agents.sandbox import Sandbox, SandboxUnavailable, find_tool
from podium.agents.sessions import Agents
from podium.common import repositories
from podium.common.config import ignored_variables
from podium.common.consumer import PullConsumer
from podium.common.errors import StartupError
from podium.common.kv import Store
from podium.common.procs import not_dumpable
from podium.common.runtime import Context
from podium.contracts import streams, subjects
from podium.contracts.events import AnyEvent, KillTask
from podium.contracts.state import TaskRecord
from podium.worker.config import WorkerSettings
from podium.worker.egress import DEFAULT_API, Egress, credentials
from podium.worker.handlers import Worker
from podium.worker.metrics import WorkerMetrics
from podium.worker.prompts import ROLE
from podium.worker.repos import Repositories

log = logging.getLogger(__name__)


def by_task(event: AnyEvent) -> str | None:
    """Order key: turns of one task never overlap on a worker. A cancel has no lane: it
    must not wait behind the very turn it stops."""
    if isinstance(event, KillTask):
        return None
    return getattr(event, "task_id", None)


class WorkerService:
    """Runs up to ``slots`` tasks at once; never holds a task it has no slot for."""

    name = "worker"
    streams: Sequence[str] = (streams.TASKS.name, streams.RESULTS.name)

    def __init__(self, settings: WorkerSettings, runtime: AgentRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.consumer: PullConsumer | None = None
        self._kills: Subscription | None = None
        self.agents: Agents | None = None
        self._role_prompt = ROLE
        #: What runs its agents, as the start-up check found it.
        self._agent = ""
        self.repositories: Repositories | None = None
        self._http: aiohttp.ClientSession | None = None
        #: Where its agents run (None: unsandboxed), and what /readyz says of it.
        self.sandbox: Sandbox | None = None
        self.sandbox_state = ""
        self.egress: Egress | None = None
        self._egress_dir: Path | None = None
        self._state = Path(settings.state_dir).resolve()

    async def check(self) -> None:
        """Build the agent runtime and check that it can run (before connecting)."""
        # Its agents run as this user: they must not read this process's credentials.
        if not not_dumpable():
            log.warning("could not protect this process's environment from its agents")
        for ignored in ignored_variables(type(self.settings), os.environ):
            log.warning("setting ignored by this role", extra={"variable": ignored})
        self._role_prompt = role_prompt(self.settings.claude_role_prompt_file, ROLE)
        if self.runtime is None:
            await self._choose_sandbox()
            self.runtime = build_runtime(
                self.settings,
                Path(self.settings.state_dir),
                self.name,
                sandbox=self.sandbox,
                sandbox_permission_mode=self.settings.sandbox_permission_mode,
            )
        elif not self.sandbox_state:
            self.sandbox_state = "off (a runtime given by the caller)"
        self._load_repositories()
        self._agent = await self.runtime.check()
        log.info(
            "agent checked",
            extra={"agent": self.runtime.kind, "runs": self._agent, "sandbox": self.sandbox_state},
        )

    async def _choose_sandbox(self) -> None:
        """Set up the sandbox ``PODIUM_SANDBOX`` asks for, and say which mode is in force.

        ``auto`` falls back to no sandbox, saying why; ``on`` refuses to start instead.
        """
        s = self.settings
        if s.claude_permission_mode == "bypassPermissions":
            restrictive = (
                "agents run ANY shell command UNSANDBOXED "
                "(PODIUM_WORKER_CLAUDE_PERMISSION_MODE=bypassPermissions)"
            )
        elif s.claude_allowed_tools:
            restrictive = (
                "agents run the commands PODIUM_WORKER_CLAUDE_ALLOWED_TOOLS allows, "
                f"unsandboxed (permission mode {s.claude_permission_mode})"
            )
        else:
            restrictive = (
                f"agents run no shell commands (permission mode {s.claude_permission_mode})"
            )
        if s.sandbox == "off":
            self.sandbox_state = f"off (PODIUM_SANDBOX=off): {restrictive}"
            return
        if agent_kind(s) != "claude":
            self.sandbox_state = "off: the offline agent runs no commands"
            return
        try:
            self.sandbox = self._sandbox()
            version = await self.sandbox.check(self._state / "sandbox" / "check")
        except SandboxUnavailable as err:
            self.sandbox = None
            if self._egress_dir is not None:
                shutil.rmtree(self._egress_dir, ignore_errors=True)
                self._egress_dir = None
            if s.sandbox == "on":
                raise StartupError(f"PODIUM_SANDBOX=on, but the sandbox cannot run: {err}") from err
            self.sandbox_state = f"off ({err}): {restrictive}"
            log.warning("agents run without a sandbox", extra={"reason": str(err)})
            return
        hosts = len(s.sandbox_allow_hosts)
        reach = "the model API" + (f" and {hosts} allowed hosts" if hosts else " only")
        self.sandbox_state = (
            f"on ({version}): shell commands allowed (permission mode "
            f"{s.sandbox_permission_mode}), network: {reach}"
        )

    def _sandbox(self) -> Sandbox:
        """The sandbox of this worker's agents (not yet checked)."""
        if not credentials(os.environ):
            raise SandboxUnavailable(
                "its egress proxy passes on ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN, and "
                "neither is set (OAuth, Bedrock and Vertex logins are not supported)"
            )
        bwrap = find_tool("bwrap", self.settings.sandbox_bwrap, "bubblewrap")
        socat = find_tool("socat", self.settings.sandbox_socat, "socat")
        # Created now (the agents' command lines name the sockets); served from start().
        self._egress_dir = Path(tempfile.mkdtemp(prefix="podium-egress-"))
        return Sandbox(
            bwrap=bwrap,
            socat=socat,
            api_socket=self._egress_dir / "api.sock",
            proxy_socket=self._egress_dir / "proxy.sock",
            etc_dir=self._state / "sandbox" / "etc",
        )

    def _load_repositories(self) -> None:
        """A bad repositories file, or a token it names that is not set, stops the start."""
        found = repositories.load(self.settings.repositories_file)
        self.repositories = Repositories(
            found,
            Path(self.settings.state_dir).resolve(),
            author=self.settings.git_author,
            sandbox=self.sandbox,
        )
        if found:
            log.info("repositories", extra={"names": sorted(found)})

    async def start(self, ctx: Context) -> None:
        """Subscribe to kill requests, then start taking tasks."""
        if self.runtime is None:
            await self.check()
        if self.repositories is None:
            self._load_repositories()
        runtime = self.runtime
        assert runtime is not None  # noqa: S101 - set by check()
        ctx.metrics.info.labels(self.name, runtime.kind).set(1)
        own = WorkerMetrics(ctx.registry, self.settings.worker_slots)
        own.sandboxed.set(1 if self.sandbox is not None else 0)
        if self.sandbox is not None and self._egress_dir is not None:
            self.egress = Egress(
                directory=self._egress_dir,
                upstream=os.environ.get("ANTHROPIC_BASE_URL", "") or DEFAULT_API,
                credentials=credentials(os.environ),
                allow=self.settings.sandbox_allow_hosts,
                counter=own.egress,
            )
            await self.egress.start()
        self.agents = Agents(
            runtime, role="worker", settings=self.settings, metrics=ctx.metrics, js=ctx.js
        )
        await self.agents.start(ctx.spawn)
        worker = Worker(
            settings=self.settings,
            nc=ctx.nc,
            js=ctx.js,
            agents=self.agents,
            role_prompt=self._role_prompt,
            tasks=await Store.open(ctx.js, streams.TASK_STATE.name, TaskRecord),
            attachments=await ctx.js.object_store(streams.ATTACHMENTS),
            artifacts=await ctx.js.object_store(streams.ARTIFACTS),
            repositories=self.repositories,
            http=self._session(),
            metrics=ctx.metrics,
            own_metrics=own,
        )
        # New tasks adopt a CLI started ahead instead of waiting for one.
        self.agents.keep_spares(worker.role_prompt)
        self._kills = await ctx.nc.subscribe(subjects.KILL_ALL, cb=worker.on_kill)
        self.consumer = PullConsumer(
            ctx.nc,
            ctx.js,
            streams.WORKER_TASKS,
            worker.handle,
            service=self.name,
            metrics=ctx.metrics,
            concurrency=self.settings.worker_slots,
            # Hold no more than we can run: a task waiting here is a task another
            # worker could have started.
            max_held=self.settings.worker_slots,
            order_key=by_task,
            on_dead_letter=worker.on_dead_letter,
            # Its agent could not start moments ago: let healthy workers take tasks first.
            hold=self.agents.backing_off,
            spawn=ctx.spawn,
        )
        self.consumer.start()

    async def stop(self, timeout_s: float) -> None:
        """Stop taking tasks; let running ones finish up to ``timeout_s``, then hand them back."""
        if self.consumer is not None:
            await self.consumer.stop(timeout_s)
        if self._kills is not None:
            await self._kills.unsubscribe()
        if self.agents is not None:
            await self.agents.close()
        if self.egress is not None:
            await self.egress.close()
        if self._http is not None:
            await self._http.close()

    def _session(self) -> aiohttp.ClientSession:
        """The HTTP client of the providers' APIs (pull requests)."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    def readiness(self) -> tuple[bool, str]:
        """Ready while it consumes tasks and its agent can start."""
        if self.consumer is None or self.agents is None:
            return False, "starting"
        if problem := self.agents.problem():
            return False, problem
        if self.consumer.problem:
            return False, self.consumer.problem
        return True, (
            f"{self.settings.worker_slots} task slots; agent: {self._agent}; "
            f"sandbox: {self.sandbox_state}"
        )
