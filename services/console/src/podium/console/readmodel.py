"""What the console shows, read from what its owners keep on the bus.

- **Conversations** (and their tasks): the conductor's ``conversations`` bucket, listed
  once and then followed (a KV watch), so pages update the moment the conductor writes.
- **A conversation's timeline**: the events stored under its subjects, read when the page
  asks (ordered consumers filtered by conversation): its inbound messages and operators'
  actions (INBOUND), the conductor's turns (TURNS), the workers' reports (RESULTS) and
  the commands sent (COMMANDS), with the delivery states of the notifier's ``replies``
  read model. Nothing is joined from another service's private records.
- **Spend by day**: turn and task costs from TURNS and RESULTS, followed from 30 days ago.
- **Dead letters**: DEADLETTER, newest first.

The console keeps no state of its own on the bus: this is all memory, rebuilt at start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE

from podium.common.kv import Store
from podium.common.runtime import Spawn
from podium.contracts import streams, subjects
from podium.contracts.events import (
    AnyEvent,
    ApiReply,
    DeadLetter,
    DeliveryFailed,
    InboundMessage,
    OperatorAnswer,
    OperatorClose,
    OperatorKill,
    SendEmail,
    SendSms,
    TaskProgress,
    TaskResult,
    TurnRecorded,
    decode,
)
from podium.contracts.http import (
    Amount,
    ConversationSummary,
    DeadLetterView,
    Section,
    SpendView,
    TaskView,
    TimelineEntry,
)
from podium.contracts.state import (
    FINISHED,
    Conversation,
    ConversationReplies,
    ReplyView,
    TaskInfo,
)

log = logging.getLogger(__name__)

#: How far back spend by day goes.
SPEND_DAYS = 30
#: How long a timeline waits for the next stored event before showing what it has.
STORED_WAIT_S = 5.0
_CONVERSATION = msgspec.json.Decoder(Conversation)


class Index:
    """Every conversation as the conductor last wrote it, followed live."""

    def __init__(self, js: JetStreamContext, max_spend_usd: float) -> None:
        self.js = js
        self.max_spend_usd = max_spend_usd
        self.conversations: dict[str, Conversation] = {}
        #: Set once every stored conversation has been read (the pages wait for it).
        self.loaded = asyncio.Event()
        #: Why the console cannot follow the conversations now ("" while it can).
        self.problem = ""
        self._listeners: set[asyncio.Queue[str]] = set()
        self.replies: Store[ConversationReplies] | None = None

    async def start(self, spawn: Spawn) -> None:
        """Bind the buckets and start following the conversations."""
        self.replies = await Store.open(self.js, streams.REPLIES.name, ConversationReplies)
        spawn(self._follow(), "watch:conversations")

    def listen(self) -> asyncio.Queue[str]:
        """A queue that gets the id of every conversation that changes (a page's feed)."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self._listeners.add(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue[str]) -> None:
        """Stop feeding ``queue``."""
        self._listeners.discard(queue)

    def hang_up(self) -> None:
        """Tell every feed to end (``""``): the console is stopping."""
        for queue in list(self._listeners):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait("")

    async def _follow(self) -> None:
        while True:
            watcher = None
            try:
                kv = await self.js.key_value(streams.CONVERSATIONS.name)
                watcher = await kv.watchall()
                self.problem = ""
                # A watch (again) starts with every conversation as it is now: what was
                # deleted while it was cut off goes once that first read is complete.
                seen: set[str] | None = set()
                async for entry in watcher:
                    if entry is None:
                        if seen is not None:
                            for gone in set(self.conversations) - seen:
                                self._apply(gone, None, KV_DEL)
                            seen = None
                        self.loaded.set()
                        continue
                    if seen is not None:
                        seen.add(entry.key)
                    self._apply(entry.key, entry.value, entry.operation)
            except asyncio.CancelledError:
                raise
            except ConnectionClosedError:
                return  # the service is stopping
            except Exception as err:  # noqa: BLE001 - follow again; readiness says why
                self.problem = f"cannot follow the conversations bucket: {err!r}"
                log.warning("conversation watch failed", extra={"error": repr(err)})
                await asyncio.sleep(2.0)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]

    def _apply(self, key: str, value: bytes | None, operation: str | None) -> None:
        if operation in (KV_DEL, KV_PURGE) or not value:
            self.conversations.pop(key, None)
        else:
            try:
                self.conversations[key] = _CONVERSATION.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                log.warning("unreadable conversation", extra={"key": key, "error": str(err)})
                return
        for queue in list(self._listeners):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(key)

    # --- the pages' views -----------------------------------------------------

    def summary(self, conv: Conversation) -> ConversationSummary:
        """How the conversations page lists ``conv``."""
        participants = conv.participants or ([conv.client] if conv.client else [])
        return ConversationSummary(
            conversation_id=conv.conversation_id,
            channel=conv.channel,
            participants=participants,
            subject=conv.subject,
            preview=" ".join(request_text(conv.original_request)[:400].split())[:120],
            state=conv.state,
            escalation=conv.escalation,
            open_tasks=sum(1 for t in conv.tasks.values() if t.state not in FINISHED),
            tasks=len(conv.tasks),
            turns=conv.turns,
            last_activity=conv.updated_at,
            spend_usd=round(conv.spend_usd, 6),
            over_limit=conv.spend_usd >= self.max_spend_usd,
        )

    def search(
        self, *, state: str = "", channel: str = "", text: str = ""
    ) -> list[ConversationSummary]:
        """Conversations, the most recently active first, filtered by state, channel, and
        text found in a participant, the subject or the first request."""
        needle = text.strip().lower()
        found = []
        for conv in self.conversations.values():
            if (state and conv.state != state) or (channel and conv.channel != channel):
                continue
            if needle:
                haystack = " ".join(
                    [*conv.participants, conv.client, conv.subject, conv.original_request]
                ).lower()
                if needle not in haystack:
                    continue
            found.append(self.summary(conv))
        found.sort(key=lambda s: s.last_activity, reverse=True)
        return found

    def tasks(self) -> list[TaskView]:
        """Every task of every conversation, the most recently changed first."""
        views = [
            task_view(conv.conversation_id, info)
            for conv in self.conversations.values()
            for info in conv.tasks.values()
        ]
        views.sort(key=lambda t: t.updated_at, reverse=True)
        return views

    def task_owner(self, task_id: str) -> Conversation | None:
        """The conversation a task belongs to."""
        for conv in self.conversations.values():
            if task_id in conv.tasks:
                return conv
        return None

    def spend(self, by_day: dict[str, float]) -> SpendView:
        """Spend by day (from the streams), by sender and by conversation (the conductor's
        own accounts), against the per-conversation limit."""
        senders: dict[str, float] = collections.defaultdict(float)
        conversations: list[Amount] = []
        for conv in self.conversations.values():
            who = (conv.participants or [conv.client or "?"])[0]
            senders[who] += conv.spend_usd
            conversations.append(
                Amount(
                    key=conv.conversation_id,
                    usd=round(conv.spend_usd, 6),
                    over_limit=conv.spend_usd >= self.max_spend_usd,
                )
            )
        conversations.sort(key=lambda a: a.usd, reverse=True)
        return SpendView(
            limit_per_conversation_usd=self.max_spend_usd,
            total_usd=round(sum(c.spend_usd for c in self.conversations.values()), 6),
            by_day=[Amount(key=day, usd=round(usd, 6)) for day, usd in sorted(by_day.items())],
            by_sender=[
                Amount(key=k, usd=round(v, 6))
                for k, v in sorted(senders.items(), key=lambda kv: kv[1], reverse=True)[:100]
            ],
            by_conversation=conversations[:100],
        )


