"""Parse what the conductor agent answers into commands, and say what was rejected.

Grammar, tolerant of what real models write: a command is a line that starts
(after optional whitespace, list markers or ``**`` emphasis) with a command
name and a colon; its text runs to the next command line or the end. Names are
case-insensitive. Code-fence lines are ignored (their contents count). Prose
before the first command is ignored. A line that looks like a command but
names an unknown one, or a command whose arguments are malformed, becomes a
:class:`Rejection` that the conductor's next turn is told about — never a
silent drop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any, ClassVar

from podium.agents.protocol import COMMAND_NAMES


@dataclass(frozen=True)
class SpawnWorker:
    """SPAWN_WORKER: <task>."""

    name: ClassVar[str] = "SPAWN_WORKER"

    task: str


@dataclass(frozen=True)
class SendEmail:
    """SEND_EMAIL: <to> | <subject> | <body>."""

    name: ClassVar[str] = "SEND_EMAIL"

    to: tuple[str, ...]
    subject: str
    body: str


@dataclass(frozen=True)
class SendSms:
    """SEND_SMS: <number> | <text>."""

    name: ClassVar[str] = "SEND_SMS"

    to: str
    text: str


@dataclass(frozen=True)
class KillWorker:
    """KILL_WORKER: <task id>."""

    name: ClassVar[str] = "KILL_WORKER"

    task_id: str


@dataclass(frozen=True)
class TellWorker:
    """TELL_WORKER: <task id> | <message>."""

    name: ClassVar[str] = "TELL_WORKER"

    task_id: str
    message: str


@dataclass(frozen=True)
class Reply:
    """REPLY: <text> — on the channel the conversation came in on."""

    name: ClassVar[str] = "REPLY"

    text: str


@dataclass(frozen=True)
class NoAction:
    """NO_ACTION: <why>."""

    name: ClassVar[str] = "NO_ACTION"

    reason: str


@dataclass(frozen=True)
class Escalate:
    """ESCALATE: <why> — hand the conversation to a human operator."""

    name: ClassVar[str] = "ESCALATE"

    reason: str


@dataclass(frozen=True)
class Attach:
    """ATTACH: <task id>/<name> — goes with this turn's outgoing message."""

    name: ClassVar[str] = "ATTACH"

    ref: str


Command = (
    SpawnWorker
    | SendEmail
    | SendSms
    | KillWorker
    | TellWorker
    | Reply
    | NoAction
    | Escalate
    | Attach
)


@dataclass(frozen=True)
class Rejection:
    """A command line that could not be accepted, and why."""

    line: str
    reason: str


@dataclass
class Parsed:
    """Commands in the order written, and rejections."""

    commands: list[Command] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


_NAMES = "|".join(COMMAND_NAMES)
_COMMAND = re.compile(
    rf"^\s*(?:[-*•]\s+|\d+[.)]\s+)?[*_`]*({_NAMES})[*_`]*\s*:[*_`]*\s?(.*)$", re.IGNORECASE
)
# Looks like a command (UPPER_SNAKE with an underscore, then a colon) but is not one.
_LOOKALIKE = re.compile(r"^\s*(?:[-*•]\s+)?[*_`]*([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)[*_`]*\s*:")
_FENCE = re.compile(r"^\s*(```|~~~)")
_PHONE = re.compile(r"^\+[1-9]\d{6,14}$")
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse(text: str) -> Parsed:
    """Parse an agent's answer."""
    out = Parsed()
    current: tuple[str, str, list[str]] | None = None  # (name, first line, body lines)

    def flush() -> None:
        if current is None:
            return
        name, line, body = current
        _build(name, "\n".join(body).strip(), line, out)

    for raw in text.replace("\r\n", "\n").split("\n"):
        if _FENCE.match(raw):
            continue
        match = _COMMAND.match(raw)
        if match:
            flush()
            current = (match.group(1).upper(), raw.strip(), [match.group(2)])
            continue
        lookalike = _LOOKALIKE.match(raw)
        if lookalike:
            flush()
            current = None
            out.rejected.append(Rejection(raw.strip(), f"unknown command {lookalike.group(1)}"))
            continue
        if current is not None:
            current[2].append(raw)
    flush()
    return out


