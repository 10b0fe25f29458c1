"""A deterministic built-in agent, for running Podium without Claude credentials.

It plays both roles well enough to exercise the whole loop, and nothing more:

- conductor: a new email/SMS/API message → ``SPAWN_WORKER`` with its text; a
  worker's COMPLETE with details → accept and answer the requester
  (``SEND_EMAIL`` for email, ``SEND_SMS`` for SMS, ``REPLY`` for the API);
  COMPLETE without details → ``TELL_WORKER`` once to ask for them; NEEDS_INPUT
  → ``TELL_WORKER`` with a default answer; FAILED → an apology to the requester.
- worker: writes ``result.md`` in its working directory (the request, a word
  count and a digest, plus one section per follow-up) and ends with the
  ``Status:`` / ``Summary:`` / ``Details:`` report.

Sessions are real enough to resume: each keeps its prompts in a JSON-lines
transcript (one line a turn, like the Claude CLI's), and a turn's answer depends on
the session's history (the follow-up count).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from podium.agents import AgentAnswer, AgentCall
from podium.agents.memory import MemoryUse
from podium.agents.protocol import Block, parse_blocks
from podium.common.runtime import Spawn, detached
from podium.contracts.ids import reply_subject


class OfflineRuntime:
    """The ``offline`` agent runtime."""

    kind = "offline"

    def __init__(self, sessions_dir: Path, *, delay_s: float = 0.0) -> None:
        #: Unused: the offline agent has no loops of its own.
        self.spawn: Spawn = detached
        #: Unused too: no processes to measure or evict.
        self.on_memory: Callable[[MemoryUse], None] = lambda use: None
        self.on_evict: Callable[[str], None] = lambda reason: None
        self.sessions_dir = sessions_dir
        self.delay_s = delay_s

    async def check(self) -> str:
        """Nothing to check: the offline agent runs in this process."""
        return "the built-in offline agent"

    def problem(self) -> str:
        """Never a problem."""
        return ""

    async def run(self, call: AgentCall) -> AgentAnswer:
        """Answer one turn deterministically from the prompt and the session's history."""
        started = time.monotonic()
        session_id = call.session_id or str(uuid.uuid4())
        history = self._load(session_id)
        if call.session_id and history is None:
            return AgentAnswer(
                text="",
                session_id=session_id,
                outcome="session_lost",
                error=f"No conversation found with session ID: {session_id}",
            )
        prompts = history or []
        if self.delay_s:
            try:
                async with asyncio.timeout(call.timeout_s):
                    await asyncio.sleep(self.delay_s)
            except TimeoutError:
                return AgentAnswer(
                    text="",
                    session_id=session_id,
                    outcome="timeout",
                    error=f"no answer within {call.timeout_s}s",
                )
        if call.role == "conductor":
            text = conduct(call.prompt)
        else:
            text = work(call.prompt, call.workdir, turn=len(prompts))
        self._save(session_id, [*prompts, call.prompt])
        return AgentAnswer(
            text=text,
            session_id=session_id,
            num_turns=1,
            duration_ms=int((time.monotonic() - started) * 1000),
        )

    def transcript_path(self, call: AgentCall, session_id: str) -> Path:
        """The session's JSON-lines transcript."""
        return self._path(session_id)

    async def settle(self, call: AgentCall, session_id: str) -> None:
        """Sessions are written before the answer returns."""

    async def forget(self, key: str) -> None:
        """Nothing is held between turns."""

    def keep_spares(self, template: AgentCall) -> None:
        """No processes to start ahead."""

    def live(self) -> int:
        """No processes."""
        return 0

    async def close(self) -> None:
        """Nothing to stop."""

    def _path(self, session_id: str) -> Path:
        return self.sessions_dir / f"{session_id}.jsonl"

    def _load(self, session_id: str) -> list[str] | None:
        try:
            lines = self._path(session_id).read_bytes().splitlines()
        except FileNotFoundError:
            return None
        return [str(json.loads(line)["prompt"]) for line in lines if line.strip()]

    def _save(self, session_id: str, prompts: list[str]) -> None:
        """Append the turn's prompt: a transcript that grows by one line a turn, as the
        Claude CLI's does (rewriting the whole history each turn grew with its age)."""
        line = json.dumps({"session_id": session_id, "prompt": prompts[-1]}) + "\n"
        path = self._path(session_id)
        try:
            file = path.open("a", encoding="utf-8")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = path.open("a", encoding="utf-8")
        with file:
            file.write(line)