#: The sender's own words in a request block: between its fences (podium.agents.protocol).
_FENCED = re.compile(r"<untrusted[^>\n]*>\n(.*?)\n</untrusted>", re.DOTALL)


def request_text(block: str) -> str:
    """What the sender wrote, from the block the conductor was given (the whole block when
    it has no fenced part)."""
    found = _FENCED.search(block)
    return found.group(1) if found else block


def task_view(conversation_id: str, info: TaskInfo) -> TaskView:
    """A task of a conversation, as the pages show it."""
    return TaskView(
        task_id=info.task_id,
        conversation_id=conversation_id,
        state=info.state,
        instructions=info.instructions,
        summary=info.summary,
        cost_usd=round(info.cost_usd, 6),
        created_at=info.created_at,
        updated_at=info.updated_at,
    )


# --- reading what is stored ---------------------------------------------------------


async def stored(js: JetStreamContext, stream: str, subject: str, limit: int) -> list[Msg]:
    """The last ``limit`` messages ``stream`` holds under ``subject``, oldest first.

    An ordered consumer reads them and goes; none is made when nothing is stored there.
    """
    info = await js.stream_info(stream, subjects_filter=subject)
    if not sum((info.state.subjects or {}).values()):
        return []
    found: collections.deque[Msg] = collections.deque(maxlen=limit)
    sub = await js.subscribe(
        subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        # Until nothing is pending: what was stored since the count above is read too.
        while True:
            try:
                msg = await sub.next_msg(timeout=STORED_WAIT_S)
            except TimeoutError:
                log.warning("stored events cut short", extra={"subject": subject})
                break  # shown as far as it was read
            found.append(msg)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return list(found)


async def timeline(
    js: JetStreamContext, conversation_id: str, replies: ReplyLookup, limit: int
) -> list[TimelineEntry]:
    """Everything stored of a conversation, in time order (see the module docstring)."""
    entries: list[TimelineEntry] = []
    for stream, filters in subjects.of_conversation(conversation_id).items():
        for subject in filters:
            for msg in await stored(js, stream, subject, limit):
                try:
                    event = decode(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                entry = describe(event, replies)
                if entry is not None:
                    entries.append(entry)
    entries.sort(key=lambda e: e.at)
    return entries


ReplyLookup = Callable[[str], ReplyView | None]


def describe(event: AnyEvent, replies: ReplyLookup) -> TimelineEntry | None:
    """One stored event as a timeline entry."""
    match event:
        case InboundMessage():
            facts: dict[str, str] = {"channel": event.channel}
            if event.channel == "email":
                facts["authentication"] = event.sender_auth or "none"
                if event.sender_auth_detail:
                    facts["authentication detail"] = event.sender_auth_detail
            if event.subject:
                facts["subject"] = event.subject
            files = [f"{m.filename or m.url} ({m.content_type or '?'})" for m in event.media]
            return TimelineEntry(
                at=event.at,
                kind="inbound",
                title=f"{event.channel} from {event.sender}",
                facts=facts,
                items=files,
                sections=[Section(label="message", text=event.text)],
            )
        case OperatorAnswer():
            return TimelineEntry(
                at=event.at,
                kind="operator",
                title=f"{event.operator} answered",
                sections=[Section(label="answer", text=event.text)],
            )
        case OperatorKill() | OperatorClose():
            what = (
                f"killed task {event.task_id}"
                if isinstance(event, OperatorKill)
                else "closed the conversation"
            )
            return TimelineEntry(
                at=event.at,
                kind="operator",
                title=f"{event.operator} {what}",
                sections=[Section(label="reason", text=event.reason)] if event.reason else [],
            )
        case TurnRecorded():
            return TimelineEntry(
                at=event.at,
                kind="turn",
                title=f"conductor turn ({event.trigger})",
                facts={
                    "outcome": event.outcome,
                    "duration": f"{event.duration_ms} ms",
                    "tokens": f"{event.input_tokens} in, {event.output_tokens} out",
                    "cost": f"${event.cost_usd:.4f}",
                    # A rotated (or lost) session: this turn began a new one.
                    **({"new session": event.new_session} if event.new_session else {}),
                },
                items=[
                    *event.commands,
                    *(f"refused: {r}" for r in event.refused),
                    *(f"escalated: {e}" for e in event.escalations),
                ],
                sections=[
                    Section(label="given", text=event.prompt),
                    Section(label="answered", text=event.answer),
                ],
            )
        case TaskProgress():
            return TimelineEntry(
                at=event.at, kind="progress", title=f"task {event.task_id}: {event.note}"
            )
        case TaskResult():
            return TimelineEntry(
                at=event.at,
                kind="result",
                title=f"task {event.task_id}: {event.status}",
                facts={"cost": f"${event.cost_usd:.4f}", "duration": f"{event.duration_ms} ms"},
                items=[*event.facts, *(f"Artifact: {a.ref}" for a in event.artifacts)],
                sections=[
                    Section(label="summary", text=event.summary),
                    Section(label="details", text=event.details),
                ],
            )
        case DeliveryFailed():
            return TimelineEntry(
                at=event.at,
                kind="undelivered",
                title=f"{event.channel} {event.command_id} not delivered ({event.outcome})",
                sections=[Section(label="why", text=event.reason)],
            )
        case SendEmail() | SendSms() | ApiReply():
            return _outbound(event, replies)
    return None


def _outbound(event: SendEmail | SendSms | ApiReply, replies: ReplyLookup) -> TimelineEntry:
    kind: str
    to: str
    subject: str
    match event:
        case SendEmail():
            kind = "email to the operator" if event.operator else "email"
            to, subject = ", ".join(event.to), event.subject
        case SendSms():
            kind, to, subject = "sms", event.to, ""
        case ApiReply():
            kind, to, subject = "API reply", event.client, ""
    view = replies(event.command_id)
    facts = {"command": event.command_id}
    if subject:
        facts["subject"] = subject
    if view is not None:
        facts["delivery"] = view.delivery + (
            f" ({view.provider_status})" if view.provider_status else ""
        )
    return TimelineEntry(
        at=event.at,
        kind="outbound",
        title=f"{kind} to {to}",
        facts=facts,
        items=[f"Attachment: {a.ref} ({a.size} bytes)" for a in event.attachments],
        sections=[Section(label="message", text=event.body)],
    )


class Spend:
    """Turn and task costs by day, followed from TURNS and RESULTS (each stored once)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        #: Per followed subject: cost by day (a feed that starts again starts from zero).
        self._feeds: dict[str, dict[str, float]] = {}

    @property
    def by_day(self) -> dict[str, float]:
        """Cost by day (UTC), both feeds together."""
        total: dict[str, float] = collections.defaultdict(float)
        for feed in self._feeds.values():
            for day, usd in feed.items():
                total[day] += usd
        return total

    async def start(self, spawn: Spawn) -> None:
        """Follow both streams from :data:`SPEND_DAYS` ago."""
        for stream, subject in (
            (streams.TURNS.name, subjects.TURNS_ALL),
            (streams.RESULTS.name, subjects.RESULTS_ALL),
        ):
            spawn(self._follow(stream, subject), f"spend:{subject}")

    async def _follow(self, stream: str, subject: str) -> None:
        while True:
            sub = None
            since = datetime.now(UTC) - timedelta(days=SPEND_DAYS)
            feed: dict[str, float] = collections.defaultdict(float)
            self._feeds[subject] = feed
            try:
                sub = await self.js.subscribe(
                    subject,
                    stream=stream,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.BY_START_TIME,
                    config=_start_at(since),
                )
                while True:
                    try:
                        msg = await sub.next_msg(timeout=30.0)
                    except TimeoutError:
                        continue
                    _count(feed, msg)
            except asyncio.CancelledError:
                raise
            except ConnectionClosedError:
                return  # the service is stopping
            except Exception as err:  # noqa: BLE001 - follow again
                log.warning("spend feed failed", extra={"error": repr(err)})
                await asyncio.sleep(2.0)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()


def _count(feed: dict[str, float], msg: Msg) -> None:
    try:
        event = decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    if isinstance(event, TurnRecorded | TaskResult):
        feed[event.at.astimezone(UTC).date().isoformat()] += event.cost_usd


def _start_at(since: datetime) -> ConsumerConfig:
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)


async def dead_letters(js: JetStreamContext, limit: int = 200) -> list[DeadLetterView]:
    """The newest dead letters (at most ``limit``), newest first."""
    info = await js.stream_info(streams.DEADLETTER.name)
    views: list[DeadLetterView] = []
    if not info.state.messages:
        return views
    seq = info.state.last_seq
    started = time.monotonic()
    while seq >= info.state.first_seq and len(views) < limit and time.monotonic() - started < 5:
        found = await dead_letter(js, seq)
        if found is not None:
            views.append(found[0])
        seq -= 1
    return views


async def dead_letter(js: JetStreamContext, seq: int) -> tuple[DeadLetterView, DeadLetter] | None:
    """Dead letter ``seq``, as listed and in full; None if there is none."""
    try:
        msg = await js.get_msg(streams.DEADLETTER.name, seq)
        letter = decode(msg.data or b"")
    except (NotFoundError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not isinstance(letter, DeadLetter):
        return None
    view = DeadLetterView(
        seq=seq,
        at=letter.at,
        service=letter.service,
        stream=letter.stream,
        stream_seq=letter.stream_seq,
        subject=letter.subject,
        deliveries=letter.deliveries,
        reason=letter.reason,
        conversation_id=letter.conversation_id,
    )
    return view, letter
