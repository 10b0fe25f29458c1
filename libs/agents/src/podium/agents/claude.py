"""The Claude Code CLI as an agent runtime: warm sessions, cold fallback, a watchdog.

A turn goes to a **warm** session when one is live: a long-lived
``claude -p --input-format stream-json --output-format stream-json`` process
that already holds the conversation, so the turn skips the CLI's start-up
(about 0.55 s here). Otherwise it is **cold**: a new long-lived process is
started with ``--resume`` (or a pre-assigned ``--session-id``) and kept in a
bounded LRU pool (``PODIUM_AGENT_POOL_SIZE``; idle ones close after
``PODIUM_AGENT_IDLE_TIMEOUT_S``). With a pool size of 0, or when every pooled
process is busy, each turn spawns ``claude -p --output-format json`` and exits.

A **new** session need not wait for a start-up either: ``PODIUM_AGENT_SPARES``
processes are kept started, each in its own fresh working and config directory
with a pre-assigned session id, its stdin open (the CLI does its start-up work
before the first message: measured 0.5 s → 0.07 s for that turn). A new
conversation or task adopts one: the spare's directories are renamed to the
key's (what the key already had there moves in), and the spare's old paths stay
as links to them for the process, which keeps using the paths it started with.
Its transcript is therefore filed under the spare's directory name; a later
start with ``--resume`` moves it under the key's (:meth:`ClaudeRuntime._file_transcript`).
A replacement spare starts in the background. A spare whose process died is
closed, never handed out; spares made for other settings (another role prompt
or schema) are dropped and made again.

Never two live processes on one session: turns of one key are serialised,
and a key has at most one process, here; across replicas the session lease
(``podium.agents.sessions``) does the same.

Facts this relies on are in ``docs/agents.md``; among them: check
``is_error`` as well as ``subtype``; a resume from another working directory
prints nothing and "No conversation found" on stderr; ``total_cost_usd`` in
stream-json results is a running total per process; a stream that stalls
mid-answer hangs the CLI for minutes, so every turn runs under our own
wall-clock watchdog that kills the whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from podium.agents import AgentAnswer, AgentCall, Mode, Outcome
from podium.agents.memory import MB, MemoryUse, cgroup_memory_limit, tree_rss
from podium.agents.sandbox import Sandbox, package_root
from podium.common.config import AgentSettings, PermissionMode
from podium.common.errors import AgentUnavailable
from podium.common.procs import die_with_parent, kill_group
from podium.common.runtime import Spawn, detached

log = logging.getLogger(__name__)

_SUBTYPES: dict[str, Outcome] = {
    "success": "ok",
    "error_max_turns": "max_turns",
    "error_max_budget_usd": "max_budget",
    "error_during_execution": "execution_error",
}

# Environment the CLI needs from ours; everything else (provider keys of other
# services, NATS credentials) stays out of the agent's reach.
_PASS_ENV = (
    "PATH", "LANG", "LC_ALL", "TZ", "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS",
    "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
    "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_CUSTOM_HEADERS", "API_TIMEOUT_MS",
    "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "AWS_REGION", "AWS_PROFILE",
    "CLOUD_ML_REGION", "ANTHROPIC_VERTEX_PROJECT_ID", "GOOGLE_APPLICATION_CREDENTIALS",
)  # fmt: skip

# What a sandboxed CLI gets of ours: nothing that authenticates (the egress proxy does).
_SANDBOX_PASS_ENV = ("LANG", "LC_ALL", "TZ", "API_TIMEOUT_MS", "ANTHROPIC_MODEL",
                     "ANTHROPIC_SMALL_FAST_MODEL")  # fmt: skip

# Long tool results arrive as one JSON line: allow big lines.
_LINE_LIMIT = 64 * 1024 * 1024
_LOST = "No conversation found"
#: Where ``make setup`` installs the pinned CLI, relative to the project's root.
PINNED_CLI = Path("tools/claude/node_modules/.bin/claude")


def pinned_cli(start: Path | None = None) -> Path | None:
    """The project's pinned CLI (``make setup``), found above this package or the cwd."""
    here = Path(__file__).resolve()
    for base in (start, Path.cwd(), here):
        if base is None:
            continue
        for folder in (base, *base.parents):
            candidate = folder / PINNED_CLI
            if candidate.exists():
                return candidate
    return None


def resolve_claude_bin(configured: str) -> str:
    """The CLI to run: ``PODIUM_CLAUDE_BIN`` if set, else ``claude`` on PATH, else the
    project's pinned CLI; ``claude`` (to fail with its name) when there is none."""
    if configured:
        return configured
    found = shutil.which("claude")
    if found is not None:
        return found
    pinned = pinned_cli()
    return str(pinned) if pinned is not None else "claude"


class CannotStart(Exception):
    """The CLI's process could not be started (becomes a ``cannot_start`` answer)."""


class NoRoom(Exception):
    """The memory budget has no room for another process (a ``busy`` answer)."""


#: What the service itself needs beside its agents' budget, in a container's limit.
SERVICE_RESERVE_MB = 256
#: A process younger than this is still starting up: it counts at least the estimate.
STARTING_S = 5.0
#: How often live processes are measured (for the metrics and a budget outgrown).
MEASURE_EVERY_S = 2.0


