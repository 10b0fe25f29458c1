"""Podium's one publish path (``bus.publish``, nats-py's ``js.publish``): stored durably
with Podium's headers, duplicates recognised, and a failure to store is an error,
never a silent success."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from podium.common.bus import publish
from podium.contracts import subjects
from podium.contracts.events import SCHEMA_VERSION, InboundMessage, decode


def message(n: int) -> InboundMessage:
    return InboundMessage(
        event_id=f"e{n}",
        correlation_id=f"e{n}",
        conversation_id="sms-1",
        channel="sms",
        sender="+15550100001",
        text=f"hello {n}",
    )


async def test_stored_with_headers_and_duplicates_recognised(js: JetStreamContext) -> None:
    first = await publish(js, subjects.inbound("sms", "sms-1"), message(1))
    again = await publish(js, subjects.inbound("sms", "sms-1"), message(1))
    other = await publish(js, subjects.inbound("sms", "sms-1"), message(2))
    assert first.stream == "INBOUND"
    assert not first.duplicate
    # A duplicate answers with the sequence of the message first stored.
    assert (again.seq, again.duplicate) == (first.seq, True)
    assert other.seq == first.seq + 1
    stored = await js.get_msg("INBOUND", first.seq)
    assert stored.headers is not None
    assert stored.headers["Nats-Msg-Id"] == "e1"
    assert stored.headers["Podium-Event"] == "inbound.message"
    assert stored.headers["Podium-Schema"] == str(SCHEMA_VERSION)
    assert stored.headers["Podium-Correlation-Id"] == "e1"
    event = decode(stored.data or b"")
    assert isinstance(event, InboundMessage)
    assert (event.event_id, event.text) == ("e1", "hello 1")


async def test_no_stream_is_an_error(js: JetStreamContext) -> None:
    await js.delete_stream("INBOUND")
    with pytest.raises(NoStreamResponseError):
        await publish(js, subjects.inbound("sms", "sms-1"), message(1), timeout_s=2)


async def test_a_reply_that_is_not_a_jetstream_ack_is_an_error(
    js: JetStreamContext, nc: Client
) -> None:
    # With the stream gone, something else that answers on the subject (a debugging
    # `nats reply`, a misconfigured service) must not pass for "stored".
    await js.delete_stream("INBOUND")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"{}")

    sub = await nc.subscribe("inbound.>", cb=answer)
    # The server must know the subscription before another connection publishes. One
    # flush is not enough: nats-py writes its PING straight to the socket, ahead of the
    # SUB still waiting in its buffer for the flusher task (seen: "no responders").
    # By the time the first PONG is back the flusher has run, so the second PING
    # follows the SUB.
    await nc.flush()
    await nc.flush()
    try:
        # nats-py cannot make a PubAck of it: the publish fails (the ingress answers 503).
        with pytest.raises(TypeError):
            await publish(js, subjects.inbound("sms", "sms-1"), message(1), timeout_s=2)
    finally:
        await sub.unsubscribe()