def conduct(prompt: str) -> str:
    """The offline conductor's answer to one turn."""
    # A [SYSTEM] block (refusals, open tasks) may come first: it is context, not input.
    blocks = [b for b in parse_blocks(prompt) if b.kind != "SYSTEM"]
    if not blocks:
        return "NO_ACTION: nothing I recognise in this turn"
    block = blocks[0]
    if block.kind in ("EMAIL", "SMS", "API"):
        if not block.body.strip():
            return "NO_ACTION: the message is empty"
        return f"SPAWN_WORKER: {block.body.strip()}"
    if block.kind == "WORKER":
        request = blocks[1] if len(blocks) > 1 else None
        return _judge(block, request)
    if block.kind == "OPERATOR":
        # An operator's answer to an escalation: passed on to the requester.
        request = blocks[1] if len(blocks) > 1 else None
        return _answer(request, block.body.strip() or "An operator looked at your request.")
    return "NO_ACTION: unexpected input"


def _judge(report: Block, request: Block | None) -> str:
    status = report.fields.get("Status", "").upper()
    summary = report.fields.get("Summary", "")
    if status == "NEEDS_INPUT":
        return f"TELL_WORKER: {report.task_id} | Use your best judgement and carry on."
    if status == "CANCELLED":
        return f"NO_ACTION: task {report.task_id} was cancelled"
    if status == "COMPLETE" and not report.body.strip():
        return f"TELL_WORKER: {report.task_id} | Please include the full result under Details."
    # What the platform checked (a repository task's branch, check and pull request).
    evidence = "".join(
        f"{name}: {report.fields[name]}\n"
        for name in ("Branch", "Diff", "Check", "Pull request")
        if name in report.fields
    )
    if status == "COMPLETE":
        answer = f"{summary}\n\n{evidence}{report.body.strip()}"
    else:
        answer = f"Sorry, I could not complete your request: {summary}"
    # Every file the worker made goes back with the answer ("Artifact: <ref> (…)").
    attach = [
        f"ATTACH: {line.split(' (', 1)[0].strip()}"
        for line in report.repeated.get("Artifact", [])
        if status == "COMPLETE"
    ]
    return "\n".join([_answer(request, answer), *attach])


def _answer(request: Block | None, text: str) -> str:
    if request is not None and request.kind == "EMAIL" and request.fields.get("From"):
        subject = reply_subject(request.fields.get("Subject", "") or "your request")
        return f"SEND_EMAIL: {request.fields['From']} | {subject} | {text}"
    if request is not None and request.kind == "SMS" and request.fields.get("From"):
        return f"SEND_SMS: {request.fields['From']} | {text}"
    return f"REPLY: {text}"


def work(prompt: str, workdir: Path, *, turn: int) -> str:
    """The offline worker's answer: write result.md, then report."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / "result.md"
    request = _task_text(prompt)
    if turn == 0 or not result.exists():
        digest = hashlib.sha256(request.encode()).hexdigest()[:12]
        content = (
            "# Result\n\n"
            f"Request: {request}\n\n"
            f"Words in the request: {len(request.split())}\n"
            f"Digest: {digest}\n"
        )
    else:
        content = result.read_text() + f"\n## Revision {turn}\n\n{request}\n"
    result.write_text(content)
    inputs = _describe_inputs(workdir)
    if inputs:
        # A real deliverable from real inputs: one row per file it was given.
        outputs = workdir / "outputs"
        outputs.mkdir(exist_ok=True)
        (outputs / "inputs.csv").write_text(inputs)
        content += "\nWrote outputs/inputs.csv: name, bytes and sha256 of each input file.\n"
    summary = f"Wrote result.md for: {_shorten(request, 80)}"
    if turn:
        summary = f"Revised result.md (revision {turn})"
    return (
        f"I wrote {result.name} in my workspace.\n\n"
        f"Status: COMPLETE\nSummary: {summary}\nDetails:\n{content}"
    )


def _describe_inputs(workdir: Path) -> str:
    """A CSV of the files under ``inputs/`` ("" when there are none)."""
    directory = workdir / "inputs"
    if not directory.is_dir():
        return ""
    rows = [
        f"{p.name},{p.stat().st_size},{hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.is_symlink()
    ]
    return "name,bytes,sha256\n" + "".join(f"{row}\n" for row in rows) if rows else ""


def _task_text(prompt: str) -> str:
    # The worker prompt puts the task between TASK markers; a follow-up is plain text.
    start, end = prompt.find("<task>"), prompt.find("</task>")
    if start != -1 and end > start:
        return prompt[start + len("<task>") : end].strip()
    return prompt.strip()


def _shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