def _owner_alive(name: str) -> bool:
    """Whether the service process that made the spare called ``name`` still runs (its
    pid is in the name; this process's own leftovers are not alive ones)."""
    pid = name.removeprefix(SPARE_PREFIX).split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def project_dir_name(workdir: Path) -> str:
    """How the CLI names a working directory under ``projects/`` (non-alphanumerics → -)."""
    return re.sub(r"[^A-Za-z0-9]", "-", str(workdir))


@dataclass
class WarmSession:
    """A live stream-json CLI process holding one session."""

    key: str
    session_id: str
    proc: asyncio.subprocess.Process
    stderr: IO[bytes]
    last_used: float = field(default_factory=time.monotonic)
    #: ``total_cost_usd`` of the last result: the CLI reports a running total.
    cost_so_far: float = 0.0
    turns: int = 0
    busy: bool = False
    #: uuid of the last assistant message of the latest turn (see ``flushed``).
    last_message: str = ""
    #: A spare adopted for a new session: its first turn paid no start-up.
    adopted: bool = False
    #: Where an adopted spare files its transcript under ``projects/``: the CLI names
    #: it by the directory it started in, the spare's ("" = the key's own).
    project: str = ""

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.returncode is None

    async def turn(self, prompt: str) -> dict[str, Any] | None:
        """Send one user message; the turn's ``result`` object, or None if the process died."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None:
            return None
        line = {"type": "user", "message": {"role": "user", "content": prompt}}
        try:
            stdin.write(json.dumps(line).encode() + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return None
        while True:
            raw = await stdout.readline()
            if not raw:
                return None
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "assistant" and event.get("uuid"):
                    self.last_message = str(event["uuid"])
                if event.get("type") == "result":
                    return event

    async def close(self, grace_s: float = 5.0) -> None:
        """Close stdin (the CLI finishes and exits), then make sure the group is gone."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self.proc.wait()
        await kill_group(self.proc, grace_s=0.5)
        self.stderr.close()


@dataclass
class Spare:
    """A CLI process started ahead, waiting for a new session to adopt it."""

    warm: WarmSession
    workdir: Path
    config: Path
    stderr_log: Path
    #: What it was started for: the role, system prompt and schema of new sessions.
    profile: tuple[str, str, str | None]


def _profile(call: AgentCall) -> tuple[str, str, str | None]:
    return (call.role, call.system_prompt, call.json_schema)


#: Names of spares' directories (beside the keys' own; a key never starts with a dot).
SPARE_PREFIX = ".spare-"


