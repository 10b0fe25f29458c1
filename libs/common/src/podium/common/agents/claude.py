"""The Claude Code CLI as an agent runtime (``claude -p``, one process per turn).

Facts this relies on (checked against the real CLI, see ``docs/agents.md``):

- ``--output-format json`` prints one object with ``subtype``, ``is_error``,
  ``result``, ``session_id``, ``num_turns``, ``duration_ms``,
  ``total_cost_usd``; both ``subtype`` and ``is_error`` must be checked.
- A session is found only from the same working directory and config
  directory, so each session gets its own ``CLAUDE_CONFIG_DIR`` (parallel
  sessions never share ``~/.claude.json``) and always runs in its pinned
  working directory.
- A resumed run may report a new session id: the id of the latest result is
  the one to keep.
- Headless runs can hang: every call runs under a wall-clock watchdog that
  kills the whole process group.
- The prompt goes on stdin, not argv: untrusted text never appears in ``ps``
  and is never parsed as an option.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from podium.common.agents import AgentAnswer, AgentCall, Outcome
from podium.common.config import AgentSettings

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
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "NODE_OPTIONS",
    "NODE_EXTRA_CA_CERTS",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_MODEL",
    "ANTHROPIC_SMALL_FAST_MODEL",
    "API_TIMEOUT_MS",
    "CLAUDE_CODE_MAX_RETRIES",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "AWS_REGION",
    "AWS_PROFILE",
    "CLOUD_ML_REGION",
    "ANTHROPIC_VERTEX_PROJECT_ID",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


class ClaudeRuntime:
    """Runs each turn as ``claude -p`` in the session's pinned working directory."""

    kind = "claude"

    def __init__(self, settings: AgentSettings, config_root: Path) -> None:
        self.settings = settings
        self.config_root = config_root

    def config_dir(self, call: AgentCall) -> Path:
        """The session's private ``CLAUDE_CONFIG_DIR``."""
        return self.config_root / call.role / call.key

    def command(self, call: AgentCall, session_id: str, *, resume: bool) -> list[str]:
        """The CLI's argument list for ``call``."""
        s = self.settings
        cmd = [s.claude_bin, "-p", "--output-format", "json"]
        cmd += ["--resume", session_id] if resume else ["--session-id", session_id]
        cmd += ["--permission-mode", "acceptEdits"]
        if s.claude_model:
            cmd += ["--model", s.claude_model]
        if s.agent_max_turns:
            cmd += ["--max-turns", str(s.agent_max_turns)]
        if call.system_prompt:
            cmd += ["--append-system-prompt", call.system_prompt]
        return cmd

    def environment(self, call: AgentCall) -> dict[str, str]:
        """The CLI's environment: a short allowlist plus its private config dir."""
        env = {k: v for k, v in os.environ.items() if k in _PASS_ENV}
        config = self.config_dir(call)
        env.update(
            HOME=str(config),
            CLAUDE_CONFIG_DIR=str(config),
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_AUTOUPDATER="1",
            DISABLE_TELEMETRY="1",
            DISABLE_ERROR_REPORTING="1",
        )
        return env

    async def run(self, call: AgentCall) -> AgentAnswer:
        """One turn: resume ``call.session_id`` or start a pre-assigned new session."""
        session_id = call.session_id or str(uuid.uuid4())
        return await self._run_once(call, session_id, resume=call.session_id is not None)

    async def _run_once(self, call: AgentCall, session_id: str, *, resume: bool) -> AgentAnswer:
        call.workdir.mkdir(parents=True, exist_ok=True)
        self.config_dir(call).mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self.command(call, session_id, resume=resume),
            cwd=call.workdir,
            env=self.environment(call),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so a kill reaches every tool it started.
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(call.timeout_s):
                stdout, stderr = await proc.communicate(call.prompt.encode())
        except TimeoutError:
            await kill_group(proc)
            return AgentAnswer(
                text="",
                session_id=session_id,
                outcome="timeout",
                error=f"no answer within {call.timeout_s:g}s; process group killed",
                duration_ms=_ms(started),
            )
        except BaseException:
            # Cancelled (a kill, a shutdown) or failed: never leave the agent behind.
            await kill_group(proc)
            raise
        return parse_result(stdout, stderr, proc.returncode, session_id, _ms(started))


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def parse_result(
    stdout: bytes, stderr: bytes, returncode: int | None, session_id: str, duration_ms: int
) -> AgentAnswer:
    """Map the CLI's output to an answer; never raises."""
    text = stdout.decode("utf-8", "replace").strip()
    data: dict[str, Any] | None = None
    # The JSON result is the last line that parses as an object.
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict) and candidate.get("type") == "result":
                data = candidate
                break
    err_text = stderr.decode("utf-8", "replace").strip()
    if data is None:
        lost = "No conversation found" in err_text or "No conversation found" in text
        return AgentAnswer(
            text="",
            session_id=session_id,
            outcome="session_lost" if lost else "crashed",
            error=_tail(err_text or text or f"exit status {returncode}"),
            duration_ms=duration_ms,
        )
    subtype = str(data.get("subtype", ""))
    outcome = _SUBTYPES.get(subtype, "execution_error")
    if outcome == "ok" and data.get("is_error"):
        outcome = "execution_error"
    result = data.get("result")
    return AgentAnswer(
        text=result if isinstance(result, str) else "",
        session_id=str(data.get("session_id") or session_id),
        outcome=outcome,
        error="" if outcome == "ok" else _tail(str(result or subtype or err_text)),
        cost_usd=float(data.get("total_cost_usd") or 0.0),
        num_turns=int(data.get("num_turns") or 0),
        duration_ms=int(data.get("duration_ms") or duration_ms),
    )


def _tail(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


async def kill_group(proc: asyncio.subprocess.Process, grace_s: float = 2.0) -> None:
    """SIGTERM the process group, then SIGKILL it if anything is left after ``grace_s``."""
    if proc.returncode is not None:
        _killpg(proc.pid, signal.SIGKILL)  # children may outlive their parent
        return
    _killpg(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        pass
    _killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
