"""``podium config-docs``: the configuration reference, generated from the settings classes."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from podium.common.config import (
    AgentSettings,
    CommonSettings,
    default_text,
    describe,
    env_names,
)

HEADER = """\
# Configuration reference

Every setting is an environment variable, read once at start. A missing or
invalid value stops the service with a message that names the variable.
Durations are in seconds (`_S`); lists are comma-separated. Secrets are never
logged.

This file is generated from the settings classes by `podium config-docs`;
a test fails when it is out of date.
"""


def _settings() -> list[tuple[str, type[msgspec.Struct]]]:
    from podium.conductor.config import ConductorSettings  # noqa: PLC0415
    from podium.console.config import ConsoleSettings  # noqa: PLC0415
    from podium.ingress.config import IngressSettings  # noqa: PLC0415
    from podium.notifier.config import NotifierSettings  # noqa: PLC0415
    from podium.worker.config import WorkerSettings  # noqa: PLC0415

    return [
        ("ingress", IngressSettings),
        ("conductor", ConductorSettings),
        ("worker", WorkerSettings),
        ("notifier", NotifierSettings),
        ("console", ConsoleSettings),
    ]


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| variable | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{v}` | {t} | `{d}` | {desc} |" for v, t, d, desc in rows]
    return "\n".join(lines)


AGENTS_INTRO = """\
Each of these is set per role. The conductor reads `PODIUM_CONDUCTOR_<NAME>`
first, the worker `PODIUM_WORKER_<NAME>` (for example
`PODIUM_CONDUCTOR_CLAUDE_MODEL`, `PODIUM_WORKER_AGENT_TIMEOUT_S`), then both read
the shared `PODIUM_<NAME>` below, then their own default. So one environment
(`podium up`) can give the roles different models, tools and limits. What the
conductor may *do*, and the limits it has its own defaults for — rows marked "own
variable only" — it reads only from its own `PODIUM_CONDUCTOR_…` variable, never
from the shared one: a value meant for workers does not give the conductor tools or
long turns. A role prompt is always one role's. A shared variable a role ignores is
named in a warning at start. See [agents](agents.md#tools-and-shell-commands) for
letting workers run shell commands.
"""


def _agent_table() -> str:
    from podium.conductor.config import ConductorSettings  # noqa: PLC0415
    from podium.worker.config import WorkerSettings  # noqa: PLC0415

    common = {f.name for f in msgspec.structs.fields(CommonSettings)}
    conductor = {f.name: f for f in msgspec.structs.fields(ConductorSettings)}
    worker = {f.name: f for f in msgspec.structs.fields(WorkerSettings)}
    lines = [
        "| shared variable | conductor default | worker default | type | description |",
        "|---|---|---|---|---|",
    ]
    for (variable, kind, _, description), field in zip(
        describe(AgentSettings), msgspec.structs.fields(AgentSettings), strict=True
    ):
        if field.name in common:
            continue
        cells = []
        for cls, fields in ((ConductorSettings, conductor), (WorkerSettings, worker)):
            cell = f"`{default_text(fields[field.name])}`"
            names = env_names(cls, fields[field.name])
            if variable not in names:
                cell += f" (own variable only: `{names[0]}`)"
            cells.append(cell)
        lines.append(f"| `{variable}` | {cells[0]} | {cells[1]} | {kind} | {description} |")
    return "\n".join(lines)


def render() -> str:
    """The whole reference, as Markdown."""
    shared = {f.name for f in msgspec.structs.fields(AgentSettings)}
    parts = [HEADER]
    parts.append("## Every service\n\n" + _table(describe(CommonSettings)))
    parts.append(
        "## Services that run agents (conductor, worker)\n\n" + AGENTS_INTRO + "\n" + _agent_table()
    )
    for name, cls in _settings():
        rows = zip(msgspec.structs.fields(cls), describe(cls), strict=True)
        own = [row for field, row in rows if field.name not in shared]
        parts.append(f"## {name}\n\n" + _table(own))
    return "\n\n".join(parts) + "\n"


def write_config_docs(path: Path, *, check: bool) -> int:
    """Write (or, with ``check``, verify) the reference at ``path``."""
    text = render()
    if check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run `podium config-docs`", file=sys.stderr)  # noqa: T201
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")  # noqa: T201
    return 0