class ClaudeRuntime:
    """Runs turns on the Claude Code CLI, warm when it can, cold when it must."""

    kind = "claude"

    def __init__(
        self,
        settings: AgentSettings,
        config_root: Path,
        *,
        sandbox: Sandbox | None = None,
        sandbox_permission_mode: PermissionMode = "bypassPermissions",
    ) -> None:
        self.spawn: Spawn = detached
        self.settings = settings
        self.config_root = config_root
        #: The executable run for every turn (see :func:`resolve_claude_bin`).
        self.bin = resolve_claude_bin(settings.claude_bin)
        #: Where every agent process runs, when sandboxed (the worker's, see
        #: ``podium.agents.sandbox``); its permission mode there (shell commands allowed).
        self.sandbox = sandbox
        self.permission_mode: PermissionMode = (
            sandbox_permission_mode if sandbox is not None else settings.claude_permission_mode
        )
        self.pool: OrderedDict[str, WarmSession] = OrderedDict()
        #: Started ahead for new sessions (``PODIUM_AGENT_SPARES``).
        self.spares: list[Spare] = []
        self._template: AgentCall | None = None
        self._filling: asyncio.Task[None] | None = None
        self._cleaned: set[Path] = set()
        #: Adopted spares' old paths (links now) and stderr logs (the process keeps
        #: writing there), by key: removed with the process.
        self._aliases: dict[str, tuple[Path, ...]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._problem = ""
        #: Every live process started here, and when (one-shots and warm ones alike).
        self._procs: dict[int, tuple[asyncio.subprocess.Process, float]] = {}
        #: Held from the budget check until the new process is counted.
        self._admission = asyncio.Lock()
        self._freed = asyncio.Event()
        self._per_process = settings.agent_process_mb * MB
        self._rss: dict[int, int] = {}
        self._spare_blocked = False
        self._memory = MemoryUse(budget=settings.agent_memory_budget_mb * MB)
        #: Told of each measurement, and of each session evicted (why), by ``Agents``.
        self.on_memory: Callable[[MemoryUse], None] = lambda use: None
        self.on_evict: Callable[[str], None] = lambda reason: None

    # --- can it run at all -------------------------------------------------

    def _setting(self) -> str:
        role = str(getattr(self.settings, "ROLE", ""))
        own = f" (or PODIUM_{role.upper()}_CLAUDE_BIN)" if role else ""
        if self.settings.claude_bin:
            return f"PODIUM_CLAUDE_BIN{own}={self.settings.claude_bin!r}"
        if self.bin == "claude":
            return (
                f"PODIUM_CLAUDE_BIN{own} is not set, and `claude` is neither on PATH nor "
                f"installed in {PINNED_CLI} (run `make setup`)"
            )
        return f"PODIUM_CLAUDE_BIN{own} is not set; tried {self.bin}"

    async def check(self) -> str:
        """Run ``<cli> --version`` once; raise :class:`AgentUnavailable` if it cannot run."""
        scratch = self.config_root / "check"
        scratch.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
        env.update(HOME=str(scratch), CLAUDE_CONFIG_DIR=str(scratch), DISABLE_AUTOUPDATER="1")
        try:
            proc = await asyncio.create_subprocess_exec(
                self.bin, "--version",
                env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
        except OSError as err:
            raise AgentUnavailable(
                f"the Claude Code CLI cannot be run: {self._setting()}: {_os_error(err)}"
            ) from err
        try:
            async with asyncio.timeout(30):
                out, err_out = await proc.communicate()
        except TimeoutError:
            await kill_group(proc, grace_s=0)
            raise AgentUnavailable(
                f"the Claude Code CLI did not answer `--version` in 30 s: {self._setting()}"
            ) from None
        if proc.returncode != 0:
            detail = _tail((err_out or out).decode("utf-8", "replace").strip(), 500)
            raise AgentUnavailable(
                f"the Claude Code CLI failed `--version` (exit status {proc.returncode}): "
                f"{self._setting()}: {detail}"
            )
        self._check_budget()
        # It runs (again): a problem seen at a spawn is over.
        self._problem = ""
        return f"{out.decode('utf-8', 'replace').strip()} at {self.bin}"

    def _check_budget(self) -> None:
        """A budget that cannot hold one process, or does not fit the container, is a
        mistake to stop for, not to find out at the first turn."""
        budget, one = self.settings.agent_memory_budget_mb, self.settings.agent_process_mb
        if budget and budget < one:
            raise AgentUnavailable(
                f"PODIUM_AGENT_MEMORY_BUDGET_MB={budget} has no room for one agent process "
                f"(PODIUM_AGENT_PROCESS_MB={one}): raise it, or set 0 for no budget"
            )
        limit = cgroup_memory_limit() // MB
        if budget and limit and budget + SERVICE_RESERVE_MB > limit:
            raise AgentUnavailable(
                f"PODIUM_AGENT_MEMORY_BUDGET_MB={budget} does not fit this container's "
                f"memory limit ({limit} MB) with {SERVICE_RESERVE_MB} MB for the service "
                f"itself: at most {limit - SERVICE_RESERVE_MB}"
            )
        log.info(
            "agent memory budget",
            extra={
                "budget_mb": budget or "none",
                "process_mb": one,
                # Turns beyond this many at once wait for room, whatever the concurrency.
                "processes": budget // one if budget else "unbounded",
                "container_limit_mb": limit or "none",
            },
        )

    def problem(self) -> str:
        """Why the last attempt to start the CLI failed ("" once one succeeds)."""
        return self._problem

    # --- where things live -------------------------------------------------

    def config_dir(self, call: AgentCall) -> Path:
        """The session's private ``CLAUDE_CONFIG_DIR`` (also its HOME and TMPDIR)."""
        return self.config_root / call.role / call.key

    def stderr_log(self, call: AgentCall) -> Path:
        """Where a warm process's stderr goes: beside, not inside, its config dir (a
        sandboxed agent may write there, and could plant a link where we open a file)."""
        return self.config_root / "stderr" / call.role / f"{call.key}.log"

    def transcript_path(self, call: AgentCall, session_id: str) -> Path:
        """The CLI's transcript of ``session_id`` (it names the project by the workdir).

        An adopted spare's CLI names it by the directory it started in, the spare's, or
        by the key's when it read its working directory only after the adoption renamed
        it (it does so lazily, early in its start-up): whichever holds the file.
        """
        projects = self.config_dir(call) / "projects"
        names = [project_dir_name(call.workdir)]
        warm = self.pool.get(call.key)
        if warm is not None and warm.project and warm.session_id == session_id:
            names.insert(0, warm.project)
        candidates = [projects / name / f"{session_id}.jsonl" for name in names]
        for path in candidates:
            if path.exists():
                return path
        # Should the CLI ever name project directories differently, find the file.
        found = next(iter(projects.glob(f"*/{session_id}.jsonl")), None)
        return found if found is not None else candidates[0]

    # --- the command line --------------------------------------------------

    def command(
        self, call: AgentCall, session_id: str, *, resume: bool, streaming: bool
    ) -> list[str]:
        """The CLI's arguments for ``call`` (no prompt: it goes on stdin)."""
        s = self.settings
        # Sandboxed, the CLI runs from its real path: the link to it is not in the sandbox.
        cli = str(Path(shutil.which(self.bin) or self.bin).resolve()) if self.sandbox else self.bin
        cmd = [cli, "-p"]
        if streaming:
            cmd += ["--input-format", "stream-json", "--output-format", "stream-json", "--verbose"]
        else:
            cmd += ["--output-format", "json"]
        cmd += ["--resume", session_id] if resume else ["--session-id", session_id]
        if call.role == "conductor":
            # The conductor decides and delegates, in text: no tool, whatever the settings
            # say (ConductorSettings refuses tool settings at start as well).
            cmd += ["--permission-mode", "default", "--tools="]
        else:
            cmd += ["--permission-mode", self.permission_mode]
            if s.claude_tools != "default":
                cmd.append(f"--tools={s.claude_tools}")
            if s.claude_allowed_tools:
                cmd.append(f"--allowedTools={s.claude_allowed_tools}")
            if s.claude_disallowed_tools:
                cmd.append(f"--disallowedTools={s.claude_disallowed_tools}")
        if s.claude_model:
            cmd += ["--model", s.claude_model]
        if s.agent_max_turns:
            cmd += ["--max-turns", str(s.agent_max_turns)]
        if s.agent_max_budget_usd:
            cmd += ["--max-budget-usd", f"{s.agent_max_budget_usd:g}"]
        if call.json_schema:
            cmd += ["--json-schema", call.json_schema]
        if call.role == "conductor":
            cmd += ["--strict-mcp-config"]  # no MCP server either
        elif s.claude_mcp_config:
            cmd += ["--mcp-config", s.claude_mcp_config, "--strict-mcp-config"]
        if call.system_prompt:
            flag = "--append-system-prompt"
            if s.claude_system_prompt_mode == "replace":
                flag = "--system-prompt"
            cmd += [flag, call.system_prompt]
        return cmd

    def environment(self, call: AgentCall) -> dict[str, str]:
        """The CLI's environment: a short allowlist plus its private directories.

        Sandboxed, nothing of ours that authenticates: the model API and an HTTPS proxy
        are local ports, and the egress proxy adds the credentials on the way out.
        """
        passed = _SANDBOX_PASS_ENV if self.sandbox else _PASS_ENV
        env = {k: v for k, v in os.environ.items() if k in passed}
        config = self.config_dir(call)
        env.update(
            HOME=str(config),
            CLAUDE_CONFIG_DIR=str(config),
            TMPDIR=str(config / "tmp"),
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_AUTOUPDATER="1",
            DISABLE_TELEMETRY="1",
            DISABLE_ERROR_REPORTING="1",
            CLAUDE_CODE_MAX_RETRIES=str(self.settings.claude_max_retries),
        )
        if self.sandbox is not None:
            env.update(self.sandbox.environment())
        elif self.permission_mode == "bypassPermissions":
            # As root the CLI refuses to bypass permissions outside a declared sandbox;
            # unsandboxed, the agent's sandbox is its container and working directory.
            env["IS_SANDBOX"] = "1"
        return env

    async def _spawn(
        self,
        call: AgentCall,
        session_id: str,
        *,
        resume: bool,
        streaming: bool,
        spare: bool = False,
    ) -> asyncio.subprocess.Process:
        """Start the CLI for ``call`` once the memory budget has room for it (raises
        :class:`NoRoom` when it has none within the call's time limit, or at once for
        a spare). The check and the start hold ``_admission``, so the next check counts
        this process; waiting for room does not."""
        deadline = time.monotonic() + call.timeout_s
        while True:
            self._freed.clear()
            # (Held briefly: a measurement, evictions, a start; never while waiting.)
            async with self._admission:
                if await self._room(spare=spare):
                    proc = await self._start(call, session_id, resume=resume, streaming=streaming)
                    self._procs[proc.pid] = (proc, time.monotonic())
                    return proc
            use = self._memory
            if spare:
                raise NoRoom(
                    f"no room for a spare: {sum(use.processes.values())} agent processes, "
                    f"all busy, take {use.total // MB} MB of the {use.budget // MB} MB budget"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoRoom(
                    f"the agent memory budget (PODIUM_AGENT_MEMORY_BUDGET_MB="
                    f"{use.budget // MB}) is taken by {sum(use.processes.values())} busy "
                    f"processes ({use.total // MB} MB); no room for another within "
                    f"{call.timeout_s:g}s"
                )
            # Until a process ends or a turn does (its session becomes evictable).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, left)):
                    await self._freed.wait()

    async def _start(
        self, call: AgentCall, session_id: str, *, resume: bool, streaming: bool
    ) -> asyncio.subprocess.Process:
        call.workdir.mkdir(parents=True, exist_ok=True)
        (self.config_dir(call) / "tmp").mkdir(parents=True, exist_ok=True)
        stderr: int | IO[bytes] = asyncio.subprocess.PIPE
        if streaming:
            log_path = self.stderr_log(call)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
            stderr = os.fdopen(os.open(log_path, flags, 0o600), "ab")
        argv = self.command(call, session_id, resume=resume, streaming=streaming)
        cli = argv[0]
        if self.sandbox is not None:
            argv = self.sandbox.command(
                argv,
                workdir=call.workdir,
                writable=(self.config_dir(call),),
                read_only=(package_root(Path(cli)), *call.readable),
            )
        try:
            if self.sandbox is not None and not os.access(cli, os.X_OK):
                # bwrap would start and then fail to run it, which would look like a crash
                # of the agent instead of a CLI this worker cannot start.
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cli)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=call.workdir,
                env=self.environment(call),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=_LINE_LIMIT,
                # Its own process group, so a kill reaches every tool it started;
                # and it dies with us, so no orphan keeps the session open.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as err:
            # The CLI vanished or lost its execute bit after the start-up check: an
            # outcome for the caller (a FAILED task, an escalation), never an exception.
            self._problem = f"the Claude Code CLI cannot be started: {self._setting()}: "
            self._problem += _os_error(err)
            log.error("agent cannot start", extra={"error": self._problem})  # noqa: TRY400
            raise CannotStart(self._problem) from err
        finally:
            if not isinstance(stderr, int):
                stderr.close()
        self._problem = ""
        return proc

    # --- turns -----------------------------------------------------------

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def run(self, call: AgentCall) -> AgentAnswer:
        """One turn: warm if ``call.key`` has a live session, else cold."""
        self._start_reaper()
        try:
            return await self._run(call)
        except CannotStart as err:
            return AgentAnswer(
                text="", session_id=call.session_id or "", outcome="cannot_start", error=str(err)
            )
        except NoRoom as err:
            return AgentAnswer(
                text="", session_id=call.session_id or "", outcome="busy", error=str(err)
            )

    async def _run(self, call: AgentCall) -> AgentAnswer:
        async with self._lock(call.key):
            warm = self.pool.get(call.key)
            if warm is not None and (
                not warm.alive or warm.session_id != call.session_id or call.session_id is None
            ):
                # The caller moved to another (or a new) session, or the process died.
                await self._drop(call.key)
                warm = None
            if warm is None and self.settings.agent_pool_size > 0:
                if call.session_id is None:
                    warm = await self._adopt(call)
                if warm is None:
                    warm = await self._start_warm(call)
            if warm is None:
                return await self._one_shot(call)
            return await self._warm_turn(call, warm)

    async def _make_room(self) -> bool:
        """Room in the pool for one more session (evicting the LRU idle one); False if
        every pooled process is busy."""
        while len(self.pool) >= self.settings.agent_pool_size:
            idle = next((k for k, w in self.pool.items() if not w.busy), None)
            if idle is None:
                return False
            log.info("evicting warm session", extra={"key": idle, "reason": "pool full"})
            await self._drop(idle)
            self.on_evict("pool_full")
        return True

    async def _start_warm(self, call: AgentCall) -> WarmSession | None:
        """A new pooled process for ``call`` (evicting the LRU idle one); None if all busy."""
        if not await self._make_room():
            return None
        if call.session_id is not None:
            self._file_transcript(call, call.session_id)
        session_id = call.session_id or str(uuid.uuid4())
        log_path = self.stderr_log(call)
        offset = log_path.stat().st_size if log_path.exists() else 0
        proc = await self._spawn(
            call, session_id, resume=call.session_id is not None, streaming=True
        )
        # What this process writes to stderr, for when it dies without a result.
        stderr = log_path.open("rb")
        stderr.seek(offset)
        warm = WarmSession(call.key, session_id, proc, stderr)
        warm.turns = -1  # marks the first turn as cold (it paid for the start-up)
        self.pool[call.key] = warm
        return warm

    async def _warm_turn(self, call: AgentCall, warm: WarmSession) -> AgentAnswer:
        self.pool.move_to_end(call.key)
        mode: Mode = "cold" if warm.turns < 0 else "spare" if warm.adopted else "warm"
        warm.adopted = False
        started = time.monotonic()
        warm.busy = True
        try:
            async with asyncio.timeout(call.timeout_s):
                result = await warm.turn(call.prompt)
        except TimeoutError:
            await self._drop(call.key)
            return AgentAnswer(
                text="", session_id=warm.session_id, outcome="timeout", mode=mode,
                error=f"no answer within {call.timeout_s:g}s; process group killed",
                duration_ms=_ms(started),
            )  # fmt: skip
        except BaseException:
            # Cancelled (a kill, a shutdown) or broken: never leave the agent behind.
            await self._drop(call.key)
            raise
        finally:
            warm.busy = False
            warm.last_used = time.monotonic()
            self._tally()
            self._freed.set()  # an idle session now: one a turn waiting for room may evict
        if result is None:
            self.pool.pop(call.key, None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await warm.proc.wait()
            err = warm.stderr.read().decode("utf-8", "replace")
            await warm.close(grace_s=0.5)
            lost = _LOST in err
            return AgentAnswer(
                text="", session_id=warm.session_id, mode=mode,
                outcome="session_lost" if lost else "crashed",
                error=_tail(err or f"agent process exited ({warm.proc.returncode})"),
                duration_ms=_ms(started),
            )  # fmt: skip
        answer = answer_from(result, warm.session_id, _ms(started), mode=mode)
        # stream-json results carry running totals: this turn's cost is the difference.
        total = answer.cost_usd
        answer = _with_cost(answer, max(0.0, total - warm.cost_so_far))
        warm.cost_so_far = total
        warm.turns = max(warm.turns, 0) + 1
        warm.session_id = answer.session_id
        return answer

    async def _one_shot(self, call: AgentCall) -> AgentAnswer:
        """``claude -p --output-format json``: start, answer, exit."""
        session_id = call.session_id or str(uuid.uuid4())
        started = time.monotonic()
        if call.session_id is not None:
            self._file_transcript(call, call.session_id)
        proc = await self._spawn(
            call, session_id, resume=call.session_id is not None, streaming=False
        )
        try:
            async with asyncio.timeout(call.timeout_s):
                stdout, stderr = await proc.communicate(call.prompt.encode())
        except TimeoutError:
            await kill_group(proc)
            return AgentAnswer(
                text="", session_id=session_id, outcome="timeout",
                error=f"no answer within {call.timeout_s:g}s; process group killed",
                duration_ms=_ms(started),
            )  # fmt: skip
        except BaseException:
            await kill_group(proc)
            raise
        finally:
            self._freed.set()
        # Tools it started in the background must not outlive the turn.
        await kill_group(proc, grace_s=0)
        self._tally()
        return parse_result(stdout, stderr, proc.returncode, session_id, _ms(started))

    # --- the pool ----------------------------------------------------------

    async def _drop(self, key: str) -> None:
        warm = self.pool.pop(key, None)
        if warm is not None:
            await warm.close(grace_s=0.5)
            self._freed.set()
            self._tally()
        for path in self._aliases.pop(key, ()):
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)

    # --- spares --------------------------------------------------------------

    def keep_spares(self, template: AgentCall) -> None:
        """Keep ``PODIUM_AGENT_SPARES`` processes started for new sessions like
        ``template`` (see the module docstring)."""
        if self.settings.agent_pool_size == 0 or self.settings.agent_spares == 0:
            return
        if self._template is not None and _profile(self._template) != _profile(template):
            stale, self.spares = self.spares, []
            for spare in stale:
                self.spawn(self._discard(spare, "made for other settings"), "claude-spare-drop")
        self._template = template
        self._start_reaper()  # measures, and retries spares that found no room
        self._refill()

    def _refill(self) -> None:
        if self._template is not None and (self._filling is None or self._filling.done()):
            self._filling = self.spawn(self._fill(), "claude-spares")

    async def _fill(self) -> None:
        """Start spares until there are enough (one at a time: a start-up is CPU-bound)."""
        while self._template is not None and len(self.spares) < self.settings.agent_spares:
            template = self._template
            self._clean_stale(template)
            # Named by this process's pid: another service on this host (sharing the
            # workspace root) leaves a live one's spares alone when it cleans up.
            name = f"{SPARE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
            call = replace(
                template, key=name, workdir=template.workdir.parent / name, session_id=None
            )
            session_id = str(uuid.uuid4())
            try:
                proc = await self._spawn(call, session_id, resume=False, streaming=True, spare=True)
            except CannotStart:
                return  # reported by _spawn (readiness says why); tried again on next use
            except NoRoom as err:
                # Every process is busy: tried again as turns end (the reaper's round).
                if not self._spare_blocked:
                    log.info("spare not started", extra={"reason": str(err)})
                self._spare_blocked = True
                return
            self._spare_blocked = False
            log_path = self.stderr_log(call)
            warm = WarmSession(name, session_id, proc, log_path.open("rb"))
            spare = Spare(warm, call.workdir, self.config_dir(call), log_path, _profile(template))
            if self._template is None or _profile(self._template) != spare.profile:
                await self._discard(spare, "settings changed while it started")
                continue
            self.spares.append(spare)
            self._tally()
            log.info("spare started", extra={"spare": name, "session_id": session_id})

    async def _adopt(self, call: AgentCall) -> WarmSession | None:
        """A spare for ``call``'s new session, its directories made the key's; None if
        there is none to give (or it would not fit)."""
        if call.readable or not call.carry_workdir:
            return None  # a repository task: its directory is a worktree made for it
        adopted: WarmSession | None = None
        while self.spares and adopted is None:
            spare = self.spares.pop(0)
            if spare.profile != _profile(call):
                # The role prompt or schema changed: every spare is stale.
                await self._discard(spare, "made for other settings")
                self.keep_spares(call)
                break
            # Room in the pool's count if an idle session can go; if every one is busy, the
            # pool holds one more for a while (this process runs already: no memory more).
            await self._make_room()
            if not spare.warm.alive:  # (checked after the wait above)
                await self._discard(spare, "its process died")
                continue
            try:
                self._move_in(spare, call)
            except OSError as err:
                log.warning("spare not adopted", extra={"key": call.key, "error": repr(err)})
                await self._discard(spare, "its directories could not be moved")
                continue
            adopted = spare.warm
            adopted.key, adopted.turns, adopted.adopted = call.key, 0, True
            adopted.project = project_dir_name(spare.workdir)
            adopted.last_used = time.monotonic()
            self.pool[call.key] = adopted
            self._aliases[call.key] = (spare.workdir, spare.config, spare.stderr_log)
            log.info("spare adopted", extra={"key": call.key, "session_id": adopted.session_id})
        self._refill()
        return adopted

    def _move_in(self, spare: Spare, call: AgentCall) -> None:
        """Make the spare's directories ``call``'s, leaving links at the old paths (the
        process keeps using those). What the key's directory already held (a task's
        inputs) moves into the spare's first; a config dir of an earlier session goes."""
        target = call.workdir
        moved: list[str] = []
        try:
            if target.is_dir() and not target.is_symlink():
                for entry in target.iterdir():
                    entry.rename(spare.workdir / entry.name)
                    moved.append(entry.name)
                target.rmdir()
            target.parent.mkdir(parents=True, exist_ok=True)
            spare.workdir.rename(target)
        except OSError:
            # The spare will be discarded: what the key had (a task's inputs) goes back.
            target.mkdir(parents=True, exist_ok=True)
            for name in moved:
                with contextlib.suppress(OSError):
                    (spare.workdir / name).rename(target / name)
            raise
        spare.workdir.symlink_to(target, target_is_directory=True)
        config = self.config_dir(call)
        if config.is_symlink():
            config.unlink()
        elif config.exists():
            shutil.rmtree(config)
        config.parent.mkdir(parents=True, exist_ok=True)
        spare.config.rename(config)
        spare.config.symlink_to(config, target_is_directory=True)

    async def _discard(self, spare: Spare, why: str) -> None:
        log.info("spare dropped", extra={"spare": spare.warm.key, "reason": why})
        await spare.warm.close(grace_s=0.5)
        self._freed.set()
        self._tally()
        for path in (spare.workdir, spare.config):
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
        spare.stderr_log.unlink(missing_ok=True)

    def _clean_stale(self, template: AgentCall) -> None:
        """Spares' directories, links and logs a stopped process left (once per folder);
        a live process's (another service's on this host) are left alone."""
        mine = {p for spare in self.spares for p in (spare.workdir, spare.config)}
        mine |= {p for links in self._aliases.values() for p in links}
        folders = (
            template.workdir.parent,
            self.config_root / template.role,
            self.stderr_log(template).parent,
        )
        for folder in folders:
            if folder in self._cleaned or not folder.is_dir():
                continue
            self._cleaned.add(folder)
            for path in folder.glob(f"{SPARE_PREFIX}*"):
                if path in mine or _owner_alive(path.name):
                    continue
                if path.is_symlink() or path.is_file():
                    path.unlink(missing_ok=True)  # a link is removed, never followed
                else:
                    shutil.rmtree(path, ignore_errors=True)

    def _file_transcript(self, call: AgentCall, session_id: str) -> None:
        """Before a ``--resume``: a session begun in an adopted spare was filed under the
        spare's directory name; the CLI looks under the key's."""
        expected = self.transcript_path(call, session_id)
        wanted = self.config_dir(call) / "projects" / project_dir_name(call.workdir)
        if expected.parent == wanted or not expected.exists():
            return
        if not wanted.exists():
            expected.parent.rename(wanted)
            return
        # The transcript, and the folder the CLI may keep beside it (tool results).
        for path in (expected, expected.parent / session_id):
            if path.exists() and not (wanted / path.name).exists():
                path.rename(wanted / path.name)

    async def settle(self, call: AgentCall, session_id: str) -> None:
        """Wait until the transcript holds the latest turn.

        A live process writes its transcript about 80 ms after it emits the result
        (measured here); a copy taken before that would miss the turn.
        """
        warm = self.pool.get(call.key)
        if warm is not None and warm.last_message:
            await _flushed(lambda: self.transcript_path(call, session_id), warm.last_message)

    async def forget(self, key: str) -> None:
        """Close ``key``'s warm process: its in-memory history is no longer current."""
        async with self._lock(key):
            await self._drop(key)

    def live(self) -> int:
        """Warm processes (and spares) alive now."""
        return sum(1 for w in self.pool.values() if w.alive) + sum(
            1 for spare in self.spares if spare.warm.alive
        )

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = self.spawn(self._reap(), "claude-idle-reaper")

    async def _reap(self) -> None:
        """Close warm sessions idle longer than ``PODIUM_AGENT_IDLE_TIMEOUT_S``; measure
        the processes (a budget outgrown by a turn's tools evicts idle ones); start
        spares that did not fit before."""
        idle_s = self.settings.agent_idle_timeout_s
        reaped = time.monotonic()
        while True:
            await asyncio.sleep(min(idle_s / 4, MEASURE_EVERY_S))
            now = time.monotonic()
            if now - reaped >= min(idle_s / 4, 10.0):
                reaped = now
                for key, warm in list(self.pool.items()):
                    lock = self._lock(key)
                    if not warm.busy and not lock.locked() and now - warm.last_used > idle_s:
                        log.info("closing idle warm session", extra={"key": key})
                        async with lock:
                            await self._drop(key)
                        self.on_evict("idle")
            if not self._admission.locked():
                async with self._admission:
                    await self._shed(self._measure())
            if len(self.spares) < self.settings.agent_spares:
                self._refill()

    # --- memory --------------------------------------------------------------

    def _measure(self) -> MemoryUse:
        """Measure every live process's tree (one pass over the process table)."""
        for pid, (proc, _) in list(self._procs.items()):
            if proc.returncode is not None:
                del self._procs[pid]
        self._rss = tree_rss(self._procs)
        now = time.monotonic()
        settled = [
            self._rss[pid]
            for pid, (_, at) in self._procs.items()
            if pid in self._rss and now - at > STARTING_S
        ]
        if settled:
            # What the next process is expected to take: what the largest of these takes
            # (a turn's tools make a process grow; the budget errs on the safe side).
            self._per_process = max(settled)
        return self._tally()

    def _tally(self) -> MemoryUse:
        """The processes by state, at their last measured size (no new measurement)."""
        now = time.monotonic()
        states = {w.proc.pid: ("busy" if w.busy else "idle") for w in self.pool.values()}
        states |= {s.warm.proc.pid: "spare" for s in self.spares}
        used: dict[str, int] = {}
        count: dict[str, int] = {}
        for pid, (proc, at) in self._procs.items():
            if proc.returncode is not None:
                continue
            size = self._rss.get(pid, 0)
            if now - at <= STARTING_S:
                size = max(size, self._per_process)  # still growing as it starts
            state = states.get(pid, "busy")  # one-shots, and processes being started
            used[state] = used.get(state, 0) + size
            count[state] = count.get(state, 0) + 1
        self._memory = MemoryUse(
            budget=self.settings.agent_memory_budget_mb * MB,
            used=used,
            processes=count,
            per_process=self._per_process,
        )
        self.on_memory(self._memory)
        return self._memory

    def memory(self) -> MemoryUse:
        """The agent processes as last measured."""
        return self._memory

    async def _room(self, *, spare: bool) -> bool:
        """Whether the budget has room for one more process, once the least recently
        used idle sessions (and, unless this is for a spare, spares) are let go.

        A spare may evict idle sessions too (the next new conversation or task needs it
        more than an idle one needs its process, which resumes cold) but takes no other
        spare's place."""
        budget = self.settings.agent_memory_budget_mb * MB
        if not budget:
            return True
        while True:
            use = self._measure()
            if use.total + use.per_process <= budget:
                return True
            if not await self._shed(use, need=use.per_process, spares=not spare):
                return False

    async def _shed(self, use: MemoryUse, need: int = 0, *, spares: bool = True) -> bool:
        """Free one process if the budget is outgrown (or lacks ``need``): the least
        recently used idle session, else (if ``spares``) a spare. Whether one went."""
        budget = self.settings.agent_memory_budget_mb * MB
        if not budget or use.total + need <= budget:
            return False
        idle = next(
            (k for k, w in self.pool.items() if not w.busy and not self._lock(k).locked()),
            None,
        )
        if idle is not None:
            log.info(
                "evicting warm session",
                extra={"key": idle, "reason": "memory budget", "used_mb": use.total // MB},
            )
            await self._drop(idle)
            self.on_evict("memory")
            return True
        if spares and self.spares:
            await self._discard(self.spares.pop(), "memory budget")
            self.on_evict("spare")
            return True
        return False

    async def close(self) -> None:
        """Close every warm session (service shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
        self._template = None
        if self._filling is not None:
            # Its spare being started is tracked and closed with the others below.
            self._filling.cancel()
            await asyncio.wait({self._filling}, timeout=5)
        spares, self.spares = self.spares, []
        await asyncio.gather(
            *(self._drop(key) for key in list(self.pool)),
            *(self._discard(spare, "shutting down") for spare in spares),
        )
        # Anything else still running that was started here (a spare cut off while it
        # started): nothing outlives the runtime.
        await asyncio.gather(
            *(
                kill_group(proc, grace_s=0)
                for proc, _ in self._procs.values()
                if proc.returncode is None
            )
        )


async def _flushed(where: Callable[[], Path], message_uuid: str, timeout_s: float = 5.0) -> None:
    """Wait until the transcript holds the message ``message_uuid`` (``where`` says where
    it is, looked up again each time: the file may not exist yet when this starts)."""
    if not message_uuid:
        return
    needle = message_uuid.encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if needle in await asyncio.to_thread(_tail_bytes, where(), 1 << 20):
                return
        await asyncio.sleep(0.01)
    log.warning("transcript not flushed in time", extra={"path": str(where())})


def _tail_bytes(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _with_cost(answer: AgentAnswer, cost: float) -> AgentAnswer:
    return replace(answer, cost_usd=cost)


def answer_from(
    data: dict[str, Any], session_id: str, duration_ms: int, *, mode: Mode = "cold"
) -> AgentAnswer:
    """Map one CLI ``result`` object to an answer."""
    subtype = str(data.get("subtype", ""))
    outcome = _SUBTYPES.get(subtype, "execution_error")
    if outcome == "ok" and data.get("is_error"):
        # API errors and timeouts come back as subtype "success" with is_error set.
        outcome = "execution_error"
    result = data.get("result")
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        error = "; ".join(str(e) for e in errors)
    else:
        error = str(result or subtype)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    assert isinstance(usage, dict)  # noqa: S101 - narrowed above
    return AgentAnswer(
        text=result if isinstance(result, str) and outcome == "ok" else "",
        session_id=str(data.get("session_id") or session_id),
        outcome=outcome,
        error="" if outcome == "ok" else _tail(error),
        cost_usd=float(data.get("total_cost_usd") or 0.0),
        num_turns=int(data.get("num_turns") or 0),
        duration_ms=duration_ms,
        mode=mode,
        input_tokens=int(usage.get("input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
        cache_read_tokens=int(usage.get("cache_read_input_tokens") or 0),
        cache_creation_tokens=int(usage.get("cache_creation_input_tokens") or 0),
        structured=data.get("structured_output") if outcome == "ok" else None,
    )


def parse_result(
    stdout: bytes, stderr: bytes, returncode: int | None, session_id: str, duration_ms: int
) -> AgentAnswer:
    """Map the output of ``claude -p --output-format json`` to an answer; never raises."""
    text = stdout.decode("utf-8", "replace").strip()
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict) and candidate.get("type") == "result":
                return answer_from(candidate, session_id, duration_ms)
    err_text = stderr.decode("utf-8", "replace").strip()
    lost = _LOST in err_text or _LOST in text
    return AgentAnswer(
        text="",
        session_id=session_id,
        outcome="session_lost" if lost else "crashed",
        error=_tail(err_text or text or f"exit status {returncode}"),
        duration_ms=duration_ms,
    )


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")


def _tail(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


__all__ = [
    "ClaudeRuntime",
    "WarmSession",
    "answer_from",
    "parse_result",
    "pinned_cli",
    "project_dir_name",
    "resolve_claude_bin",
]
