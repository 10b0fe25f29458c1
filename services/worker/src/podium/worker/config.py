"""Worker settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from podium.common.config import AgentSettings, PermissionMode, setting


class WorkerSettings(AgentSettings, frozen=True, kw_only=True):
    """Settings of ``podium-worker``: agent settings from ``PODIUM_WORKER_<NAME>``, then
    the shared ``PODIUM_<NAME>``."""

    ROLE: ClassVar[str] = "worker"

    worker_slots: Annotated[
        int,
        setting(
            "Tasks this worker runs at once (each is one agent process; beyond what "
            "PODIUM_AGENT_MEMORY_BUDGET_MB holds, a task waits for room).",
            ge=1,
            le=256,
        ),
    ] = 4
    default_task_timeout_s: Annotated[
        float, setting("Deadline of a task that does not carry its own.", gt=0)
    ] = 1800.0
    sandbox: Annotated[
        Literal["auto", "on", "off"],
        setting(
            "Run every agent process in a bubblewrap sandbox (its task's directory, no "
            "network but the model API and PODIUM_SANDBOX_ALLOW_HOSTS): auto = where it "
            "works here (else off, said at start and in /readyz); on = refuse to start "
            "without it; off = never (agents then run no shell commands unless allowed)."
        ),
    ] = "auto"
    sandbox_permission_mode: Annotated[
        PermissionMode,
        setting(
            "--permission-mode of a sandboxed agent: shell commands (tests, builds) are "
            "allowed inside its sandbox."
        ),
    ] = "bypassPermissions"
    sandbox_allow_hosts: Annotated[
        list[str],
        setting(
            "Hosts a sandboxed agent may reach over HTTPS through the worker's egress proxy, "
            "besides the model API (host, host:port or *.domain; port 443 unless named)."
        ),
    ] = []
    sandbox_bwrap: Annotated[
        str,
        setting("bubblewrap's bwrap (empty = on PATH, else .tools/bubblewrap from make setup)."),
    ] = ""
    sandbox_socat: Annotated[
        str, setting("socat (empty = on PATH, else .tools/socat from make setup).")
    ] = ""
    task_progress_after_s: Annotated[
        float,
        setting(
            "How long a turn runs before the worker reports it started (the API shows the "
            "task running); a turn that ends sooner reports only its result.",
            ge=0,
        ),
    ] = 1.0
    task_inputs_max_bytes: Annotated[
        int,
        setting(
            "Most bytes of the conversation's files (email attachments, MMS media) placed "
            "under inputs/ for one task; the agent is told of any left out.",
            ge=0,
        ),
    ] = 100 * 1024 * 1024
    artifact_max_bytes: Annotated[
        int,
        setting(
            "Largest file under a task's outputs/ kept as an artifact; larger ones are "
            "reported to the conductor as left out.",
            ge=1,
        ),
    ] = 25 * 1024 * 1024
    artifacts_max_count: Annotated[
        int, setting("Most files under a task's outputs/ kept as artifacts.", ge=0)
    ] = 20
    git_author: Annotated[
        str, setting("Author and committer of the commits Podium makes for repository tasks.")
    ] = "Podium <podium@localhost>"
    repository_worktree_ttl_s: Annotated[
        float,
        setting(
            "How long a finished repository task keeps its worktree for fix rounds (failed and "
            "cancelled ones lose it at once).",
            gt=0,
        ),
    ] = 7 * 24 * 3600.0
