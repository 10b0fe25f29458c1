"""``podium config-docs``: the configuration reference, generated from the settings classes."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from podium.common.config import AgentSettings, CommonSettings, describe

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
    from podium.ingress.config import IngressSettings  # noqa: PLC0415
    from podium.notifier.config import NotifierSettings  # noqa: PLC0415
    from podium.worker.config import WorkerSettings  # noqa: PLC0415

    return [
        ("ingress", IngressSettings),
        ("conductor", ConductorSettings),
        ("worker", WorkerSettings),
        ("notifier", NotifierSettings),
    ]


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| variable | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{v}` | {t} | `{d}` | {desc} |" for v, t, d, desc in rows]
    return "\n".join(lines)


def render() -> str:
    """The whole reference, as Markdown."""
    common = {row[0] for row in describe(CommonSettings)}
    agent = {row[0] for row in describe(AgentSettings)}
    parts = [HEADER]
    parts.append("## Every service\n\n" + _table(describe(CommonSettings)))
    agent_rows = [r for r in describe(AgentSettings) if r[0] not in common]
    parts.append("## Services that run agents (conductor, worker)\n\n" + _table(agent_rows))
    for name, cls in _settings():
        own = [r for r in describe(cls) if r[0] not in common and r[0] not in agent]
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
