"""Child processes that never outlive their parent and die as a group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """In a child (``preexec_fn``): ask Linux to send ``sig`` when the parent dies.

    Even a SIGKILLed parent then takes its agents and servers with it, so no
    orphan keeps a session open or a port bound. A no-op off Linux.
    """
    if sys.platform != "linux":
        return
    import ctypes  # noqa: PLC0415

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, sig)


def not_dumpable() -> bool:
    """Make this process's memory and ``/proc/<pid>/environ`` unreadable to other processes
    of the same user (``PR_SET_DUMPABLE`` 0): agents it starts run as that user, and its
    environment holds credentials (a NATS password, git tokens). Children get their own
    flag back at ``exec``. True if it was set (Linux only)."""
    if sys.platform != "linux":
        return False
    import ctypes  # noqa: PLC0415

    pr_set_dumpable = 4
    try:
        return bool(ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_dumpable, 0) == 0)
    except (OSError, AttributeError):
        return False


def killpg(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group; quiet if it is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def kill_group(proc: asyncio.subprocess.Process, grace_s: float = 2.0) -> None:
    """SIGTERM the process's group, SIGKILL whatever is left after ``grace_s``, reap it.

    The process must have been started with ``start_new_session=True`` (it leads
    its own group), so tools it started die with it.
    """
    try:
        if proc.returncode is None:
            killpg(proc.pid, signal.SIGTERM)
            async with asyncio.timeout(grace_s):
                await proc.wait()
    except TimeoutError:
        pass
    finally:
        # Children may outlive the leader: the whole group gets SIGKILL regardless, even
        # when this clean-up is itself cancelled (a second kill, a shutdown) mid-wait.
        killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()
