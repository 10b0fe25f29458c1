"""Agent sessions across replicas: one owner at a time, and history that travels.

``Agents`` wraps a runtime for a service. For every turn it:

1. takes the session's **lease** in the ``sessions`` bucket (compare-and-set on
   ``<role>.<key>``; it lapses ``PODIUM_AGENT_LEASE_TTL_S`` after its holder
   stops renewing), waiting up to ``PODIUM_AGENT_LEASE_WAIT_S`` for another
   replica to free it — so two replicas never run the same session at once;
2. if another replica ran the session's last turn (the record's
   ``generation`` is not the one this replica last saw), drops its own warm
   process and **restores** the transcript (and, for a worker, the workspace)
   from the ``transcripts`` object store into this replica's config dir, under
   the same working-directory path;
3. runs the turn, then stores the transcript (and workspace) and bumps the
   generation, so the next turn may run anywhere;
4. records metrics: turns by outcome, latency cold vs warm, cost, tokens,
   sessions restored or lost.

A session that cannot be restored comes back as ``session_lost``; the caller
starts a new one with a summary of what came before.

``exclusive=True`` (the conductor) skips the lease: the caller guarantees that one
replica at a time runs a key's turns — the conductor consumes a conversation only
while it holds its partition's lease, and gives a partition up only after its turns
(and their stored sessions) are done. The record is then read once, kept with its
revision, and written with one compare-and-set per turn; ``forget_seen`` (called
when a partition is taken) makes the next turn read it again. Three round trips a
turn instead of seven (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from msgspec.structs import replace as evolve
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from podium.agents import AgentAnswer, AgentCall, AgentRuntime, Role
from podium.agents.memory import MB, STATES, MemoryUse
from podium.common.backoff import backoff
from podium.common.config import AgentSettings
from podium.common.errors import AgentUnavailable, Conflict
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.common.runtime import Spawn, detached
from podium.contracts import streams
from podium.contracts.state import SessionRecord

log = logging.getLogger(__name__)

#: While the agent cannot start, how often it is checked again.
RECHECK_S = 5.0
#: After a turn found the agent unable to start, how long this replica takes no new
#: work (``Agents.backing_off``), so that healthy replicas get it first.
HOLD_S = 5.0


def replica_id() -> str:
    """A name for this process that is unique among replicas (pod name, pid, nonce)."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LeaseLost(Exception):
    """Another replica took the session while this one held it (it stopped renewing)."""


class LeaseBusy(Exception):
    """Another replica held the session for all of ``PODIUM_AGENT_LEASE_WAIT_S``.

    Its own type, not ``TimeoutError``: a bus request that times out (nats-py's
    TimeoutError is one) is a bus fault, not contention, and must not be counted or
    reported as such.
    """


