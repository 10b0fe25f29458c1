"""The files that go with a message: attached to an email, or download links.

A worker's files ("artifacts") are in the ``artifacts`` object store, and a
command names those it sends (``attachments``). An email carries them as MIME
parts up to ``email_attachments_max_bytes`` in all, in the order listed; a file
that would pass the limit, and every file of an SMS or an API reply, goes as a
download link that the ingress serves (``podium.common.links``). A link's
expiry counts from the command's time, not the attempt's, so every attempt at
one message has the same text (a long SMS resumes with the same parts).

When no link can be made (no public URL or link secret), or a file is not in the
store any more, the message still goes and its text says so: a file is never
left out silently.

The handler fetches an email's files *before* the outbox record says
``sending``: a failed fetch (or a crash during one) has sent nothing, so the
command is safe to try again.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from dataclasses import replace
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from podium.common import links
from podium.common.config import Secret
from podium.contracts import streams
from podium.contracts.events import Artifact, SendEmail, SendSms
from podium.contracts.state import FileLink
from podium.notifier.transports import Command, OutgoingFile, TransientSendError

log = logging.getLogger(__name__)

#: Longest wait for one file from the object store (it streams in 128 KiB chunks).
FETCH_TIMEOUT_S = 60.0


class Linker:
    """Makes download links, or says why it cannot."""

    def __init__(self, public_url: str, secret: Secret, ttl_s: float) -> None:
        self.public_url = public_url
        self.secret = secret
        self.ttl_s = ttl_s
        missing = [
            what
            for what, value in (("no public URL", public_url), ("no link secret", secret))
            if not value
        ]
        #: Why no link can be made ("" when links can be made), as a message may say it.
        self.problem = (
            f"download links are not set up on this server ({' and '.join(missing)})"
            if missing
            else ""
        )

    def link(self, artifact: Artifact, since: datetime) -> tuple[str, datetime]:
        """The URL of ``artifact`` and when it stops working (``ttl_s`` after ``since``)."""
        expires = int(since.timestamp() + self.ttl_s)
        url = links.url(self.public_url, artifact.object, expires, self.secret.reveal())
        return url, datetime.fromtimestamp(expires, UTC)


class Files:
    """Gets a command's artifacts ready to go: fetched to attach, or linked."""

    def __init__(
        self,
        js: JetStreamContext | None,
        store: ObjectStore | None,
        linker: Linker,
        *,
        email_max_bytes: int,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self.js = js
        self.store = store
        self.linker = linker
        self.email_max_bytes = email_max_bytes
        self.fetch_timeout_s = fetch_timeout_s

    def linked(self, command: Command) -> list[OutgoingFile]:
        """Each of ``command``'s artifacts with its link, or ``unlinked`` (why: the
        linker's ``problem``). Pure: the same command always gets the same links."""
        out: list[OutgoingFile] = []
        for artifact in command.attachments:
            if self.linker.problem:
                out.append(OutgoingFile(artifact, "unlinked"))
                continue
            url, expires_at = self.linker.link(artifact, command.at)
            out.append(OutgoingFile(artifact, "linked", url=url, expires_at=expires_at))
        return out

    def text(self, command: Command) -> Command:
        """An SMS or API reply as it goes: its text says where its files are (no I/O).
        An email is returned as it is: what it says depends on what :meth:`prepare`
        finds in the store."""
        if not command.attachments or isinstance(command, SendEmail):
            return command
        files = self.linked(command)
        if isinstance(command, SendSms):
            lines = [_sms_line(f, self.linker.problem) for f in files]
        else:
            lines = [_unlinked_line(f, self.linker.problem) for f in files if not f.url]
        return msgspec.structs.replace(command, body=_with_lines(command.body, lines))

    async def prepare(self, command: Command) -> tuple[Command, tuple[OutgoingFile, ...]]:
        """``command`` as it goes (its text naming what is not attached) and its files.

        Raises :class:`TransientSendError` when a file cannot be fetched now (the
        store does not answer): nothing was sent, the command is tried again later.
        """
        if not command.attachments:
            return command, ()
        if not isinstance(command, SendEmail):
            return self.text(command), tuple(self.linked(command))
        room = self.email_max_bytes
        files: list[OutgoingFile] = []
        for linked in self.linked(command):
            file = linked
            # Fetched only when it may fit; its real size decides (it may have changed).
            if linked.artifact.size <= room:
                data = await self.fetch(linked.artifact)
                if data is None:
                    file = replace(linked, outcome="missing", url="", expires_at=None)
                elif len(data) <= room:
                    room -= len(data)
                    file = replace(linked, outcome="attached", data=data)
            files.append(file)
        lines = [_email_line(f, self.linker.problem) for f in files if f.outcome != "attached"]
        body = _with_lines(command.body, lines)
        return msgspec.structs.replace(command, body=body), tuple(files)

    async def fetch(self, artifact: Artifact) -> bytes | None:
        """The bytes of ``artifact`` (None when the store does not have it)."""
        store = await self._store()
        buffer = io.BytesIO()
        try:
            async with asyncio.timeout(self.fetch_timeout_s):
                # Into a buffer: the client's own result grows by concatenation.
                await store.get(artifact.object, writeinto=buffer)
        except NotFoundError:
            log.warning(
                "artifact not in the store; the message says so",
                extra={"object": artifact.object, "task_id": artifact.task_id},
            )
            return None
        except Exception as err:
            raise TransientSendError(f"cannot fetch {artifact.ref} now: {err!r}") from err
        data = buffer.getvalue()
        if artifact.sha256 and hashlib.sha256(data).hexdigest() != artifact.sha256:
            # Objects are named by their content: another one here is not the file the
            # conductor attached. The message says it could not be found, as for a gone one.
            log.error(
                "artifact in the store is not the one attached; not sent",
                extra={"object": artifact.object, "task_id": artifact.task_id},
            )
            return None
        return data

    async def _store(self) -> ObjectStore:
        if self.store is None:
            if self.js is None:
                raise TransientSendError("no artifacts object store")
            try:
                self.store = await self.js.object_store(streams.ARTIFACTS)
            except BucketNotFoundError as err:
                raise TransientSendError(
                    f"the {streams.ARTIFACTS} object store does not exist (not provisioned)"
                ) from err
        return self.store

    def view(self, command: Command) -> tuple[str, list[FileLink]]:
        """How the replies read model shows ``command``: its text, saying which files
        could not be linked, and a link to each of the others."""
        files = self.linked(command)
        lines = [_unlinked_line(f, self.linker.problem) for f in files if not f.url]
        shown = [
            FileLink(
                name=f.artifact.name,
                size=f.artifact.size,
                content_type=f.artifact.content_type,
                url=f.url,
                expires_at=f.expires_at,
            )
            for f in files
            if f.url and f.expires_at is not None
        ]
        return _with_lines(command.body, lines), shown


def _with_lines(body: str, lines: list[str]) -> str:
    if not lines:
        return body
    return "\n\n".join(part for part in (body.rstrip(), "\n".join(lines)) if part)


def _sms_line(file: OutgoingFile, problem: str) -> str:
    if file.url:
        return f"{file.artifact.name}: {file.url}"
    return f"{file.artifact.name}: could not be linked ({problem})"


def _unlinked_line(file: OutgoingFile, problem: str) -> str:
    return f"{file.artifact.name} could not be linked: {problem}."


def _email_line(file: OutgoingFile, problem: str) -> str:
    name, size = file.artifact.name, _size(file.artifact.size)
    match file.outcome:
        case "missing":
            return f"{name} could not be found, so it is not attached."
        case "linked" if file.expires_at is not None:
            until = file.expires_at.strftime("%Y-%m-%d %H:%M UTC")
            return f"{name} ({size}) is too large to attach; download it until {until}: {file.url}"
        case _:
            return f"{name} ({size}) is too large to attach and could not be linked: {problem}."


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    if n < 1000 * 1000:
        return f"{n / 1000:.1f} KB"
    return f"{n / 1000 / 1000:.1f} MB"