# How each command's fields become its text form, so structured answers go through the
# very same validation as text ones and give the same commands.
_FIELDS: dict[str, tuple[str, ...]] = {
    "SPAWN_WORKER": ("task",),
    "SEND_EMAIL": ("to", "subject", "body"),
    "SEND_SMS": ("to", "text"),
    "KILL_WORKER": ("task_id",),
    "TELL_WORKER": ("task_id", "message"),
    "REPLY": ("text",),
    "NO_ACTION": ("reason",),
    "ESCALATE": ("reason",),
    "ATTACH": ("ref",),
}


def from_structured(answer: Any) -> Parsed:
    """Commands from a structured answer ``{"commands": [{"command": …, …}]}``."""
    out = Parsed()
    items = answer.get("commands") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        out.rejected.append(Rejection(str(answer)[:120], "structured answer without commands"))
        return out
    for item in items:
        name = str(item.get("command", "")).upper() if isinstance(item, dict) else ""
        fields = _FIELDS.get(name)
        if fields is None or not isinstance(item, dict):
            out.rejected.append(Rejection(str(item)[:120], f"unknown command {name or item!r}"))
            continue
        values = [str(item.get(f, "")).strip() for f in fields]
        if name == "SEND_EMAIL" and isinstance(item.get("to"), list):
            values[0] = ", ".join(str(a) for a in item["to"])
        _build(name, " | ".join(values), f"{name}: {' | '.join(values)}"[:200], out)
    return out


def _split(text: str, parts: int) -> list[str] | None:
    pieces = [p.strip() for p in text.split("|", parts - 1)]
    return pieces if len(pieces) == parts else None


def _build(name: str, text: str, line: str, out: Parsed) -> None:
    def reject(reason: str) -> None:
        out.rejected.append(Rejection(line, reason))

    if name == "SPAWN_WORKER":
        if not text:
            return reject("SPAWN_WORKER needs a task description")
        out.commands.append(SpawnWorker(text))
    elif name == "SEND_EMAIL":
        pieces = _split(text, 3)
        if pieces is None:
            return reject("SEND_EMAIL needs: <to> | <subject> | <body>")
        to_field, subject, body = pieces
        addresses = tuple(parseaddr(a)[1].lower() for a in to_field.split(",") if a.strip())
        if not addresses or any("@" not in a for a in addresses):
            return reject(f"SEND_EMAIL: invalid recipient {to_field!r}")
        if not body:
            return reject("SEND_EMAIL: empty body")
        out.commands.append(SendEmail(addresses, " ".join(subject.split()), body))
    elif name == "SEND_SMS":
        pieces = _split(text, 2)
        if pieces is None:
            return reject("SEND_SMS needs: <number> | <text>")
        number = re.sub(r"[\s().-]", "", pieces[0])
        if not _PHONE.match(number):
            return reject(f"SEND_SMS: {pieces[0]!r} is not an E.164 number")
        if not pieces[1]:
            return reject("SEND_SMS: empty text")
        out.commands.append(SendSms(number, pieces[1]))
    elif name == "KILL_WORKER":
        task_id = text.split(maxsplit=1)[0] if text.split() else ""
        if not _TASK_ID.match(task_id):
            return reject("KILL_WORKER needs a task id")
        out.commands.append(KillWorker(task_id))
    elif name == "TELL_WORKER":
        pieces = _split(text, 2)
        if pieces is None or not _TASK_ID.match(pieces[0]) or not pieces[1]:
            return reject("TELL_WORKER needs: <task id> | <message>")
        out.commands.append(TellWorker(pieces[0], pieces[1]))
    elif name == "REPLY":
        if not text:
            return reject("REPLY needs text")
        out.commands.append(Reply(text))
    elif name == "NO_ACTION":
        out.commands.append(NoAction(text))
    elif name == "ESCALATE":
        out.commands.append(Escalate(text or "no reason given"))
    elif name == "ATTACH":
        ref = text.split("\n", 1)[0].strip().strip("`'\"")
        task_id, _, file = ref.partition("/")
        if not _TASK_ID.match(task_id) or not file:
            return reject("ATTACH needs: <task id>/<file name>, as the worker's report lists it")
        out.commands.append(Attach(ref))
    return None
