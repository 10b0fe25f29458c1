"""Agent runtimes behind one small interface.

A runtime turns an :class:`AgentCall` (a prompt for a session, in a working
directory) into an :class:`AgentAnswer`. It never raises for an agent-side
failure: a crash, a timeout, a budget or turn limit all come back as an answer
with ``ok=False`` and an ``outcome`` that says which. Cancelling ``run`` (a
kill) terminates the agent's whole process group.

- ``claude``: the Claude Code CLI (``claude -p``), see :mod:`.claude`.
- ``offline``: a deterministic built-in agent for running without credentials,
  see :mod:`.offline`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from podium.common.config import AgentSettings, PermissionMode, claude_credentials_present
from podium.common.errors import ConfigError
from podium.common.runtime import Spawn

if TYPE_CHECKING:
    from collections.abc import Callable

    from podium.agents.memory import MemoryUse
    from podium.agents.sandbox import Sandbox

log = logging.getLogger(__name__)

Role = Literal["conductor", "worker"]
Outcome = Literal[
    "ok",
    "max_turns",
    "max_budget",
    "execution_error",
    "timeout",
    "crashed",
    "session_lost",
    # Another replica holds the session and did not free it in time.
    "busy",
    # The agent's process could not be started (the CLI is missing or not executable).
    "cannot_start",
]
#: cold: a process started for the turn; warm: a live process answered it; spare: a
#: process started ahead of time answered the first turn of its session.
Mode = Literal["cold", "warm", "spare"]


@dataclass(frozen=True)
class AgentCall:
    """One turn of an agent session."""

    role: Role
    #: Stable key of the session's owner (conversation id or task id): selects the
    #: session's private config directory.
    key: str
    prompt: str
    workdir: Path
    #: Session to resume; None starts a new one.
    session_id: str | None = None
    system_prompt: str = ""
    timeout_s: float = 600.0
    #: A JSON schema the answer must follow (the CLI's --json-schema); None = free text.
    json_schema: str | None = None
    #: Whether a worker's directory goes with its session to another replica. A
    #: repository task's does not: its worktree is made again from the pushed branch.
    carry_workdir: bool = True
    #: More paths a sandboxed agent may read (a repository task's mirror, which its
    #: worktree's git metadata lives in).
    readable: tuple[Path, ...] = ()


@dataclass(frozen=True)
class AgentAnswer:
    """What one turn produced."""

    text: str
    session_id: str
    outcome: Outcome = "ok"
    error: str = ""
    cost_usd: float = 0.0
    num_turns: int = 0
    duration_ms: int = 0
    #: cold: a process started for this turn; warm: a live process answered it.
    mode: Mode = "cold"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    #: The structured answer when the call asked for one (``json_schema``).
    structured: Any = None

    @property
    def ok(self) -> bool:
        """Whether the turn succeeded."""
        return self.outcome == "ok"


class AgentRuntime(Protocol):
    """Runs agent turns."""

    kind: str
    #: Who owns the runtime's long-lived loops (set by ``Agents.start``).
    spawn: Spawn
    #: Told of each measurement of the runtime's processes, and of each live process it
    #: let go to make room (why: memory, pool_full, idle, spare); set by ``Agents``.
    on_memory: Callable[[MemoryUse], None]
    on_evict: Callable[[str], None]

    async def check(self) -> str:
        """Check that agents can run; what runs them (for the log). At start, and again
        while :meth:`problem` reports one (a success clears it).

        Raises :class:`~podium.common.errors.AgentUnavailable` naming the setting,
        the path tried and the error.
        """

    def problem(self) -> str:
        """Why agents cannot run now ("" when they can): the service is not ready."""

    async def run(self, call: AgentCall) -> AgentAnswer:
        """Run one turn. Cancelling kills the agent's process group."""

    def transcript_path(self, call: AgentCall, session_id: str) -> Path:
        """Where this runtime keeps the transcript of ``session_id`` for ``call``'s owner."""

    async def settle(self, call: AgentCall, session_id: str) -> None:
        """Wait until the transcript on disk holds the turn just answered."""

    async def forget(self, key: str) -> None:
        """Drop any live state of ``key``'s session (another replica moved it on)."""

    def keep_spares(self, template: AgentCall) -> None:
        """Keep processes started ahead for new sessions shaped like ``template`` (its role,
        system prompt and schema); a template that differs replaces the spares."""

    def live(self) -> int:
        """Live agent processes held now."""

    async def close(self) -> None:
        """Stop every live agent process."""


def role_prompt(path: str, default: str) -> str:
    """The role prompt: the file ``PODIUM_CLAUDE_ROLE_PROMPT_FILE`` names, or ``default``."""
    if not path:
        return default
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            [f"PODIUM_CLAUDE_ROLE_PROMPT_FILE={path!r} cannot be read: {err}"]
        ) from err


def agent_kind(settings: AgentSettings, environ: dict[str, str] | None = None) -> str:
    """The runtime ``PODIUM_AGENT`` selects: ``auto`` is claude only with credentials."""
    if settings.agent == "auto":
        return "claude" if claude_credentials_present(environ) else "offline"
    return settings.agent


def build_runtime(
    settings: AgentSettings,
    state_dir: Path,
    service: str,
    *,
    sandbox: Sandbox | None = None,
    sandbox_permission_mode: PermissionMode = "bypassPermissions",
) -> AgentRuntime:
    """The runtime ``PODIUM_AGENT`` selects; ``auto`` picks claude only with credentials.

    ``sandbox``: where the Claude CLI's processes run (a worker's), with
    ``sandbox_permission_mode`` there.
    """
    kind = agent_kind(settings)
    if kind == "claude":
        from podium.agents.claude import ClaudeRuntime  # noqa: PLC0415

        return ClaudeRuntime(
            settings,
            state_dir.resolve() / "claude",
            sandbox=sandbox,
            sandbox_permission_mode=sandbox_permission_mode,
        )
    from podium.agents.offline import OfflineRuntime  # noqa: PLC0415

    banner = "=" * 72
    log.warning(
        "%s\nOFFLINE AGENT: podium-%s is using the built-in deterministic agent, not Claude.\n"
        "Set ANTHROPIC_API_KEY (and PODIUM_AGENT=claude) for real agents.\n%s",
        banner,
        service,
        banner,
        extra={"agent": "offline"},
    )
    return OfflineRuntime(state_dir.resolve() / "offline", delay_s=settings.offline_delay_s)
