"""The one backoff rule: exponential, capped, with jitter.

Every retry in Podium — a reconnect, a lease wait, a redelivery's delay, a record
write after a send, a store through a leader election — waits
``backoff(attempt, base=…, cap=…)``. The jitter (±20 %) keeps replicas that failed
together from retrying together.
"""

from __future__ import annotations

import random

#: How far a delay may stray either way from base * 2^(attempt - 1).
JITTER = 0.2


def backoff(attempt: int, *, base: float, cap: float, jitter: float = JITTER) -> float:
    """The delay before retry number ``attempt`` (1 = the first): ``base`` doubled for
    each earlier attempt, at most ``cap``, then spread by ``jitter`` (never above ``cap``)."""
    delay = min(base * 2.0 ** max(attempt - 1, 0), cap)
    spread = delay * random.uniform(1.0 - jitter, 1.0 + jitter)  # noqa: S311 - not a secret
    return min(spread, cap)
