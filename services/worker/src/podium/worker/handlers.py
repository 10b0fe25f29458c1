"""A worker's turn on a task: run the agent in the task's directory, report the result.

A new task gets its own working directory and a new agent session; a
follow-up (TELL_WORKER) resumes that session in that directory. The task's
record in the ``tasks`` bucket remembers the session, the directory and the
last result, so a redelivered message republishes the same result (same id,
de-duplicated) instead of running the agent again.

A kill (``control.tasks.<id>.kill``) cancels the agent call, which kills its
process group; the task ends CANCELLED. The conductor also stores each kill
(``tasks.<id>.cancel``): the worker that takes it records the cancel in the
task's record (the workers own the ``tasks`` bucket), so a task that has not
started yet is never run, and tells a running one on core NATS again. A
deadline ends it FAILED. A shutdown cancels it too, but then the message is
nak'ed so another worker runs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from podium.agents import AgentAnswer, AgentCall
from podium.agents.sessions import Agents
from podium.common.bus import publish
from podium.common.consumer import Delivery
from podium.common.errors import Reject, Retry
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.contracts import subjects
from podium.contracts.events import (
    AnyEvent,
    KillTask,
    TaskFollowup,
    TaskProgress,
    TaskRequested,
    TaskResult,
    TaskStatus,
    decode,
    encode,
    event_type,
    utcnow,
)
from podium.contracts.ids import stable_id
from podium.contracts.state import FINISHED, STATE_AFTER, TaskRecord
from podium.worker.config import WorkerSettings
from podium.worker.files import collect_artifacts, stage_inputs
from podium.worker.metrics import WorkerMetrics
from podium.worker.prompts import ROLE, followup_prompt, task_prompt
from podium.worker.report import parse_report
from podium.worker.repos import Delivered, GitError, Repositories

log = logging.getLogger(__name__)

#: How many kills of tasks not running here are remembered (see ``Worker.early_kills``).
EARLY_KILLS = 1000


class Worker:
    """Handles TASKS events and kill requests."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        nc: Client,
        js: JetStreamContext,
        agents: Agents,
        tasks: Store[TaskRecord],
        metrics: Metrics,
        own_metrics: WorkerMetrics,
        role_prompt: str = ROLE,
        attachments: ObjectStore | None = None,
        artifacts: ObjectStore | None = None,
        repositories: Repositories | None = None,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.settings = settings
        self.attachments = attachments
        self.artifacts = artifacts
        self.repositories = repositories
        self.http = http
        self.nc = nc
        self.js = js
        self.agents = agents
        self.tasks = tasks
        self.metrics = metrics
        self.own = own_metrics
        self.role_prompt = role_prompt
        # Agent calls running here, by task id, and why one was killed.
        self.running: dict[str, asyncio.Task[AgentAnswer]] = {}
        self.killed: dict[str, str] = {}
        #: Kills heard for tasks not running here (yet): a task about to start (its
        #: record read before the cancel was recorded) is stopped as soon as it runs.
        self.early_kills: dict[str, str] = {}

    async def handle(self, event: AnyEvent, delivery: Delivery) -> None:
        """Entry point for the TASKS consumer."""
        match event:
            case TaskRequested() | TaskFollowup():
                await self.turn(event, delivery.release)
            case KillTask():
                await self.cancel(event)
            case _:
                raise Reject(f"the worker does not handle {event_type(event)} events")

    async def on_dead_letter(self, event: AnyEvent, reason: str) -> None:
        """A task turn no attempt could run (it is being dead-lettered): report it FAILED.

        The conductor hears of it like any other result, so the requester (or the
        operator) is told and the task stops counting as open. The result's id is
        the one a real result of this turn would have had: if one was published,
        this one is dropped as its duplicate.
        """
        if not isinstance(event, TaskRequested | TaskFollowup):
            return
        summary = "the task could not be run and was given up"
        result = TaskResult(
            event_id=stable_id("result", event.event_id),
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            task_id=event.task_id,
            status="FAILED",
            summary=summary,
            details=f"Every attempt failed; the last error: {reason[:1500]}",
            answers=event.event_id,
        )

        def failed(current: TaskRecord | None) -> TaskRecord | None:
            if current is None or current.state in ("complete", "failed", "cancelled"):
                return None
            current.state = "failed"
            current.last_event_id = event.event_id
            current.last_result = result
            current.updated_at = utcnow()
            return current

        await self.tasks.mutate(event.task_id, failed)
        kind = "task" if isinstance(event, TaskRequested) else "followup"
        self.own.tasks.labels(kind, "FAILED").inc()
        await publish(self.js, subjects.result(event.conversation_id, event.task_id), result)
        self.metrics.events_out.labels(event_type(result)).inc()
        log.error("task given up; reported FAILED", extra={"task_id": event.task_id})

    async def cancel(self, kill: KillTask) -> None:
        """A stored kill: record it in the task's state, then stop the task wherever it runs.

        Recorded first, so a worker that takes the task later ends it CANCELLED without
        running it; then said again on core NATS, for a run that started after the
        conductor's own kill went out.
        """

        def cancelled(current: TaskRecord | None) -> TaskRecord | None:
            if current is not None and (current.cancel_requested or current.state in FINISHED):
                return None
            record = current or TaskRecord(
                task_id=kill.task_id,
                conversation_id=kill.conversation_id,
                correlation_id=kill.correlation_id,
            )
            record.cancel_requested = True
            record.updated_at = utcnow()
            return record

        await self.tasks.mutate(kill.task_id, cancelled)
        await self.nc.publish(subjects.kill(kill.task_id), encode(kill))
        log.info("cancel recorded", extra={"task_id": kill.task_id})

    async def on_kill(self, msg: Msg) -> None:
        """A kill request (core NATS): stop the task's agent if it runs here."""
        try:
            event = decode(msg.data)
        except Exception:  # noqa: BLE001 - a bad control message is logged, never fatal
            log.warning("undecodable kill request", extra={"subject": msg.subject})
            return
        if not isinstance(event, KillTask):
            return
        self.kill(event.task_id, event.reason or "killed")

    def kill(self, task_id: str, reason: str) -> bool:
        """Cancel the agent call of ``task_id`` if it runs here; True if it did."""
        call = self.running.get(task_id)
        if call is None or call.done():
            self.early_kills[task_id] = reason
            while len(self.early_kills) > EARLY_KILLS:
                self.early_kills.pop(next(iter(self.early_kills)))
            return False
        if task_id in self.killed:
            # Being stopped already (the conductor's kill, then the stored cancel's): a
            # second cancel would cut short the clean-up that kills its process group.
            return True
        self.killed[task_id] = reason
        call.cancel()
        self.own.kills.labels("kill").inc()
        log.info("task killed", extra={"task_id": task_id, "reason": reason})
        return True

    async def turn(
        self, event: TaskRequested | TaskFollowup, agent_done: Callable[[], None] = lambda: None
    ) -> None:
        """Run one turn of a task and publish its result.

        ``agent_done`` is called once the agent has answered: what is left (storing the
        result and the session) no longer holds one of the worker's slots.
        """
        task_id = event.task_id
        found = await self.tasks.get(task_id)
        record = found[0] if found else None
        if record and record.last_event_id == event.event_id and record.last_result:
            log.info("turn already done; publishing its result again")
            await self._publish(record.last_result)
            return
        if record and record.cancel_requested:
            await self._finish(
                event,
                record,
                status="CANCELLED",
                summary="cancelled before it ran",
                details="",
                answer=None,
                known=found,
            )
            return
        workdir = self.agents.workdir(task_id)
        if isinstance(event, TaskFollowup):
            record = await self._resumable(event, record, workdir)
            session_id: str | None = record.session_id
            prompt = followup_prompt(event.message)
        else:
            session_id = None
            record = TaskRecord(
                task_id=task_id,
                conversation_id=event.conversation_id,
                correlation_id=event.correlation_id,
                workdir=str(workdir),
                instructions=event.instructions,
                repository=event.repository,
            )
            if event.repository and not await self._checkout(event, record, workdir, found):
                return
            prompt = await self._first_prompt(event, workdir)
        record.state = "running"
        call = AgentCall(
            role="worker",
            key=task_id,
            prompt=prompt,
            workdir=workdir,
            session_id=session_id,
            system_prompt=self.role_prompt,
            timeout_s=event.timeout_s or self.settings.default_task_timeout_s,
            carry_workdir=not record.repository,
            readable=(
                (self.repositories.mirror(record.repository),)
                if record.repository and self.repositories is not None
                else ()
            ),
        )
        kind = "task" if isinstance(event, TaskRequested) else "followup"
        log.info("task started", extra={"task_id": task_id, "kind": kind, "workdir": str(workdir)})
        answer, revision = await self._run_saving(event, kind, call, record, found)
        if not record.repository:
            # What is left (storing the result and the session) no longer holds a slot. A
            # repository task's delivery (push, pull request, its check) still does.
            agent_done()
        if answer is not None and answer.outcome == "busy":
            # Its session is held by another worker, or this one's agents' memory budget
            # had no room in time: given back, for this worker later or another.
            raise Retry(f"task {task_id} cannot run now: {answer.error}", delay_s=5.0)
        if answer is not None and answer.outcome == "cannot_start":
            # This worker's CLI is broken (it reports not ready, and fetches nothing for a
            # few seconds): give the task back so a healthy worker runs it. If none does,
            # its last delivery ends it FAILED (on_dead_letter), and the requester hears.
            raise Retry(answer.error, delay_s=2.0)
        if answer is None:
            reason = self.killed.pop(task_id, "killed")
            self.own.tasks.labels(kind, "CANCELLED").inc()
            await self._finish(
                event,
                record,
                status="CANCELLED",
                summary=f"task cancelled: {reason}",
                details="",
                answer=None,
                known=(record, revision),
            )
            return
        log.debug("agent answer", extra={"task_id": task_id, "answer": answer.text[:4000]})
        if answer.ok:
            report = parse_report(answer.text)
            status, summary, details = report.status, report.summary, report.details
            structured = report.structured
        else:
            status = "FAILED"
            summary = _failure_summary(answer)
            details, structured = answer.error, True
        self.own.tasks.labels(kind, status).inc()
        await self._finish(
            event,
            record,
            status=status,
            summary=summary,
            details=details,
            answer=answer,
            structured=structured,
            known=(record, revision),
        )

    async def _run_saving(
        self,
        event: TaskRequested | TaskFollowup,
        kind: str,
        call: AgentCall,
        record: TaskRecord,
        found: tuple[TaskRecord, int] | None,
    ) -> tuple[AgentAnswer | None, int]:
        """Run the agent while the task's record is saved; the answer and the revision.

        The record is saved as read (revision 0 when there was none: no read first), and
        nothing in the turn waits for it. If it cannot be saved, the agent is stopped
        before the message goes back: a redelivery must not find this run still going.
        """
        started = asyncio.create_task(self._started(event, kind))
        agent = asyncio.create_task(self._run_agent(event.task_id, call, record.instructions))
        try:
            try:
                revision = await self._save(record, found or (record, 0))
            except BaseException:
                agent.cancel()
                await asyncio.wait({agent})
                raise
            return await agent, revision
        finally:
            # A turn over before the report was due needs none: its result says it all. A
            # report already on its way is stored before the result (one connection).
            started.cancel()

    async def _resumable(
        self, event: TaskFollowup, record: TaskRecord | None, workdir: Path
    ) -> TaskRecord:
        """The record of a task a follow-up continues; its worktree, for a repository task."""
        if record is None or not record.session_id:
            raise Reject(f"follow-up for task {event.task_id}, which has no session to resume")
        if record.repository and self.repositories is not None:
            # A fix round continues on the branch: its worktree is made again from what
            # was pushed if this replica does not have it.
            await self._worktree(record.repository, event.task_id, workdir)
        return record

    async def _started(self, event: TaskRequested | TaskFollowup, kind: str) -> None:
        """Tell the conductor the turn started (the API shows the task running), once it
        has run for ``PODIUM_TASK_PROGRESS_AFTER_S``.

        Not at once: most of what a conversation costs the bus is per message, and a turn
        of a second or less is shown by its result as soon as by a report.
        """
        await asyncio.sleep(self.settings.task_progress_after_s)
        progress = TaskProgress(
            event_id=stable_id("started", event.event_id),
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            task_id=event.task_id,
            note=f"{kind} started",
            answers=event.event_id,
        )
        try:
            await publish(self.js, subjects.result(event.conversation_id, event.task_id), progress)
        except Exception as err:  # noqa: BLE001 - only a progress note: the result still goes
            log.warning("could not report the task started", extra={"error": repr(err)})

    async def _checkout(
        self,
        event: TaskRequested,
        record: TaskRecord,
        workdir: Path,
        found: tuple[TaskRecord, int] | None,
    ) -> bool:
        """Give a repository task its worktree on its own branch; False (and the task
        ended FAILED, saying why) if it cannot have one."""
        name = event.repository
        if self.repositories is None or self.repositories.get(name) is None:
            summary = f"unknown repository {name!r}: it is not in this worker's repositories file"
            await self._finish(
                event, record, status="FAILED", summary=summary, details="", answer=None,
                known=found,
            )  # fmt: skip
            return False
        await self.repositories.prune(name, self.settings.repository_worktree_ttl_s)
        record.branch = await self._worktree(name, event.task_id, workdir)
        return True

    async def _worktree(self, name: str, task_id: str, workdir: Path) -> str:
        """The task's worktree (made or kept); a fetch that fails is tried again later."""
        assert self.repositories is not None  # noqa: S101 - checked by the callers
        try:
            branch = await self.repositories.worktree(name, task_id, workdir)
        except GitError as err:
            # Fetching may fail for a while (the host is down): another attempt, then FAILED.
            raise Retry(f"repository {name}: {err}", delay_s=10.0) from err
        log.info("worktree ready", extra={"task_id": task_id, "branch": branch})
        return branch

    async def _first_prompt(self, event: TaskRequested, workdir: Path) -> str:
        """A new task's prompt, once its input files are in place under ``inputs/``."""
        staged = await stage_inputs(
            self.attachments, event.inputs, workdir, self.settings.task_inputs_max_bytes
        )
        if staged.left_out:
            log.warning(
                "input files left out", extra={"task_id": event.task_id, "files": staged.left_out}
            )
        files = staged.prompt_lines()
        return task_prompt(event.instructions, event.original_request, files)

    async def _run_agent(
        self, task_id: str, call: AgentCall, instructions: str
    ) -> AgentAnswer | None:
        """The agent's answer, or None if the task was killed meanwhile."""
        answer = await self._run_call(task_id, call)
        if answer is not None and answer.outcome == "session_lost":
            # Nowhere to resume from: start the task again, told what it is and what
            # the conductor just said (the session keeper logged and counted the loss).
            log.warning("task session lost; restarting it with a summary")
            restart = task_prompt(instructions, "") + "\n" + call.prompt
            answer = await self._run_call(task_id, replace(call, prompt=restart, session_id=None))
        return answer

    async def _run_call(self, task_id: str, call: AgentCall) -> AgentAnswer | None:
        inner = asyncio.create_task(self.agents.run(call), name=f"agent:{task_id}")
        self.running[task_id] = inner
        early = self.early_kills.pop(task_id, None)
        if early is not None:
            # Killed while it was starting: the kill found nothing running then.
            self.kill(task_id, early)
        self.own.busy.inc()
        try:
            answer = await inner
        except asyncio.CancelledError:
            if task_id in self.killed and not _current_task_cancelling():
                return None
            raise
        finally:
            self.own.busy.dec()
            self.running.pop(task_id, None)
        return answer

    async def _finish(
        self,
        event: TaskRequested | TaskFollowup,
        record: TaskRecord,
        *,
        status: TaskStatus,
        summary: str,
        details: str,
        answer: AgentAnswer | None,
        structured: bool = True,
        known: tuple[TaskRecord, int] | None = None,
    ) -> None:
        facts: list[str] = []
        if record.repository and self.repositories is not None:
            if status == "COMPLETE" and answer is not None:
                delivery = await self._deliver(event, record, summary)
                facts = delivery.facts
                if delivery.details:
                    details = f"{details}\n\n{delivery.details}".strip()
            elif status in ("FAILED", "CANCELLED"):
                await self.repositories.remove(record.repository, Path(record.workdir))
        # After every turn the agent ran, whatever it left under outputs/ is stored by the
        # platform (the agent holds no credentials for the store) and named in the result.
        collected = None
        if answer is not None:
            collected = await collect_artifacts(
                self.artifacts,
                event.task_id,
                self.agents.workdir(event.task_id),
                max_count=self.settings.artifacts_max_count,
                max_bytes=self.settings.artifact_max_bytes,
            )
        result = TaskResult(
            event_id=stable_id("result", event.event_id),
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            task_id=event.task_id,
            status=status,
            summary=summary,
            details=details,
            structured=structured,
            session_id=answer.session_id if answer else record.session_id,
            cost_usd=answer.cost_usd if answer else 0.0,
            duration_ms=answer.duration_ms if answer else 0,
            answers=event.event_id,
            artifacts=collected.artifacts if collected else [],
            left_out=collected.left_out if collected else [],
            facts=facts,
        )
        record.state = STATE_AFTER[status]
        if answer is not None and answer.session_id:
            record.session_id = answer.session_id
        record.last_event_id = event.event_id
        record.last_result = result
        await self._save(record, known)
        await self._publish(result)

    async def _deliver(
        self, event: TaskRequested | TaskFollowup, record: TaskRecord, summary: str
    ) -> Delivered:
        """Commit, check, push, pull request: the platform's part of a finished repository
        task. A failing step is reported as a fact, for the conductor to judge."""
        assert self.repositories is not None  # noqa: S101 - checked by the caller
        http = self.http or aiohttp.ClientSession()
        try:
            delivery = await self.repositories.deliver(
                record.repository,
                event.task_id,
                Path(record.workdir),
                title=record.instructions.split("\n", 1)[0][:120] or summary,
                summary=summary,
                pull_request=record.pull_request,
                http=http,
            )
        except Exception as err:
            # The agent's work is done and reported; what the platform could not do is said
            # (the conductor sees it), rather than redelivering the turn to run it again.
            log.exception("repository delivery failed", extra={"task_id": event.task_id})
            what = str(err) if isinstance(err, GitError) else f"{type(err).__name__}: {err}"
            delivery = Delivered(
                facts=[
                    f"Branch: {record.branch}",
                    f"Delivery: failed: {' '.join(what.split())[:300]}",
                ]
            )
        finally:
            if http is not self.http:
                await http.close()
        record.pull_request = delivery.pull_request or record.pull_request
        record.pull_request_url = next(
            (f.split(": ", 1)[1] for f in delivery.facts if f.startswith("Pull request: http")),
            record.pull_request_url,
        )
        log.info(
            "repository task delivered", extra={"task_id": event.task_id, "facts": delivery.facts}
        )
        return delivery

    async def _save(self, record: TaskRecord, known: tuple[TaskRecord, int] | None) -> int:
        """Store ``record``; the revision it is at. ``known``: the record as last read or
        written here, with its revision (no read first; a lost race reads it)."""
        record.updated_at = utcnow()

        def change(current: TaskRecord | None) -> TaskRecord:
            # The conductor may have asked for a cancel meanwhile: keep that.
            if current is not None and current.cancel_requested:
                record.cancel_requested = True
            return record

        stored = await self.tasks.mutate_at(record.task_id, change, known=known)
        return stored[1] if stored else 0

    async def _publish(self, result: TaskResult) -> None:
        await publish(self.js, subjects.result(result.conversation_id, result.task_id), result)
        # Acknowledge only once the session is stored as well (see Agents.settled).
        await self.agents.settled(result.task_id)
        self.metrics.events_out.labels(event_type(result)).inc()
        log.info(
            "task result published",
            extra={"task_id": result.task_id, "status": result.status},
        )


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _failure_summary(answer: AgentAnswer) -> str:
    return {
        "timeout": "the task ran past its deadline and was stopped",
        "max_turns": "the agent hit its turn limit",
        "max_budget": "the agent hit its budget limit",
        "execution_error": "the agent reported an error",
        "crashed": "the agent process failed",
        "session_lost": "the task's agent session could not be resumed",
        "cannot_start": "the agent could not be started on this worker",
    }.get(answer.outcome, f"the agent failed ({answer.outcome})")
