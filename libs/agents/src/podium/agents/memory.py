"""What agent processes really take: the resident memory of each process tree.

A CLI process is a Node.js process (in a bubblewrap sandbox, bwrap's child), and
the tools it runs are its children: what it costs is the RSS of its whole tree.
One pass over the process table (psutil) measures every tree at once. RSS counts
pages shared between processes once per process, so the sum errs high, which is
the safe side for a budget that must fit a container's memory limit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MB = 1024 * 1024

#: What a process is, for the metrics: answering a turn, waiting warm, or a spare.
STATES = ("busy", "idle", "spare")


@dataclass(frozen=True)
class MemoryUse:
    """The agent processes of one service, as last measured."""

    #: ``PODIUM_AGENT_MEMORY_BUDGET_MB`` in bytes (0 = no budget).
    budget: int
    #: Bytes and processes by state (:data:`STATES`).
    used: dict[str, int] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    #: What one more process is expected to take (the largest measured, once any is).
    per_process: int = 0

    @property
    def total(self) -> int:
        """Bytes all of them take."""
        return sum(self.used.values())


def tree_rss(roots: Iterable[int]) -> dict[int, int]:
    """The resident bytes of each root's process tree (root included); a root that is
    gone is left out."""
    wanted = set(roots)
    if not wanted:
        return {}
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for proc in psutil.process_iter(["ppid", "memory_info"]):
        info = proc.info
        memory = info.get("memory_info")
        if memory is None:
            continue  # gone, or not ours to read
        rss[proc.pid] = int(memory.rss)
        children.setdefault(int(info.get("ppid") or 0), []).append(proc.pid)
    found = {}
    for root in wanted & rss.keys():
        total, stack, seen = 0, [root], set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += rss.get(pid, 0)
            stack += children.get(pid, [])
        found[root] = total
    return found


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int:
    """This container's memory limit in bytes (cgroup v2 ``memory.max``, or v1's
    ``memory.limit_in_bytes``); 0 when there is none."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (root / name).read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return 0
        limit = int(text)
        return 0 if limit >= 1 << 60 else limit  # v1 writes "no limit" as a huge number
    return 0