class Agents:
    """A runtime, made safe and portable across replicas, with metrics."""

    def __init__(
        self,
        runtime: AgentRuntime,
        *,
        role: Role,
        settings: AgentSettings,
        metrics: Metrics,
        js: JetStreamContext | None = None,
        replica: str | None = None,
        exclusive: bool = False,
    ) -> None:
        self.runtime = runtime
        self.exclusive = exclusive
        self.role = role
        self.settings = settings
        self.metrics = metrics
        self.js = js
        self.replica = replica or replica_id()
        # Resolved once: resolving walks the path with a system call per part, every turn.
        sub = "conversations" if role == "conductor" else "tasks"
        self._workdirs = Path(settings.workspace_root).resolve() / sub
        self.records: Store[SessionRecord] | None = None
        self.objects: ObjectStore | None = None
        # The generation of each session whose latest turn ran here.
        self.seen: dict[str, int] = {}
        # exclusive: each session's record as this replica last wrote it, and its revision.
        self._owned: dict[str, tuple[SessionRecord, int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Per key: the task storing its last turn and releasing its lease.
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._cannot_start_at = 0.0
        self._watch: asyncio.Task[None] | None = None
        #: Called when a turn finds the agent unable to start (the conductor steps aside).
        self.problem_listeners: list[Callable[[], None]] = []

    @property
    def kind(self) -> str:
        """The runtime's kind (claude, offline)."""
        return self.runtime.kind

    async def start(self, spawn: Spawn = detached) -> None:
        """Bind the sessions bucket and the transcripts object store; watch the agent.

        ``spawn``: who owns the long-lived loops (the service's ``Context.spawn``).
        """
        self.runtime.spawn = spawn
        self.runtime.on_memory = self._observe_memory
        self.runtime.on_evict = lambda reason: self.metrics.agent_evictions.labels(
            self.role, reason
        ).inc()
        self.metrics.agent_memory_budget.labels(self.role).set(
            self.settings.agent_memory_budget_mb * MB
        )
        self._watch = spawn(self._recheck(), f"agent-check:{self.role}")
        if self.js is None:
            return
        self.records = await Store.open(self.js, streams.SESSIONS.name, SessionRecord)
        if self.settings.agent_portable_sessions:
            self.objects = await self.js.object_store(streams.TRANSCRIPTS)

    def problem(self) -> str:
        """Why the agent cannot start now ("" when it can)."""
        return self.runtime.problem()

    def backing_off(self) -> bool:
        """Whether to take no new work now: the agent could not start moments ago."""
        recent = time.monotonic() - self._cannot_start_at < HOLD_S
        return recent and bool(self.runtime.problem())

    async def _recheck(self) -> None:
        """While the agent cannot start, check it again now and then (clears the problem)."""
        while True:
            await asyncio.sleep(RECHECK_S)
            if not self.runtime.problem():
                continue
            try:
                runs = await self.runtime.check()
            except AgentUnavailable:
                continue
            log.info("the agent can start again", extra={"runs": runs})

    async def close(self) -> None:
        """Finish storing sessions, then stop the runtime's live processes."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait({self._watch}, timeout=5)
        pending = [t for t in self._pending.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)
        await self.runtime.close()

    async def settled(self, key: str) -> None:
        """Wait until ``key``'s last turn is stored (call before acknowledging its message).

        The answer of a turn is returned as soon as the agent gives it; storing
        the transcript waits for the CLI to write it (about 80 ms later) and
        overlaps with whatever the caller does with the answer meanwhile.
        """
        task = self._pending.get(key)
        if task is not None:
            await asyncio.wait({task})

    def workdir(self, key: str) -> Path:
        """The working directory of ``key``'s session: the same path on every replica."""
        return self._workdirs / key

    def keep_spares(self, system_prompt: str, json_schema: str | None = None) -> None:
        """Keep agent processes started ahead for new sessions of this role, with this
        system prompt and schema (``PODIUM_AGENT_SPARES``; see ``podium.agents.claude``)."""
        template = AgentCall(
            role=self.role,
            key=".spare",
            prompt="",
            workdir=self._workdirs / ".spare",
            system_prompt=system_prompt,
            json_schema=json_schema,
        )
        self.runtime.keep_spares(template)

    # --- a turn ------------------------------------------------------------

    async def run(self, call: AgentCall) -> AgentAnswer:
        """Run one turn under the session's lease; see the module docstring."""
        lock = self._locks.setdefault(call.key, asyncio.Lock())
        async with lock:
            await self.settled(call.key)
            if self.records is None:
                answer = await self.runtime.run(call)
            elif self.exclusive:
                answer = await self._run_owned(call, self.records)
            else:
                answer = await self._run_leased(call, self.records)
        self._observe(answer)
        return answer

    def forget_seen(self, keys: Callable[[str], bool]) -> None:
        """Read the records of the sessions whose key ``keys`` picks again before their
        next turn (exclusive mode: a partition was taken, whose sessions may have moved
        on elsewhere; the others stay warm)."""
        for name in [n for n in self.seen if keys(n.split(".", 1)[-1])]:
            self.seen.pop(name, None)
            self._owned.pop(name, None)

    async def settle_all(self, timeout_s: float = 30.0) -> None:
        """Wait until every turn run here is stored (before its keys may move elsewhere);
        a store that takes longer than ``timeout_s`` is left to finish on its own."""
        pending = [t for t in self._pending.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    async def _run_owned(self, call: AgentCall, records: Store[SessionRecord]) -> AgentAnswer:
        """A turn of a session only this replica runs now (see ``exclusive``)."""
        name = f"{self.role}.{call.key}"
        owned = self._owned.get(name)
        if owned is None and call.session_id is None:
            # A new session: nothing to restore, so no read (its store creates the record,
            # or writes over one a session of the same key left: see _persist_owned).
            owned = (SessionRecord(key=name), 0)
        elif owned is None:
            found = await records.get(name)
            owned = found if found is not None else (SessionRecord(key=name), 0)
        record, revision = owned
        call = await self._prepare(call, record)
        answer = await self.runtime.run(call)
        self._pending[call.key] = asyncio.create_task(
            self._persist_owned(
                records, name, call, record=record, revision=revision, answer=answer
            )
        )
        return answer

    async def _persist_owned(
        self,
        records: Store[SessionRecord],
        name: str,
        call: AgentCall,
        *,
        record: SessionRecord,
        revision: int,
        answer: AgentAnswer,
    ) -> None:
        try:
            await self.runtime.settle(call, answer.session_id)
            if not answer.session_id:
                return
            files = await self._store_files(call, answer)
            new = _next(record, call, answer, files)
            try:
                if revision:
                    new_revision = await records.update(name, new, revision)
                else:
                    new_revision = await records.create(name, new)
            except Conflict:
                if not revision and call.session_id is None:
                    # A record left by an earlier session of this key (a conversation that
                    # started afresh): the new session, which only this replica runs (its
                    # partition), takes its place, its generation one on.
                    found = await records.get(name)
                    if found is not None:
                        new = _next(found[0], call, answer, files)
                        new_revision = await records.update(name, new, found[1])
                        self._owned[name] = (new, new_revision)
                        self.seen[name] = new.generation
                        return

                # Another replica ran a turn meanwhile (its partition lease outlived ours):
                # its record wins, and this replica reads it before its next turn.
                log.warning("session moved on elsewhere; not storing", extra={"session": name})
                self._owned.pop(name, None)
                self.seen.pop(name, None)
                return
            self._owned[name] = (new, new_revision)
            self.seen[name] = new.generation
        except Exception:
            self._owned.pop(name, None)
            log.exception("could not store the session", extra={"session": name})

    async def _run_leased(self, call: AgentCall, records: Store[SessionRecord]) -> AgentAnswer:
        name = f"{self.role}.{call.key}"
        waited = time.monotonic()
        try:
            record, revision = await self._acquire(records, name, new=call.session_id is None)
        except LeaseBusy:
            self.metrics.agent_sessions.labels(self.role, "busy").inc()
            return AgentAnswer(
                text="", session_id=call.session_id or "", outcome="busy",
                error=f"another replica held session {name} for "
                f"{time.monotonic() - waited:.0f}s",
            )  # fmt: skip
        persisting = False
        try:
            call = await self._prepare(call, record)
            turn = asyncio.create_task(self.runtime.run(call))
            renew = asyncio.create_task(self._renew(records, name, turn))
            try:
                answer = await turn
            except asyncio.CancelledError:
                ours = asyncio.current_task()
                cancelled_here = ours is not None and ours.cancelling() > 0
                if not cancelled_here and renew.done() and isinstance(renew.exception(), LeaseLost):
                    await self.runtime.forget(call.key)
                    return AgentAnswer(
                        text="", session_id=call.session_id or "", outcome="busy",
                        error="the session's lease was lost to another replica mid-turn",
                    )  # fmt: skip
                raise
            finally:
                # asyncio.wait, not `await renew` under suppress(CancelledError): that
                # would swallow a cancellation of this call too. The renewal also ends
                # by itself once the turn is done (nats-py may swallow the cancel).
                renew.cancel()
                await asyncio.wait({renew}, timeout=10)
                if renew.done() and not renew.cancelled():
                    error = renew.exception()  # LeaseLost was handled above
                    if error is not None and not isinstance(error, LeaseLost):
                        raise error
            # Store the turn in the background; the lease is held until that is done.
            self._pending[call.key] = asyncio.create_task(
                self._persist(records, name, call, (record, revision), answer)
            )
            persisting = True
            return answer
        finally:
            if not persisting:
                await self._release(records, name)

    async def _persist(
        self,
        records: Store[SessionRecord],
        name: str,
        call: AgentCall,
        held: tuple[SessionRecord, int],
        answer: AgentAnswer,
    ) -> None:
        released = False
        try:
            await self.runtime.settle(call, answer.session_id)
            released = await self._store(call, held, answer)
        except Exception:
            log.exception("could not store the session", extra={"session": name})
        finally:
            if not released:
                await self._release(records, name)

    async def _prepare(self, call: AgentCall, record: SessionRecord) -> AgentCall:
        """Make this replica's copy of the session current; pick the session id to resume."""
        name = f"{self.role}.{call.key}"
        if call.session_id is None:
            return call  # a new session: nothing to restore
        session_id = record.session_id or call.session_id
        if record.generation and self.seen.get(name) != record.generation:
            # The last turn ran elsewhere (or before this process started): our warm
            # process, if any, holds an old history.
            await self.runtime.forget(call.key)
            restored = await self._restore(call, record, session_id)
            self.metrics.agent_sessions.labels(
                self.role, "restored" if restored else "not_stored"
            ).inc()
            if restored:
                log.info("session restored from its stored copy", extra={"session": name})
        call = replace(call, session_id=session_id)
        if not self.runtime.transcript_path(call, session_id).exists():
            self.metrics.agent_sessions.labels(self.role, "lost").inc()
            log.warning(
                "session transcript not found; it will start afresh", extra={"session": name}
            )
        return call

    async def _store(
        self, call: AgentCall, held: tuple[SessionRecord, int], answer: AgentAnswer
    ) -> bool:
        """After a turn: keep the transcript (and workspace), bump the generation and give
        up the lease, in one write; whether it was written (else the lease is still held).

        ``held``: the record and revision the lease was taken at, written over without a
        read first (renewals move the revision on: a lost race reads it)."""
        if self.records is None or not answer.session_id:
            return False
        name = f"{self.role}.{call.key}"
        files = await self._store_files(call, answer)

        def stored(current: SessionRecord | None) -> SessionRecord:
            new = _next(current or held[0], call, answer, files)
            if new.holder == self.replica:
                new = evolve(new, holder="", lease_until=0.0)
            return new

        updated = await self.records.mutate(name, stored, known=held)
        if updated is not None:
            self.seen[name] = updated.generation
        return updated is not None

    async def _store_files(self, call: AgentCall, answer: AgentAnswer) -> Stored:
        """The transcript (and a worker's workspace): small ones to go in the record, the
        others into the object store (their names)."""
        stored = Stored()
        if self.objects is None:
            return stored
        inline = self.settings.agent_inline_session_bytes
        path = self.runtime.transcript_path(call, answer.session_id)
        workdir = call.workdir if self.role == "worker" and call.carry_workdir else None
        limit = self.settings.agent_workspace_max_bytes
        if _small(path, workdir):
            files = _read_session_files(path, workdir, limit)
        else:
            # One hop to a thread for all the file work of a turn.
            files = await asyncio.to_thread(_read_session_files, path, workdir, limit)
        if files.transcript is not None:
            if len(files.transcript_packed) <= inline:
                stored.transcript_inline = files.transcript_packed
            else:
                stored.transcript = f"{self.role}/{call.key}/transcript"
                await self.objects.put(stored.transcript, files.transcript)
        if files.workspace_too_large:
            log.warning(
                "workspace too large to store; it will not follow the task to another replica",
                extra={"workdir": str(call.workdir), "limit_bytes": limit},
            )
        archive = files.workspace
        if archive is not None:
            # One limit for both: the record, base64 in JSON, must stay well inside
            # the server's max_payload.
            room = inline - len(stored.transcript_inline)
            if len(archive) <= room:
                stored.workspace_inline = archive
            else:
                stored.workspace = f"{self.role}/{call.key}/workspace.tar.gz"
                await self.objects.put(stored.workspace, archive)
        return stored

    async def _restore(self, call: AgentCall, record: SessionRecord, session_id: str) -> bool:
        """Bring the stored transcript (and workspace) into this replica; False if none."""
        if record.transcript_inline:
            data = await asyncio.to_thread(zlib.decompress, record.transcript_inline)
        elif self.objects is not None and record.transcript:
            try:
                data = (await self.objects.get(record.transcript)).data or b""
            except NotFoundError:
                return False
        else:
            return False
        path = self.runtime.transcript_path(call, session_id)
        await asyncio.to_thread(_write_file, path, data)
        archive = record.workspace_inline
        if not archive and record.workspace and self.objects is not None:
            with contextlib.suppress(NotFoundError):
                archive = (await self.objects.get(record.workspace)).data or b""
        if archive:
            await asyncio.to_thread(_unpack, archive, call.workdir)
        return True

    # --- the lease ---------------------------------------------------------

    async def _acquire(
        self, records: Store[SessionRecord], name: str, *, new: bool = False
    ) -> tuple[SessionRecord, int]:
        """Take the session's lease: the record as taken, and its revision.

        ``new``: a session that has never run, whose record is created without looking
        for one first (if there is one after all, the loop below reads it).
        """
        ttl = self.settings.agent_lease_ttl_s
        if new:
            record = SessionRecord(key=name, holder=self.replica, lease_until=time.time() + ttl)
            with contextlib.suppress(Conflict):
                return record, await records.create(name, record)
        deadline = time.monotonic() + self.settings.agent_lease_wait_s
        attempt = 0
        while True:
            now = time.time()
            found = await records.get(name)
            try:
                if found is None:
                    record = SessionRecord(key=name, holder=self.replica, lease_until=now + ttl)
                    return record, await records.create(name, record)
                record, revision = found
                if record.holder in ("", self.replica) or record.lease_until < now:
                    if record.holder not in ("", self.replica):
                        log.warning(
                            "taking over a lapsed session lease",
                            extra={"session": name, "previous_holder": record.holder},
                        )
                    taken = evolve(record, holder=self.replica, lease_until=now + ttl)
                    return taken, await records.update(name, taken, revision)
            except Conflict:
                pass  # someone else moved first: look again
            if time.monotonic() >= deadline:
                raise LeaseBusy(name)
            self.metrics.agent_sessions.labels(self.role, "lease_wait").inc()
            attempt += 1
            await asyncio.sleep(backoff(attempt, base=0.05, cap=1.0))

    async def _renew(
        self, records: Store[SessionRecord], name: str, turn: asyncio.Task[AgentAnswer]
    ) -> None:
        """Extend the lease every third of its TTL; cancel the turn if it was taken."""
        ttl = self.settings.agent_lease_ttl_s
        while not turn.done():
            await asyncio.sleep(ttl / 3)
            if turn.done():
                return

            def extend(current: SessionRecord | None) -> SessionRecord | None:
                if current is None or current.holder != self.replica:
                    return None
                return evolve(current, lease_until=time.time() + ttl)

            current = await records.mutate(name, extend)
            if current is None or current.holder != self.replica:
                log.error("session lease lost mid-turn; stopping the turn", extra={"session": name})
                turn.cancel()
                raise LeaseLost(name)

    async def _release(self, records: Store[SessionRecord], name: str) -> None:
        def free(current: SessionRecord | None) -> SessionRecord | None:
            if current is None or current.holder != self.replica:
                return None
            return evolve(current, holder="", lease_until=0.0)

        try:
            await records.mutate(name, free)
        except Exception:
            # Not fatal: the lease lapses by itself after its TTL.
            log.warning("could not release a session lease", extra={"session": name}, exc_info=True)

    # --- metrics -----------------------------------------------------------

    def _observe_memory(self, use: MemoryUse) -> None:
        m, role = self.metrics, self.role
        m.agent_memory_budget.labels(role).set(use.budget)
        for state in STATES:
            m.agent_memory_used.labels(role, state).set(use.used.get(state, 0))
            m.agent_processes.labels(role, state).set(use.processes.get(state, 0))

    def _observe(self, answer: AgentAnswer) -> None:
        if answer.outcome == "cannot_start":
            self._cannot_start_at = time.monotonic()
            for listener in self.problem_listeners:
                listener()
        m, role, kind = self.metrics, self.role, self.runtime.kind
        m.agent_turns.labels(role, kind, answer.outcome).inc()
        if answer.outcome != "busy":
            m.agent_seconds.labels(role, kind, answer.mode).observe(answer.duration_ms / 1000)
        m.agent_cost.labels(role, kind).inc(answer.cost_usd)
        for token_kind, count in (
            ("input", answer.input_tokens),
            ("output", answer.output_tokens),
            ("cache_read", answer.cache_read_tokens),
            ("cache_creation", answer.cache_creation_tokens),
        ):
            if count:
                m.agent_tokens.labels(role, token_kind).inc(count)
        m.agent_live.labels(role).set(self.runtime.live())


@dataclass
class Stored:
    """Where a turn's transcript and workspace went: in the record, or named objects."""

    transcript: str = ""
    transcript_inline: bytes = b""
    workspace: str = ""
    workspace_inline: bytes = b""


def _next(
    base: SessionRecord, call: AgentCall, answer: AgentAnswer, files: Stored
) -> SessionRecord:
    """The session's record after a turn: its latest id, one generation on, and where its
    files are now (an inline copy, when there is one, is the current one)."""
    transcript_inline = files.transcript_inline or (
        b"" if files.transcript else base.transcript_inline
    )
    workspace_inline = files.workspace_inline or (b"" if files.workspace else base.workspace_inline)
    return evolve(
        base,
        session_id=answer.session_id,
        generation=base.generation + 1,
        workdir=str(call.workdir),
        transcript=files.transcript or base.transcript,
        workspace=files.workspace or base.workspace,
        transcript_inline=transcript_inline,
        workspace_inline=workspace_inline,
    )


def _write_file(path: Path, data: bytes) -> None:
    """Put a restored transcript at ``path``, inside a CLI config dir the agent can write.

    Never through a link it planted: not the file's (a new file is made, then renamed
    over whatever is there), nor its folder's or their parent's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(os.path.islink(folder) for folder in (path.parent, path.parent.parent)):
        raise OSError(f"{path.parent} is a link: the transcript is not restored there")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".restore-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: A turn's session files are read and packed on the event loop when they add up to no
#: more than this (bytes, and files for a workspace); larger ones go to a thread. A hop
#: to a thread and back cost more CPU than reading and packing a few small files, and
#: the thread's wait for the GIL held up the turn's acknowledgement (on two cores, a
#: quarter of a conversation's worker CPU: docs/performance.md).
SMALL_BYTES = 64 * 1024
SMALL_FILES = 32
#: The largest transcript stored (a session's history; the object store takes it).
TRANSCRIPT_MAX_BYTES = 256 * 1024 * 1024


def _small(transcript: Path, workdir: Path | None) -> bool:
    """Whether a turn's files are small enough to read without leaving the event loop.

    A few system calls to find out, none following a link: the walk stops at the first
    sign of a large workspace (many files, or many bytes), never reading a file.
    """
    try:
        info = os.lstat(transcript)
        total = info.st_size if stat.S_ISREG(info.st_mode) else 0
    except FileNotFoundError:
        total = 0
    if total > SMALL_BYTES:
        return False
    folders = [workdir] if workdir is not None else []
    count = 0
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                count += 1
                if count > SMALL_FILES:
                    return False
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    if total > SMALL_BYTES:
                        return False
    return True


class NotRegular(Exception):
    """The path is a link, a FIFO, a device or a socket: not read."""


def _read_regular(path: Path | str, limit: int, *, dir_fd: int | None = None) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; None if
    there is none, or it is larger. Raises :class:`NotRegular` for anything else.

    The agent can write where its session's files are: a link it planted is not followed
    (it could point at the worker's own ``/proc/self/environ``), a FIFO or device is never
    read (it would block, or never end), and no more than ``limit`` is read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotRegular(f"{path} is a link") from err
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(f"{path} is not a regular file")
        if info.st_size > limit:
            return None
        data = f.read(limit + 1)
    return None if len(data) > limit else data


@dataclass
class SessionFiles:
    """What a turn left on disk, read in one go: the transcript, raw and compressed, and
    the workspace as an archive (None if there is none, or it is over the limit)."""

    transcript: bytes | None = None
    transcript_packed: bytes = b""
    workspace: bytes | None = None
    workspace_too_large: bool = False


def _read_session_files(transcript: Path, workdir: Path | None, limit: int) -> SessionFiles:
    files = SessionFiles()
    try:
        files.transcript = _read_regular(transcript, TRANSCRIPT_MAX_BYTES)
    except NotRegular as err:
        log.warning("transcript not stored", extra={"reason": str(err)})
    if files.transcript is not None:
        files.transcript_packed = zlib.compress(files.transcript, 1)
    if workdir is not None and workdir.is_dir() and not workdir.is_symlink():
        files.workspace = _pack(workdir, limit)
        files.workspace_too_large = files.workspace is None
    return files


def _pack(directory: Path, limit: int) -> bytes | None:
    """A gzip tar of ``directory``, or None if its files add up to more than ``limit``.

    Walked by file descriptor, never through a link (the agent, or a process it left
    running, may change the tree meanwhile): links are archived as links, regular files
    read with :func:`_read_regular`, FIFOs, devices and sockets left out.
    """
    buffer = io.BytesIO()
    total = 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    # Level 1, as the transcript's: gzip's default (9) costs several times as much CPU
    # a turn for a few bytes less.
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        folders = [(os.open(directory, flags), ".")]
        try:
            while folders:
                fd, name = folders.pop()
                try:
                    tar.addfile(_entry(name, tarfile.DIRTYPE, os.fstat(fd)))
                    for entry in sorted(os.scandir(fd), key=lambda e: e.name):
                        member = f"{name}/{entry.name}"
                        info = entry.stat(follow_symlinks=False)
                        if stat.S_ISDIR(info.st_mode):
                            with contextlib.suppress(OSError):  # replaced meanwhile
                                folders.append((os.open(entry.name, flags, dir_fd=fd), member))
                        elif stat.S_ISLNK(info.st_mode):
                            link = _entry(member, tarfile.SYMTYPE, info)
                            link.linkname = os.readlink(entry.name, dir_fd=fd)
                            tar.addfile(link)
                        elif stat.S_ISREG(info.st_mode):
                            try:
                                data = _read_regular(entry.name, limit - total, dir_fd=fd)
                            except NotRegular:
                                continue  # replaced meanwhile by something not to read
                            if data is None:
                                return None
                            total += len(data)
                            item = _entry(member, tarfile.REGTYPE, info)
                            item.size = len(data)
                            tar.addfile(item, io.BytesIO(data))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in folders:
                os.close(fd)
    return buffer.getvalue()


def _entry(name: str, kind: bytes, info: os.stat_result) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.mode = info.st_mode & 0o777
    entry.mtime = int(info.st_mtime)
    return entry


def _unpack(archive: bytes, directory: Path) -> None:
    """Replace ``directory`` with the archive's contents (no paths outside it, no devices)."""
    staging = directory.with_name(directory.name + ".restore")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(staging, filter="data")
    shutil.rmtree(directory, ignore_errors=True)
    staging.replace(directory)
