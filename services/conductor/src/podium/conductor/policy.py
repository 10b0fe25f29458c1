"""What the conductor agent may make Podium do, decided in code, not in the prompt.

Inbound text is untrusted: an email can ask the agent to mail a third party
or text a stranger. Whatever the agent answers, these checks run before a
command has any effect, and every refusal is logged, counted, told to the
agent on its next turn and escalated to the operator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from podium.conductor.config import ConductorSettings
from podium.contracts.events import utcnow
from podium.contracts.state import FINISHED, Conversation, TaskInfo

REFUSAL = (
    "Thank you for your message. This address only takes requests from registered "
    "senders, so we cannot act on it. This is an automatic reply."
)


@dataclass(frozen=True)
class Refusal:
    """Why an action is not allowed: a short reason (a metric label) and the detail."""

    reason: str
    detail: str


def _normal(address: str) -> str:
    """Addresses compare case-insensitively; numbers without spaces, dashes or dots."""
    value = address.strip().lower()
    if "@" not in value:
        value = re.sub(r"[\s().-]", "", value)
    return value


def _listed(address: str, entries: list[str]) -> bool:
    target = _normal(address)
    for entry in entries:
        allowed = _normal(entry)
        if allowed == target or (allowed.startswith("@") and target.endswith(allowed)):
            return True
    return False


class Policy:
    """The conductor's rules, from its settings."""

    def __init__(self, settings: ConductorSettings) -> None:
        self.settings = settings

    def sender_allowed(self, channel: str, sender: str, auth: str = "") -> bool:
        """Whether ``sender`` may give the platform work (API clients always may). An
        email's ``From:`` counts only as far as it is authenticated (``auth``, the
        ingress's verdict): see :meth:`authenticated`."""
        if channel == "api" or not self.settings.sender_allowlist:
            return True
        if not _listed(sender, self.settings.sender_allowlist):
            return False
        return channel != "email" or self.authenticated(sender, auth)

    def authenticated(self, sender: str, auth: str) -> bool:
        """Whether an email's ``From:`` may be believed, under PODIUM_SENDER_AUTH."""
        mode = self.settings.sender_auth
        domain = sender.rpartition("@")[2].lower()
        if mode == "off" or any(
            domain == d.lower().lstrip("@") or domain.endswith("." + d.lower().lstrip("@"))
            for d in self.settings.sender_auth_exempt_domains
        ):
            return True
        if mode == "prefer":
            return auth != "fail"
        return auth == "pass"

    def spoofed(self, channel: str, sender: str, auth: str) -> bool:
        """An allowlisted ``From:`` that did not authenticate: a spoofing attempt."""
        return (
            channel == "email"
            and bool(self.settings.sender_allowlist)
            and _listed(sender, self.settings.sender_allowlist)
            and not self.authenticated(sender, auth)
        )

    def may_write(self, conv: Conversation, address: str) -> Refusal | None:
        """Outbound mail and SMS go only to the conversation's people or the allowlist."""
        if _listed(address, conv.participants) or _listed(
            address, self.settings.outbound_allowlist
        ):
            return None
        return Refusal("recipient not allowed", f"{address} is not part of this conversation")

    def may_send(self, conv: Conversation, count: int = 1) -> Refusal | None:
        """The conversation's hourly outbound budget."""
        since = utcnow() - timedelta(hours=1)
        sent = sum(1 for o in conv.outbound if o.kind != "operator" and o.at >= since)
        limit = self.settings.max_outbound_per_hour
        if sent + count > limit:
            return Refusal(
                "outbound rate", f"{sent} messages sent in the last hour (limit {limit})"
            )
        return None

    def may_spend(self, conv: Conversation) -> Refusal | None:
        """New work stops once the conversation's spend reaches its limit."""
        limit = self.settings.max_spend_usd
        if conv.spend_usd >= limit:
            return Refusal("spend limit", f"${conv.spend_usd:.2f} spent (limit ${limit:.2f})")
        return None

    def may_spawn(self, conv: Conversation) -> Refusal | None:
        """A new task: open-task and spend limits."""
        open_tasks = sum(1 for t in conv.tasks.values() if t.state not in FINISHED)
        limit = self.settings.max_workers_per_conversation
        if open_tasks >= limit:
            return Refusal("too many open tasks", f"{open_tasks} tasks are open (limit {limit})")
        return self.may_spend(conv)

    def may_tell(self, task: TaskInfo | None, task_id: str, conv: Conversation) -> Refusal | None:
        """A follow-up: the task exists, is not over, has rounds left, and money is left."""
        if task is None:
            return Refusal("unknown task", f"there is no task {task_id}")
        if task.state in ("cancelled", "failed"):
            return Refusal("task is over", f"task {task_id} is {task.state}")
        rounds = self.settings.max_validation_rounds
        if task.state == "complete" and task.rounds >= rounds:
            return Refusal(
                "validation rounds exhausted", f"task {task_id} was sent back {task.rounds} times"
            )
        return self.may_spend(conv)
