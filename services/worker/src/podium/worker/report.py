"""Read the report a worker agent ends its answer with (the seed's format)::

    Status: COMPLETE | FAILED | NEEDS_INPUT
    Summary: <one line>
    Details:
    <anything, to the end>

The last ``Status:`` line wins (models sometimes quote the format earlier).
An answer without a report is still reported — as COMPLETE with
``structured=False`` and the whole answer as details — so nothing is lost and
the conductor can judge it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from podium.contracts.events import TaskStatus

_STATUS = re.compile(r"^\s*[*_`]*status[*_`]*\s*:[*_`]*\s*([A-Za-z_ ]+?)[*_`]*\s*$", re.I)
_SUMMARY = re.compile(r"^\s*[*_`]*summary[*_`]*\s*:[*_`]*\s*(.*)$", re.I)
_DETAILS = re.compile(r"^\s*[*_`]*details[*_`]*\s*:[*_`]*\s*(.*)$", re.I)

_ALIASES: dict[str, TaskStatus] = {
    "COMPLETE": "COMPLETE",
    "COMPLETED": "COMPLETE",
    "DONE": "COMPLETE",
    "SUCCESS": "COMPLETE",
    "FAILED": "FAILED",
    "FAIL": "FAILED",
    "FAILURE": "FAILED",
    "NEEDS_INPUT": "NEEDS_INPUT",
    "NEEDS INPUT": "NEEDS_INPUT",
    "NEED_INPUT": "NEEDS_INPUT",
    "BLOCKED": "NEEDS_INPUT",
}


@dataclass(frozen=True)
class Report:
    """A worker's report."""

    status: TaskStatus
    summary: str
    details: str
    structured: bool


def parse_report(answer: str) -> Report:
    """The report at the end of ``answer``."""
    lines = answer.replace("\r\n", "\n").split("\n")
    start = None
    status: TaskStatus | None = None
    for i in range(len(lines) - 1, -1, -1):
        match = _STATUS.match(lines[i])
        if match and match.group(1).strip().upper() in _ALIASES:
            start, status = i, _ALIASES[match.group(1).strip().upper()]
            break
    if start is None or status is None:
        text = answer.strip()
        first = next((line.strip() for line in text.split("\n") if line.strip()), "")
        return Report("COMPLETE", first[:200] or "(empty answer)", text, structured=False)
    summary = ""
    details: list[str] = []
    in_details = False
    for line in lines[start + 1 :]:
        if in_details:
            details.append(line)
            continue
        if m := _SUMMARY.match(line):
            summary = m.group(1).strip()
        elif m := _DETAILS.match(line):
            in_details = True
            if m.group(1).strip():
                details.append(m.group(1))
    body = "\n".join(details).strip().removesuffix("```").strip()
    if not body:
        # Work shown before the report is still the work.
        body = "\n".join(lines[:start]).strip()
    return Report(status, summary or status.lower(), body, structured=True)
