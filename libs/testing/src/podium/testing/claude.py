"""Which Claude Code CLI the tests and benchmarks run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Where ``make setup`` installs the pinned CLI, from the project's root.
PINNED = Path("tools/claude/node_modules/.bin/claude")


def claude_binary() -> str | None:
    """``PODIUM_CLAUDE_BIN`` if set, else the project's pinned CLI (found from the working
    directory up), else ``claude`` on PATH; None when there is none."""
    configured = os.environ.get("PODIUM_CLAUDE_BIN")
    if configured:
        return configured
    here = Path(__file__).resolve()
    for base in (Path.cwd(), here):
        for folder in (base, *base.parents):
            if (folder / PINNED).exists():
                return str(folder / PINNED)
    return shutil.which("claude")
