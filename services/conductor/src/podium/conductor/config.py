"""Conductor settings, read from the environment at start."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from podium.common.config import AgentSettings, PermissionMode, setting


class ConductorSettings(AgentSettings, frozen=True, kw_only=True):
    """Settings of ``podium-conductor``.

    Its agent settings are read from ``PODIUM_CONDUCTOR_<NAME>``, then the shared
    ``PODIUM_<NAME>``. Those it has its own defaults for, and what it may do (tools,
    permissions, MCP servers), only from its own variables: the conductor decides
    and delegates, it answers with commands, not tool calls, in short turns, and a
    value meant for workers must not change that.
    """

    ROLE: ClassVar[str] = "conductor"
    ROLE_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "claude_tools",
            "claude_allowed_tools",
            "claude_disallowed_tools",
            "claude_permission_mode",
            "claude_mcp_config",
            "agent_max_turns",
            "agent_timeout_s",
        }
    )

    claude_tools: Annotated[
        str,
        setting(
            'The conductor has no tools: only "" is accepted (it answers with commands; '
            "its CLI is started with --tools= whatever this says)."
        ),
    ] = ""
    claude_permission_mode: Annotated[
        PermissionMode, setting("--permission-mode for the conductor.")
    ] = "default"
    agent_max_turns: Annotated[
        int, setting("--max-turns for one conductor call (0 = CLI default).", ge=0)
    ] = 3
    agent_timeout_s: Annotated[float, setting("Wall-clock limit of one conductor turn.", gt=0)] = (
        180.0
    )

    concurrency: Annotated[
        int,
        setting(
            "Conversations whose turns may run at the same time (agent processes beyond "
            "what PODIUM_AGENT_MEMORY_BUDGET_MB holds wait for room).",
            ge=1,
            le=1024,
        ),
    ] = 32
    operator_email: Annotated[
        str, setting("Where escalations go (a human operator); empty = log them only.")
    ] = ""
    outbound_allowlist: Annotated[
        list[str],
        setting(
            "Addresses, @domains and numbers the conductor may write to besides a "
            "conversation's own participants (comma-separated)."
        ),
    ] = []
    command_format: Annotated[
        Literal["text", "structured"],
        setting(
            "How the conductor agent answers: text commands, or structured output "
            "(the CLI's --json-schema) carrying the same commands."
        ),
    ] = "text"
    sender_allowlist: Annotated[
        list[str],
        setting(
            "Who may give the platform work by email or SMS: addresses, @domains, numbers "
            "(comma-separated). Empty = anyone. API clients are authenticated by token."
        ),
    ] = []
    sender_auth: Annotated[
        Literal["require", "prefer", "off"],
        setting(
            "Whether an email From: on the allowlist must be authenticated (SPF or DKIM "
            "aligned with its domain, from the provider's verdicts): require (only a pass), "
            "prefer (a failure is an unknown sender; mail with no verdicts at all counts as "
            "its From:), off (the From: header alone, forgeable)."
        ),
    ] = "require"
    sender_auth_exempt_domains: Annotated[
        list[str],
        setting(
            "Sender domains whose mail cannot be signed (an internal relay): their From: is "
            "taken as it is, whatever PODIUM_SENDER_AUTH says (comma-separated)."
        ),
    ] = []
    unknown_senders: Annotated[
        Literal["ignore", "refuse"],
        setting(
            "What a sender outside the allowlist gets: nothing (ignore), or one polite "
            "refusal per conversation (refuse)."
        ),
    ] = "ignore"
    max_outbound_per_hour: Annotated[
        int, setting("Messages one conversation may send per hour (operator mail excluded).", ge=1)
    ] = 20
    max_spend_usd: Annotated[
        float,
        setting(
            "Agent spend one conversation may reach; beyond it, no new work, escalation.", gt=0
        ),
    ] = 10.0
    max_failed_tasks: Annotated[
        int, setting("Failed tasks in one conversation before it is escalated.", ge=1)
    ] = 3
    max_workers_per_conversation: Annotated[
        int, setting("Tasks of one conversation that may be open at once.", ge=1)
    ] = 3
    max_validation_rounds: Annotated[
        int, setting("Times a worker may be sent back to fix its result before escalation.", ge=0)
    ] = 3
    partition_lease_ttl_s: Annotated[
        float,
        setting(
            "A dead replica's partitions are taken over this long after its last renewal.",
            ge=2,
        ),
    ] = 15.0
    turn_retry_delay_s: Annotated[
        float,
        setting(
            "Delay before a failed conductor turn (its agent failed) is tried again; it grows "
            "with each attempt, up to 60 s. The last attempt escalates to the operator.",
            gt=0,
        ),
    ] = 5.0
    rotate_turns: Annotated[
        int,
        setting(
            "Turns after which a conversation's agent session is rotated: the next turn "
            "starts a new session, seeded with a summary the platform writes from the "
            "conversation record (0 = never by turns).",
            ge=0,
        ),
    ] = 20
    rotate_input_tokens: Annotated[
        int,
        setting(
            "Input tokens of a turn (as the CLI reports them, cache reads included) past "
            "which the session is rotated before the next turn (0 = never by size).",
            ge=0,
        ),
    ] = 60000
    task_timeout_s: Annotated[
        float, setting("Deadline of a worker task; past it the worker kills it (FAILED).", gt=0)
    ] = 1800.0

    def __post_init__(self) -> None:
        # Untrusted mail reaches the conductor's prompt: it must not be able to act but by
        # the commands the platform checks. A setting that would give it tools is refused
        # at start rather than ignored (the runtime starts its CLI with none either way).
        given = [
            name
            for name, value in (
                ("PODIUM_CONDUCTOR_CLAUDE_TOOLS", self.claude_tools),
                ("PODIUM_CONDUCTOR_CLAUDE_ALLOWED_TOOLS", self.claude_allowed_tools),
                ("PODIUM_CONDUCTOR_CLAUDE_MCP_CONFIG", self.claude_mcp_config),
            )
            if value
        ]
        if given:
            raise ValueError(
                f"the conductor takes no tools: {', '.join(given)} must be empty "
                "(tools are for workers: PODIUM_WORKER_...)"
            )
