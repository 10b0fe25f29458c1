"""The text protocol between Podium and its agents.

What the conductor agent receives, one block per turn (the seed's formats)::

    [EMAIL]                      [SMS]                  [API]
    From: …                      From: …                From: …
    To: …                        Message: …             Thread: …
    Subject: …                   ---                    Message: …
    Body:                                               ---
    …
    ---

    [OPERATOR]                   (an operator's answer, from the console)
    From: <operator>
    Message:
    …
    ---

    [WORKER:<task id>]
    Status: COMPLETE|FAILED|NEEDS_INPUT|CANCELLED
    Summary: …
    Artifact: <task id>/<name> (<size> bytes, <type>)     (one per file, if any)
    Details:
    …
    ---

An inbound message with files lists each as ``Attachment: <name> (<type>, <size>
bytes)`` before its body (``…: not stored: <why>`` for one left out); the tasks
it starts find them under ``inputs/``.

What it answers: commands at the start of a line, each running to the next
command or the end (parsed by ``podium.conductor.commands``). What a worker
agent ends its answer with: ``Status:`` / ``Summary:`` / ``Details:`` lines
(parsed by ``podium.worker.report``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

COMMAND_NAMES = (
    "SPAWN_WORKER",
    "SEND_EMAIL",
    "SEND_SMS",
    "KILL_WORKER",
    "TELL_WORKER",
    "REPLY",
    "NO_ACTION",
    "ESCALATE",
    "ATTACH",
)

END = "---"


def _clean(value: str) -> str:
    # A header value must stay on one line: untrusted text cannot forge a field.
    return " ".join(value.split())


def _lines(name: str, values: list[str] | None) -> str:
    return "".join(f"{name}: {_clean(v)}\n" for v in values or [])


def email_block(
    sender: str, to: str, subject: str, body: str, attachments: list[str] | None = None
) -> str:
    """An inbound email as the conductor sees it; ``attachments``: one line per file."""
    return (
        f"[EMAIL]\nFrom: {_clean(sender)}\nTo: {_clean(to)}\nSubject: {_clean(subject)}\n"
        f"{_lines('Attachment', attachments)}Body:\n{fence(body, 'email')}\n{END}"
    )


def sms_block(sender: str, text: str, attachments: list[str] | None = None) -> str:
    """An inbound SMS as the conductor sees it; ``attachments``: one line per media item."""
    return (
        f"[SMS]\nFrom: {_clean(sender)}\n{_lines('Attachment', attachments)}"
        f"Message:\n{fence(text, 'sms')}\n{END}"
    )


def operator_block(operator: str, text: str, context: str = "") -> str:
    """An operator's answer to an escalated conversation (from the console): trusted, not
    fenced; ``context`` (the original request) follows it."""
    block = f"[OPERATOR]\nFrom: {_clean(operator)}\nMessage:\n{defuse(text)}\n{END}"
    return f"{block}\n{context}" if context else block


def api_block(sender: str, thread: str, text: str) -> str:
    """An inbound API message as the conductor sees it."""
    return (
        f"[API]\nFrom: {_clean(sender)}\nThread: {_clean(thread)}\n"
        f"Message:\n{fence(text, 'api')}\n{END}"
    )


def worker_block(
    task_id: str,
    status: str,
    summary: str,
    details: str,
    extra: str = "",
    *,
    facts: list[str] | None = None,
) -> str:
    """A worker's report as the conductor sees it, with any context the conductor adds.

    The worker has read untrusted material, so what it reports is fenced too.
    ``facts``: ``Name: value`` lines the platform vouches for (``Artifact: …``), each
    kept to one line.
    """
    checked = "".join(f"{_clean(fact)}\n" for fact in facts or [])
    block = (
        f"[WORKER:{task_id}]\nStatus: {status}\nSummary: {_clean(summary)}\n{checked}"
        f"Details:\n{fence(details, 'worker')}\n"
    )
    block += END
    return f"{block}\n{extra}" if extra else block


UNTRUSTED_OPEN = '<untrusted source="{source}">'
UNTRUSTED_CLOSE = "</untrusted>"
_MARKER = re.compile(r"</?\s*untrusted", re.IGNORECASE)


def fence(text: str, source: str) -> str:
    """Label untrusted text and neutralise what in it could pass for structure.

    The text goes between ``<untrusted source=…>`` and ``</untrusted>`` lines; a
    marker inside it is defused (so it cannot close the fence early), and a line
    that is exactly ``---`` or starts with a block tag gets a leading ``> `` (so
    it cannot end the block or start a new one).
    """
    out = [UNTRUSTED_OPEN.format(source=source)]
    for line in text.splitlines():
        # A look-alike angle quote: the text still reads the same to the agent.
        line = _MARKER.sub(lambda m: m.group(0).replace("<", "\u2039"), line)  # noqa: PLW2901
        out.append("> " + line if _structural(line) else line)
    out.append(UNTRUSTED_CLOSE)
    return "\n".join(out)


def _structural(line: str) -> bool:
    """Whether ``line`` could pass for a block's end or a block tag to a reader: compared
    after compatibility folding (full-width brackets), without invisible format
    characters (zero-width spaces), and in any case."""
    folded = unicodedata.normalize("NFKC", line)
    folded = "".join(c for c in folded if unicodedata.category(c) != "Cf").strip()
    return folded == END or bool(_LOOKALIKE_TAG.match(folded))


def defuse(text: str) -> str:
    """Trusted text (an operator's answer) kept from ending its block or starting another:
    such a line gets a leading ``> ``, as in :func:`fence`."""
    return "\n".join("> " + line if _structural(line) else line for line in text.splitlines())


def unfence(text: str) -> str:
    """The content of fenced text, without the fence lines (for the offline agent)."""
    lines = [
        line
        for line in text.splitlines()
        if not (line.startswith("<untrusted source=") or line == UNTRUSTED_CLOSE)
    ]
    return "\n".join(lines)


_BLOCK_TAG = re.compile(r"^\[(EMAIL|SMS|API|WORKER:[^\]]*|OPERATOR|SYSTEM|POLICY)\]")
_LOOKALIKE_TAG = re.compile(
    r"^\[\s*(EMAIL|SMS|API|WORKER\s*:[^\]]*|WORKER|OPERATOR|SYSTEM|POLICY)\s*\]", re.IGNORECASE
)


@dataclass(frozen=True)
class Block:
    """One parsed input block (used by the offline agent)."""

    kind: str  # EMAIL, SMS, API or WORKER
    task_id: str
    fields: dict[str, str]
    body: str
    #: Fields that may come more than once (``Artifact``, ``Attachment``), in order.
    repeated: dict[str, list[str]] = field(default_factory=dict)


_FIELD = re.compile(r"^([A-Za-z][A-Za-z -]*):\s?(.*)$")


def parse_blocks(text: str) -> list[Block]:
    """Parse every input block in ``text``, in order."""
    blocks = []
    lines = text.strip().splitlines()
    i = 0
    while i < len(lines):
        if _BLOCK_TAG.match(lines[i].strip()):
            block, i = _parse_at(lines, i)
            blocks.append(block)
        else:
            i += 1
    return blocks


def _parse_at(lines: list[str], start: int) -> tuple[Block, int]:
    tag = lines[start].strip()[1:-1]
    kind, _, task_id = tag.partition(":")
    fields: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    body_lines: list[str] = []
    in_body = False
    end = start + 1
    while end < len(lines):
        line = lines[end]
        end += 1
        if line.strip() == END:
            break
        if in_body:
            body_lines.append(line)
            continue
        match = _FIELD.match(line)
        if not match:
            continue
        name, value = match.group(1), match.group(2)
        if name in ("Body", "Details", "Message"):
            in_body = True
            if value:
                body_lines.append(value)
        else:
            fields[name] = value
            repeated.setdefault(name, []).append(value)
    body = unfence("\n".join(body_lines)).strip()
    return Block(kind=kind, task_id=task_id, fields=fields, body=body, repeated=repeated), end
