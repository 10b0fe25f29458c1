"""Events: one tagged union, JSON on the wire, yesterday's payloads still decode."""

from __future__ import annotations

import json

import msgspec
import pytest

from podium.contracts.events import (
    ApiReply,
    DeadLetter,
    DeliveryFailed,
    EventIds,
    InboundMessage,
    KillTask,
    SendEmail,
    SendSms,
    TaskFollowup,
    TaskRequested,
    TaskResult,
    decode,
    encode,
    event_type,
)
from podium.contracts.ids import conversation_id, short_id, stable_id
from podium.contracts.state import OutboxRecord

IDS = EventIds(event_id="e1", correlation_id="c1", conversation_id="api-1")

EXAMPLES = [
    InboundMessage(**IDS, channel="email", sender="a@example.com", text="hi", subject="s"),
    TaskRequested(**IDS, task_id="t1", instructions="do it"),
    TaskFollowup(**IDS, task_id="t1", message="more"),
    TaskResult(**IDS, task_id="t1", status="COMPLETE", summary="done", details="x"),
    SendEmail(**IDS, command_id="k1", to=["a@example.com"], subject="Re: s", body="b"),
    SendSms(**IDS, command_id="k2", to="+15550100", body="b"),
    ApiReply(**IDS, command_id="k3", client="c", thread_id="th", body="b"),
    KillTask(**IDS, task_id="t1"),
    DeadLetter(
        **IDS,
        service="worker",
        stream="TASKS",
        consumer="worker-tasks",
        subject="tasks.t1",
        stream_seq=3,
        deliveries=5,
        reason="r",
    ),
    DeliveryFailed(
        **IDS,
        command_id="k2",
        channel="sms",
        to=["+15550100"],
        outcome="suppressed",
        reason="opted out",
        provider_code="21610",
    ),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: event_type(e))
def test_round_trip_keeps_every_field(event: object) -> None:
    data = encode(event)  # type: ignore[arg-type]
    assert json.loads(data)["type"] == event_type(event)  # type: ignore[arg-type]
    assert decode(data) == event


# Payloads as schema version 1 wrote them. They must keep decoding: evolve events by
# appending fields with defaults only.
YESTERDAY = [
    b'{"type":"inbound.message","event_id":"e","correlation_id":"e","conversation_id":"sms-1",'
    b'"at":"2026-11-01T10:00:00Z","channel":"sms","sender":"+15550100","text":"hello"}',
    b'{"type":"task.requested","event_id":"e","correlation_id":"e","conversation_id":"c",'
    b'"at":"2026-11-01T10:00:00Z","task_id":"t1","instructions":"x"}',
    b'{"type":"task.result","event_id":"e","correlation_id":"e","conversation_id":"c",'
    b'"at":"2026-11-01T10:00:00Z","task_id":"t1","status":"NEEDS_INPUT","summary":"q"}',
    b'{"type":"command.email","event_id":"e","correlation_id":"e","conversation_id":"c",'
    b'"at":"2026-11-01T10:00:00Z","command_id":"k","to":["a@b.c"],"subject":"s","body":"b"}',
    # Media before it could name a stored object.
    b'{"type":"inbound.message","event_id":"e","correlation_id":"e","conversation_id":"email-1",'
    b'"channel":"email","sender":"a@b.c","text":"see attached",'
    b'"media":[{"filename":"q3.pdf","content_type":"application/pdf","size":10}]}',
    # The first delivery failure report (issue 5): only the required fields.
    b'{"type":"delivery.failed","event_id":"e","correlation_id":"e","conversation_id":"sms-1",'
    b'"command_id":"k","channel":"sms","outcome":"ambiguous"}',
]


@pytest.mark.parametrize("payload", YESTERDAY)
def test_payloads_of_schema_1_still_decode(payload: bytes) -> None:
    event = decode(payload)
    assert event.event_id == "e"


def test_unknown_type_and_bad_fields_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(b'{"type":"fax.received","event_id":"e"}')
    with pytest.raises(msgspec.ValidationError):
        decode(
            b'{"type":"task.result","event_id":"e","correlation_id":"e","conversation_id":"c",'
            b'"task_id":"t","status":"MAYBE","summary":"s"}'
        )
    with pytest.raises(msgspec.DecodeError):
        decode(b"\x00\xff not json")


def test_outbox_records_of_schema_1_still_decode() -> None:
    old = (
        b'{"command_id":"k","state":"sent","transport":"smtp","attempts":1,'
        b'"provider_id":"<k@x>","error":"","updated_at":"2026-11-01T10:00:00Z"}'
    )
    record = msgspec.json.decode(old, type=OutboxRecord)
    assert (record.state, record.delivery, record.parts) == ("sent", "", {})


def test_stable_ids_never_change() -> None:
    # Event, conversation and task ids derived from providers' ids are stored in
    # streams and buckets and used for de-duplication: a release that changed them
    # would answer a redelivered message twice and split conversations in two.
    assert stable_id("twilio", "SM0123") == "1049e4c5270ce779b94967209ec47b1e"
    assert conversation_id("sms", "+15550100001", "+15550100999") == "sms-f33092a5886ff69865ecad9a"
    assert short_id("e1", "SPAWN", "") == "tfb299c5e4957"
    # The separator keeps the parts apart.
    assert stable_id("ab", "c") != stable_id("a", "bc")
