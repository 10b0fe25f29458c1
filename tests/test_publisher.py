"""The ingress's hot-path publisher: stored durably with Podium's headers, duplicates
recognised, and a failure to store is an error, never a silent success."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.common import subjects
from podium.common.bus import Publisher, PublishError
from podium.common.events import InboundMessage, decode


def message(n: int) -> InboundMessage:
    return InboundMessage(
        event_id=f"e{n}",
        correlation_id=f"e{n}",
        conversation_id="sms-1",
        channel="sms",
        sender="+15550100001",
        text=f"hello {n}",
    )


async def test_stored_with_headers_and_duplicates_recognised(
    nc: Client, js: JetStreamContext
) -> None:
    publisher = await Publisher(nc).start()
    try:
        first = await publisher.publish(subjects.inbound("sms", "sms-1"), message(1))
        again = await publisher.publish(subjects.inbound("sms", "sms-1"), message(1))
        other = await publisher.publish(subjects.inbound("sms", "sms-1"), message(2))
    finally:
        await publisher.close()
    assert (first.stream, first.duplicate) == ("INBOUND", False)
    # A duplicate answers with the sequence of the message first stored.
    assert (again.seq, again.duplicate) == (first.seq, True)
    assert other.seq == first.seq + 1
    stored = await js.get_msg("INBOUND", first.seq)
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == "e1"
    assert stored.headers["Podium-Event"] == "inbound.message"
    event = decode(stored.data or b"")
    assert isinstance(event, InboundMessage)
    assert (event.event_id, event.text) == ("e1", "hello 1")


async def test_no_stream_is_an_error(nc: Client, js: JetStreamContext) -> None:
    await js.delete_stream("INBOUND")
    publisher = await Publisher(nc).start()
    try:
        with pytest.raises(PublishError, match="503"):
            await publisher.publish(subjects.inbound("sms", "sms-1"), message(1), timeout_s=2)
    finally:
        await publisher.close()
