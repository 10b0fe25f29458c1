"""Kill the notifier (SIGKILL) between the provider taking a message and the command's
acknowledgement; restart it; exactly one message has reached the provider."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common import provision
from podium.common.bus import publish
from podium.common.kv import Store
from podium.contracts import streams, subjects
from podium.contracts.events import DeliveryFailed, SendSms, decode
from podium.contracts.state import OutboxRecord
from podium.testing.services import Process, base_env
from podium.testing.twilio import FakeTwilio

ACCOUNT = "AC" + "1" * 32
AUTH = "twilio-auth-token-crash-test-0123"
pytestmark = pytest.mark.e2e


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    fake = await FakeTwilio(ACCOUNT, AUTH).start()
    try:
        yield fake
    finally:
        await fake.stop()


async def provision_fast_redelivery(js: JetStreamContext) -> None:
    """The real topology, but a crashed notifier's command comes back in 2 s, not 30."""
    fast = dataclasses.replace(streams.NOTIFIER_COMMANDS, ack_wait_s=2.0)
    topology = dataclasses.replace(
        streams.TOPOLOGY,
        consumers=tuple(
            fast if c.durable == fast.durable else c for c in streams.TOPOLOGY.consumers
        ),
    )
    await provision.provision(js, topology)


def notifier(nats: NatsServer, root: Path, twilio: FakeTwilio, run: int) -> Process:
    env = base_env(
        nats.url,
        root,
        PODIUM_PROVISION="false",
        PODIUM_SMS_TRANSPORT="twilio",
        PODIUM_SMS_FROM="+15550100999",
        PODIUM_TWILIO_ACCOUNT_SID=ACCOUNT,
        PODIUM_TWILIO_AUTH_TOKEN=AUTH,
        PODIUM_TWILIO_API_BASE=twilio.url,
        PODIUM_SEND_TIMEOUT_S="30",
    )
    # One log per run: the health port is read from the log.
    return Process("notifier", env, root / f"logs-{run}")


async def settled(js: JetStreamContext) -> None:
    """Wait until the notifier has acknowledged or terminated every command."""
    for _ in range(300):
        info = await js.consumer_info("COMMANDS", streams.NOTIFIER_COMMANDS.durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"commands never settled: {info}")


@pytest.mark.parametrize("moment", ["provider-holding-the-answer", "right-after-the-answer"])
async def test_killed_between_send_and_ack_sends_exactly_once(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    twilio: FakeTwilio,
    moment: str,
) -> None:
    await provision_fast_redelivery(js)
    if moment == "provider-holding-the-answer":
        # Twilio has the message but the answer never comes back before the kill.
        twilio.script.replies = ["hang"]
    first = notifier(nats_server, tmp_path, twilio, 1).start()
    try:
        await first.wait_ready()
        command = SendSms(
            event_id="c1",
            correlation_id="corr",
            conversation_id="sms-1",
            command_id="c1",
            to="+15550100001",
            body="Your table is booked for 8pm.",
        )
        await publish(js, subjects.command("sms", "sms-1"), command)
        await asyncio.wait_for(twilio.received.wait(), timeout=20)
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    twilio.release()

    second = notifier(nats_server, tmp_path, twilio, 2).start()
    try:
        await second.wait_ready()
        await settled(js)
    finally:
        second.stop()

    assert len(twilio.sent) == 1
    assert twilio.requests == 1
    store = await Store.open(js, streams.OUTBOX.name, OutboxRecord)
    found = await store.get("c1")
    assert found is not None
    record = found[0]
    if record.state == "ambiguous":
        # It may have gone out: not re-sent, and the conductor is told.
        info = await js.stream_info("RESULTS")
        assert info.state.messages == 1
        report = decode((await js.get_msg("RESULTS", info.state.last_seq)).data or b"")
        assert isinstance(report, DeliveryFailed)
        assert (report.outcome, report.command_id) == ("ambiguous", "c1")
        assert (await js.stream_info("DEADLETTER")).state.messages == 1
    else:
        assert moment == "right-after-the-answer"
        assert record.state == "sent"
        assert record.provider_id == twilio.sent[0].sid
