"""The console's verbs for terminals and scripts: the same JSON API the web pages use.

``podium conversations``, ``show``, ``tasks``, ``kill``, ``escalations``, ``answer`` and
``close`` call the console (``PODIUM_CONSOLE_URL``, else the running ``podium up``'s)
with an operator's token (``PODIUM_CONSOLE_TOKEN``, else the one ``podium up`` made,
``<home>/console-token``; ``--home``/``PODIUM_HOME``). ``--json`` prints the API's
answer as it came.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import msgspec

from podium.cli.up import running_platform
from podium.common.errors import PodiumError
from podium.contracts.http import (
    ActionResult,
    ConversationDetail,
    ConversationList,
    ConversationSummary,
    TaskList,
    TaskView,
)

DEFAULT_CONSOLE_URL = "http://127.0.0.1:8090"


class ConsoleError(PodiumError):
    """The console could not be reached, or refused; the message says which."""


def console_url(home: Path) -> str:
    """The console to call: ``PODIUM_CONSOLE_URL``, else that of the ``podium up`` running
    from ``home``."""
    if env := os.environ.get("PODIUM_CONSOLE_URL"):
        return env.rstrip("/")
    platform = running_platform(home)
    if platform and platform.get("console_url"):
        return str(platform["console_url"])
    return DEFAULT_CONSOLE_URL


def console_token(home: Path) -> str:
    """An operator's token: ``PODIUM_CONSOLE_TOKEN``, else ``podium up``'s (only for
    ``podium up``'s own console: it is never sent to one ``PODIUM_CONSOLE_URL`` names)."""
    if env := os.environ.get("PODIUM_CONSOLE_TOKEN"):
        return env
    path = home / "console-token"
    if os.environ.get("PODIUM_CONSOLE_URL"):
        raise ConsoleError(
            "PODIUM_CONSOLE_URL is set but PODIUM_CONSOLE_TOKEN is not: set the token of "
            "an operator of that console (`podium console-operator NAME` makes one)"
        )
    if path.exists():
        return path.read_text().strip()
    raise ConsoleError(
        "no operator token: set PODIUM_CONSOLE_TOKEN (`podium console-operator NAME` makes "
        f"one), or run podium up, which keeps one in {path}"
    )


async def call_console(
    home: Path, method: str, path: str, body: dict[str, Any] | None = None
) -> bytes:
    """The console's answer to one request; raises :class:`ConsoleError` for any refusal."""
    url = console_url(home) + path
    headers = {"Authorization": f"Bearer {console_token(home)}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.request(method, url, json=body, headers=headers) as resp,
        ):
            data = await resp.read()
            if resp.status >= 400:
                try:
                    problem = json.loads(data)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    problem = data.decode(errors="replace")[:300]
                raise ConsoleError(f"{resp.status} from {url}: {problem}")
            return data
    except (aiohttp.ClientError, TimeoutError) as err:
        raise ConsoleError(f"cannot reach the console at {url}: {err!r}") from err


def _out(text: str) -> None:
    print(text, flush=True)  # noqa: T201


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        _out("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def _conversations(listed: ConversationList) -> None:
    rows = [_summary_row(c) for c in listed.conversations]
    _table(rows, ["CONVERSATION", "CHANNEL", "WITH", "STATE", "OPEN", "SPEND", "LAST ACTIVITY"])
    _out(f"({len(listed.conversations)} of {listed.total})")


def _summary_row(c: ConversationSummary) -> list[str]:
    return [
        c.conversation_id,
        c.channel,
        ", ".join(c.participants)[:40],
        c.state,
        f"{c.open_tasks}/{c.tasks}",
        f"${c.spend_usd:.4f}",
        c.last_activity.strftime("%Y-%m-%d %H:%M:%S"),
    ]


def _tasks(tasks: list[TaskView]) -> None:
    rows = [
        [
            t.task_id,
            t.conversation_id,
            t.state,
            f"${t.cost_usd:.4f}",
            " ".join(t.summary.split())[:60],
        ]
        for t in tasks
    ]
    _table(rows, ["TASK", "CONVERSATION", "STATE", "COST", "SUMMARY"])


async def run(verb: str, args: Any) -> int:
    """One verb (see the module docstring); its exit status."""
    as_json = getattr(args, "json", False)
    home = Path(args.home)

    async def call(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        return await call_console(home, method, path, body)

    match verb:
        case "conversations":
            query = {k: v for k, v in (("state", args.state), ("channel", args.channel),
                                        ("q", args.search)) if v}  # fmt: skip
            path = "/api/conversations" + (("?" + _query(query)) if query else "")
            data = await call("GET", path)
            return _show(data, as_json, ConversationList, _conversations)
        case "escalations":
            data = await call("GET", "/api/escalations")
            return _show(data, as_json, ConversationList, _escalations)
        case "show":
            data = await call("GET", f"/api/conversations/{_seg(args.conversation)}")
            return _show(data, as_json, ConversationDetail, _detail)
        case "tasks":
            data = await call("GET", "/api/tasks")
            return _show(data, as_json, TaskList, lambda listed: _tasks(listed.tasks))
        case "kill":
            data = await call("POST", f"/api/tasks/{_seg(args.task)}/kill", {"reason": args.reason})
            return _show(data, as_json, ActionResult, lambda r: _out(f"kill sent ({r.event_id})"))
        case "answer":
            body = {"text": args.text}
            path = f"/api/conversations/{_seg(args.conversation)}/answer"
            data = await call("POST", path, body)
            return _show(data, as_json, ActionResult, lambda r: _out(f"answer sent ({r.event_id})"))
        case "close":
            body = {"reason": args.reason}
            path = f"/api/conversations/{_seg(args.conversation)}/close"
            data = await call("POST", path, body)
            return _show(data, as_json, ActionResult, lambda r: _out(f"close sent ({r.event_id})"))
    return 2


def _show(data: bytes, as_json: bool, kind: type[Any], human: Any) -> int:
    if as_json:
        sys.stdout.write(json.dumps(json.loads(data), indent=2) + "\n")
        return 0
    human(msgspec.json.decode(data, type=kind))
    return 0


def _escalations(listed: ConversationList) -> None:
    if not listed.conversations:
        _out("Nothing waits for an operator.")
    for c in listed.conversations:
        _out(f"{c.conversation_id}  {c.channel}  {', '.join(c.participants)}  {c.subject}")
        _out(f"  why: {c.escalation}")


def _detail(detail: ConversationDetail) -> None:
    c = detail.conversation
    _out(f"{c.conversation_id}  {c.channel}  {c.state}  with {', '.join(c.participants)}")
    if c.escalation:
        _out(f"escalated: {c.escalation}")
    _out(f"spend ${c.spend_usd:.4f}, {c.turns} turns")
    if detail.tasks:
        _out("")
        _tasks(detail.tasks)
    _out("")
    for e in detail.timeline:
        _out(f"{e.at.strftime('%H:%M:%S')}  {e.kind:<11} {e.title}")
        for key, value in e.facts.items():
            _out(f"    {key}: {value}")
        for item in e.items:
            _out(f"    - {item}")
        for section in e.sections:
            if section.text and (e.kind != "turn" or section.label == "answered"):
                _out(f"    {section.label}: {_short(section.text, 200)}")


def _short(text: str, width: int) -> str:
    return " ".join(text.split())[:width]


def _query(values: dict[str, str]) -> str:
    return urlencode(values)


def _seg(value: str) -> str:
    """One path segment, quoted (an id with ``/`` or ``?`` stays one segment)."""
    return quote(value, safe="")
