"""What an operator may do from the console, each recorded with the operator's name.

The console changes nothing itself. An answer, a kill or a close is an event for the
conductor, which owns the conversation, on ``inbound.operator.<conversation>`` (in order
with the conversation's messages); a dead letter is replayed the way ``podium replay``
does it. Every action is also kept on ``audit.<action>`` (:class:`OperatorAction`).
An action's event id comes from the form or the ``Idempotency-Key`` it was sent with,
so a form sent twice acts once (JetStream's de-duplication).
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from podium.common import replay
from podium.common.bus import publish
from podium.console.readmodel import Index
from podium.contracts import subjects
from podium.contracts.events import (
    OperatorAction,
    OperatorAnswer,
    OperatorClose,
    OperatorKill,
)
from podium.contracts.http import ActionResult
from podium.contracts.ids import new_id, stable_id
from podium.contracts.state import FINISHED

log = logging.getLogger(__name__)

MAX_ANSWER = 20_000


class ActionError(Exception):
    """An action that cannot be done: ``status`` and ``code`` for the answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


class Operations:
    """The console's actions."""

    def __init__(self, js: JetStreamContext, index: Index) -> None:
        self.js = js
        self.index = index

    async def answer(self, operator: str, conversation: str, text: str, key: str) -> ActionResult:
        """Answer an escalated (or any open) conversation."""
        self._conversation(conversation)
        text = text.strip()
        if not text:
            raise ActionError(422, "invalid", "the answer is empty")
        if len(text) > MAX_ANSWER:
            raise ActionError(413, "too_large", f"an answer is at most {MAX_ANSWER} characters")
        event_id = _event_id("answer", operator, conversation, key, text)
        event = OperatorAnswer(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            operator=operator,
            text=text,
        )
        await publish(self.js, subjects.operator_command(conversation), event)
        await self.audit(
            operator, "answer", conversation, target=conversation, detail=text, of=event_id
        )
        return ActionResult(ok=True, event_id=event_id)

    async def close(self, operator: str, conversation: str, reason: str, key: str) -> ActionResult:
        """Close a conversation: its open tasks are killed, no turn runs until someone
        writes again."""
        self._conversation(conversation)
        event_id = _event_id("close", operator, conversation, key, reason)
        event = OperatorClose(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            operator=operator,
            reason=reason.strip()[:2000],
        )
        await publish(self.js, subjects.operator_command(conversation), event)
        await self.audit(
            operator, "close", conversation, target=conversation, detail=reason, of=event_id
        )
        return ActionResult(ok=True, event_id=event_id)

    async def kill(self, operator: str, task_id: str, reason: str, key: str) -> ActionResult:
        """Kill a running task."""
        conv = self.index.task_owner(task_id)
        if conv is None:
            raise ActionError(404, "not_found", f"no task {task_id}")
        if conv.tasks[task_id].state in FINISHED:
            raise ActionError(409, "finished", f"task {task_id} is {conv.tasks[task_id].state}")
        event_id = _event_id("kill", operator, task_id, key, reason)
        event = OperatorKill(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conv.conversation_id,
            operator=operator,
            task_id=task_id,
            reason=reason.strip()[:2000],
        )
        await publish(self.js, subjects.operator_command(conv.conversation_id), event)
        await self.audit(
            operator, "kill", conv.conversation_id, target=task_id, detail=reason, of=event_id
        )
        return ActionResult(ok=True, event_id=event_id)

    async def replay(self, operator: str, seq: int, key: str) -> ActionResult:
        """Put dead letter ``seq`` through again (``podium replay deadletter SEQ``)."""
        letters = await replay.dead_letters(self.js, [seq])
        if not letters:
            raise ActionError(404, "not_found", f"no dead letter {seq}")
        _, letter = letters[0]
        again = replay.from_dead_letter(seq, letter)
        if key:
            # The same form (or Idempotency-Key) sent twice replays once.
            again.headers[subjects.HDR_MSG_ID] = stable_id("operator-replay", str(seq), key)
        stored = await replay.publish(self.js, [again])
        detail = f"{again.source} -> {again.subject}"
        msg_id = again.headers[subjects.HDR_MSG_ID]
        await self.audit(
            operator, "replay", letter.conversation_id, target=str(seq), detail=detail, of=msg_id
        )
        return ActionResult(ok=bool(stored), event_id=msg_id, detail=detail)

    async def audit(
        self,
        operator: str,
        action: str,
        conversation: str = "",
        *,
        target: str = "",
        detail: str = "",
        of: str = "",
    ) -> None:
        """Keep what an operator did (``audit.<action>``); ``of``: the action's event id,
        so an action sent twice is recorded once."""
        event_id = stable_id("audit", of) if of else new_id()
        event = OperatorAction(
            event_id=event_id,
            correlation_id=event_id,
            conversation_id=conversation,
            operator=operator,
            action=action,  # type: ignore[arg-type]
            target=target,
            detail=detail[:2000],
        )
        await publish(self.js, subjects.audit(action), event)
        log.info("operator action", extra={"operator": operator, "action": action})

    def _conversation(self, conversation: str) -> None:
        try:
            subjects.token(conversation)
        except ValueError as err:
            raise ActionError(404, "not_found", "no such conversation") from err
        if conversation not in self.index.conversations:
            raise ActionError(404, "not_found", "no such conversation")


def _event_id(action: str, operator: str, target: str, key: str, text: str) -> str:
    """The action's event id: the same for the same form (or Idempotency-Key) sent twice
    with the same text; a key reused with other text is another action."""
    if not key:
        return new_id()
    return stable_id("operator", action, operator, target, key, text)
