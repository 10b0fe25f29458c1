"""Putting stored events through the platform again, safely (``podium replay``, the console).

Three cases (docs/operations.md shows the NATS CLI equivalent of each):

``podium replay stream STREAM SEQ…`` / ``--from A --to B``
    Re-publish stored messages to their original subject, as new messages.
``podium replay deadletter [--list] [SEQ… | --all]``
    Re-publish the original payload of dead letters (after fixing their cause).
``podium replay reset STREAM CONSUMER… [--seq N]``
    Rewind durable consumers (server 2.14+, ADR-60): everything from ``N`` on is
    delivered again to the service that owns them.

Why replay is safe: a replayed message gets a new ``Nats-Msg-Id`` (otherwise
JetStream's de-duplication would drop it) but keeps its payload, and with it
its event id, task id and command id. Those are the idempotency keys the
services check: the conductor skips an inbound event or result it already
handled (``Conversation.handled``), a worker republishes a finished task's
stored result instead of running it again, and the notifier never sends a
command id its outbox shows as sent (nor one that may have left, ``ambiguous``).
So a replay re-runs only what never completed, and sends nothing twice.
"""

from __future__ import annotations

import base64
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from podium.contracts import streams, subjects
from podium.contracts.events import DeadLetter, decode
from podium.contracts.ids import new_id

#: Header naming the stored message a replay came from (``STREAM:SEQ``).
HDR_REPLAY_OF = "Podium-Replay-Of"
# Headers the server sets or acts on; never copied into a replay.
_SERVER_HEADERS = ("Nats-Msg-Id", "Nats-Expected-", "Nats-Stream", "Nats-Sequence", "Nats-Time")


@dataclass(frozen=True)
class Replay:
    """One message to publish again."""

    source: str
    subject: str
    data: bytes
    headers: dict[str, str]


def original_subject(stream: str, stored: str) -> str:
    """The subject a message was published to, from the one it is stored under.

    INBOUND and RESULTS append the conductor partition when they store a
    message; a replay is published without it, so the server partitions it
    again (and a publisher never chooses a partition itself).
    """
    spec = next((s for s in streams.TOPOLOGY.streams if s.name == stream), None)
    if spec is None or spec.transform is None:
        return stored
    tokens = stored.split(".")
    if len(tokens) == len(spec.transform[0].split(".")) + 1:
        return ".".join(tokens[:-1])
    return stored


def replay_headers(headers: dict[str, str] | None, source: str, event_id: str) -> dict[str, str]:
    """The original headers, minus the server's, with a fresh ``Nats-Msg-Id``."""
    kept = {k: v for k, v in (headers or {}).items() if not k.startswith(_SERVER_HEADERS)}
    kept[HDR_REPLAY_OF] = source
    kept[subjects.HDR_MSG_ID] = f"replay-{new_id()}-{event_id}"[:200]
    return kept


def _event_id(data: bytes) -> str:
    try:
        return decode(data).event_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "undecodable"


async def from_stream(js: JetStreamContext, stream: str, seqs: Iterable[int]) -> list[Replay]:
    """Replays of stored messages ``seqs`` of ``stream`` (missing ones are skipped)."""
    found = []
    for seq in seqs:
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        if msg.subject is None or msg.data is None:
            continue
        source = f"{stream}:{seq}"
        found.append(
            Replay(
                source,
                original_subject(stream, msg.subject),
                msg.data,
                replay_headers(msg.headers, source, _event_id(msg.data)),
            )
        )
    return found


async def dead_letters(
    js: JetStreamContext, seqs: Iterable[int] | None = None
) -> list[tuple[int, DeadLetter]]:
    """Dead letters by sequence: ``seqs``, or every one stored."""
    if seqs is None:
        info = await js.stream_info(streams.DEADLETTER.name)
        if not info.state.messages:
            return []
        seqs = range(info.state.first_seq, info.state.last_seq + 1)
    letters = []
    for seq in seqs:
        try:
            msg = await js.get_msg(streams.DEADLETTER.name, seq)
        except NotFoundError:
            continue
        try:
            letter = decode(msg.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if isinstance(letter, DeadLetter):
            letters.append((seq, letter))
    return letters


def from_dead_letter(seq: int, letter: DeadLetter) -> Replay:
    """The replay of a dead letter's original message."""
    data = (
        base64.b64decode(letter.payload)
        if letter.payload_encoding == "base64"
        else letter.payload.encode("utf-8")
    )
    source = f"{letter.stream}:{letter.stream_seq} (dead letter {seq})"
    return Replay(
        source,
        original_subject(letter.stream, letter.subject),
        data,
        replay_headers(letter.headers, source, _event_id(data)),
    )


async def publish(js: JetStreamContext, replays: list[Replay]) -> int:
    """Publish ``replays`` durably; returns how many the streams stored."""
    stored = 0
    for r in replays:
        ack = await js.publish(r.subject, r.data, headers=r.headers)
        stored += 0 if ack.duplicate else 1
    return stored


def consumers_matching(stream: str, patterns: list[str]) -> list[str]:
    """Durable consumers of ``stream`` whose names match ``patterns`` (shell globs)."""
    names = [c.durable for c in streams.TOPOLOGY.consumers if c.stream == stream]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


async def reset(js: JetStreamContext, stream: str, consumers: list[str], seq: int) -> list[str]:
    """Rewind each consumer so delivery restarts at stream sequence ``seq`` (0: ack floor)."""
    done = []
    for name in consumers:
        result = await js.reset_consumer(stream, name, seq or None)
        done.append(f"{name}: next delivery at stream sequence >= {result.reset_seq}")
    return done
