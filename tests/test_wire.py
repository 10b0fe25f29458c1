"""The direct publisher's own connection: what happens when the server goes away,
stalls, refuses, or sends its replies in arbitrary pieces.

Against a real nats-server (paused with SIGSTOP to hold acknowledgements back,
killed and restarted on the same port and store), and with the least-privileged
ingress user of deploy/nats/accounts.conf.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.common import subjects
from podium.common.bus import Publisher, PublishError
from podium.common.config import CommonSettings, Secret
from podium.common.events import InboundMessage
from podium.common.wire import DirectPublisher, open_publisher
from tests.conftest import NATS_PASSWORDS

SUBJECT = subjects.inbound("sms", "sms-1")


def message(n: int) -> InboundMessage:
    return InboundMessage(
        event_id=f"w{n}",
        correlation_id=f"w{n}",
        conversation_id="sms-1",
        channel="sms",
        sender="+15550100001",
        text=f"hello {n}",
    )


@contextmanager
def paused(server: NatsServer) -> Iterator[None]:
    """The server process stopped (SIGSTOP): it holds every reply until resumed."""
    pid = server._proc.pid  # type: ignore[union-attr]
    try:
        stop(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped.

    kill() returns before the signal is acted on: until every thread is stopped, the
    server (on the other core) may still answer a publish.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not all(_stopped(task) for task in Path(f"/proc/{pid}/task").iterdir()):
        assert time.monotonic() < deadline, "nats-server did not stop"
        time.sleep(0.001)


def _stopped(task: Path) -> bool:
    try:
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True  # a thread that ended
    return state in ("T", "t")


@pytest.fixture
async def direct(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[DirectPublisher]:
    publisher = await DirectPublisher([nats_server.url]).start()
    try:
        yield publisher
    finally:
        await publisher.close()


async def wait_connected(publisher: DirectPublisher, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not publisher.connected:
        assert time.monotonic() < deadline, "publisher did not reconnect"
        await asyncio.sleep(0.05)


async def test_no_acknowledgement_in_time_is_an_error_and_later_ones_still_work(
    nats_server: NatsServer, direct: DirectPublisher
) -> None:
    with paused(nats_server):
        started = time.monotonic()
        with pytest.raises(PublishError, match="no acknowledgement"):
            await direct.publish(SUBJECT, message(1), timeout_s=0.3)
        assert time.monotonic() - started < 2.0
    # The late acknowledgement of the first publish is ignored; a new one is answered.
    ack = await direct.publish(SUBJECT, message(2), timeout_s=5)
    assert ack.stream == "INBOUND"


async def test_lost_connection_fails_waiting_publishes_then_reconnects(
    nats_server: NatsServer, direct: DirectPublisher, nc: Client
) -> None:
    await direct.publish(SUBJECT, message(1))
    stop(nats_server._proc.pid)  # type: ignore[union-attr]
    waiting = asyncio.ensure_future(direct.publish(SUBJECT, message(2), timeout_s=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    nats_server.stop(kill=True)
    # Not a 30-second wait: the publish fails as soon as the connection is gone.
    with pytest.raises(PublishError, match="lost"):
        await asyncio.wait_for(waiting, 5)
    assert not direct.connected
    with pytest.raises(PublishError, match="not connected"):
        await direct.publish(SUBJECT, message(3))

    nats_server.start()
    await wait_connected(direct)
    ack = await direct.publish(SUBJECT, message(4))
    # Same store: the stream survived; message 2 may or may not have been stored
    # before the kill, and a retry with its id would be recognised either way.
    assert ack.stream == "INBOUND"
    retried = await direct.publish(SUBJECT, message(1))
    assert retried.duplicate


async def test_a_silent_connection_is_given_up_and_replaced(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    # A peer that vanished without closing the connection (a partition, a frozen
    # node) answers nothing: after pinging in vain the publisher drops it.
    publisher = await DirectPublisher([nats_server.url], idle_ping_s=0.3).start()
    try:
        with paused(nats_server):
            deadline = time.monotonic() + 5
            while publisher.connected:
                assert time.monotonic() < deadline, "silent connection kept"
                await asyncio.sleep(0.05)
        await wait_connected(publisher)
        assert (await publisher.publish(SUBJECT, message(1))).stream == "INBOUND"
        # An idle but healthy connection answers the pings and stays.
        await asyncio.sleep(1.5)
        assert publisher.connected
    finally:
        await publisher.close()


async def test_server_list_is_tried_in_turn(nats_server: NatsServer, js: JetStreamContext) -> None:
    from podium.cli.natsserver import free_port  # noqa: PLC0415

    nobody = f"nats://127.0.0.1:{free_port()}"
    publisher = await DirectPublisher([nobody, nats_server.url]).start()
    try:
        assert (await publisher.publish(SUBJECT, message(1))).stream == "INBOUND"
    finally:
        await publisher.close()
    with pytest.raises(PublishError, match="no NATS server answered"):
        await DirectPublisher([nobody]).start()


async def test_each_publish_keeps_its_own_timeout(
    nats_server: NatsServer, direct: DirectPublisher
) -> None:
    with paused(nats_server):
        slow = asyncio.ensure_future(direct.publish(SUBJECT, message(1), timeout_s=30))
        started = time.monotonic()
        with pytest.raises(PublishError, match="no acknowledgement"):
            await direct.publish(SUBJECT, message(2), timeout_s=0.3)
        # Not held back by the earlier publish's longer deadline.
        assert time.monotonic() - started < 2.0
        assert not slow.done()
    assert (await slow).stream == "INBOUND"


async def test_message_over_max_payload_is_refused_before_sending(
    direct: DirectPublisher,
) -> None:
    huge = InboundMessage(
        event_id="big", correlation_id="big", conversation_id="sms-1", channel="sms",
        sender="+1555", text="x" * (2 * 1024 * 1024),
    )  # fmt: skip
    with pytest.raises(PublishError, match="max_payload"):
        await direct.publish(SUBJECT, huge)
    assert (await direct.publish(SUBJECT, message(1))).stream == "INBOUND"


async def test_header_injection_is_refused(direct: DirectPublisher) -> None:
    forged = InboundMessage(
        event_id="e1", correlation_id="c1\r\nNats-Msg-Id: other", conversation_id="sms-1",
        channel="sms", text="hi", sender="+1555",
    )  # fmt: skip
    with pytest.raises(PublishError, match="invalid header value"):
        await direct.publish(SUBJECT, forged)


# --- the least-privileged ingress user --------------------------------------------


async def test_ingress_user_publishes_and_is_refused_fast_outside_its_rights(
    secure_nats: NatsServer, admin_js: JetStreamContext
) -> None:
    settings = CommonSettings(
        nats_url=secure_nats.url,
        nats_user="ingress",
        nats_password=Secret(NATS_PASSWORDS["ingress"]),
    )
    publisher = await open_publisher(None, settings, name="ingress")  # type: ignore[arg-type]
    assert isinstance(publisher, DirectPublisher)
    try:
        ack = await publisher.publish(SUBJECT, message(1))
        assert ack.stream == "INBOUND"
        started = time.monotonic()
        with pytest.raises(PublishError, match="Permissions Violation"):
            await publisher.publish("tasks.t1", message(2), timeout_s=10)
        assert time.monotonic() - started < 5.0
        # The refusal concerned that publish only.
        assert (await publisher.publish(SUBJECT, message(3))).stream == "INBOUND"
    finally:
        await publisher.close()


async def test_wrong_password_or_foreign_inbox_stops_the_start(
    secure_nats: NatsServer, admin_js: JetStreamContext
) -> None:
    with pytest.raises(PublishError, match="Authorization Violation"):
        await DirectPublisher([secure_nats.url], user="ingress", password="wrong").start()
    # Each service may read replies on its own inbox only.
    with pytest.raises(PublishError, match="Permissions Violation for Subscription"):
        await DirectPublisher(
            [secure_nats.url],
            user="ingress",
            password=NATS_PASSWORDS["ingress"],
            inbox_prefix=subjects.inbox_prefix("notifier"),
        ).start()


async def test_tls_creds_or_token_use_the_nats_py_connection(nc: Client) -> None:
    for config in (
        CommonSettings(nats_url="tls://127.0.0.1:4222"),
        # A token in the URL: never sent as a user name (it would land in the server's log).
        CommonSettings(nats_url="nats://s3cr3t-token@127.0.0.1:4222"),
        CommonSettings(nats_url="nats://127.0.0.1:1", nats_creds="/etc/podium/ingress.creds"),
    ):
        publisher = await open_publisher(nc, config, name="ingress")
        assert isinstance(publisher, Publisher)
        await publisher.close()


# --- the parser ------------------------------------------------------------------


class Capture:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass


def server_bytes(prefix: bytes, tokens: list[bytes]) -> bytes:
    """What a server sends: acks as HMSG and MSG, a status-only reply, PINGs, +OK."""
    out = bytearray(b"+OK\r\n")
    for i, token in enumerate(tokens):
        payload = b'{"stream":"INBOUND","seq":%d}' % (i + 1)
        if i % 3 == 0:
            out += b"MSG %s%s 1 %d\r\n%s\r\n" % (prefix, token, len(payload), payload)
        elif i % 3 == 1:
            header = b"NATS/1.0\r\nX: y\r\n\r\n"
            out += b"HMSG %s%s 1 %d %d\r\n%s%s\r\n" % (
                prefix, token, len(header), len(header) + len(payload), header, payload,
            )  # fmt: skip
        else:
            header = b"NATS/1.0 503\r\n\r\n"
            out += b"HMSG %s%s 1 %d %d\r\n%s\r\n" % (
                prefix, token, len(header), len(header), header,
            )  # fmt: skip
        out += b"PING\r\n"
    return bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=40))
def test_replies_split_anywhere_resolve_the_same(cuts: list[int]) -> None:
    async def run() -> None:
        publisher = DirectPublisher(["nats://127.0.0.1:4222"])
        transport = Capture()
        publisher._transport = transport  # type: ignore[assignment]
        publisher._handshake = None
        tokens = [str(i).encode() for i in range(1, 10)]
        futures = {}
        for token in tokens:
            future = asyncio.get_running_loop().create_future()
            publisher._waiting[token] = (future, b"inbound.sms.x", float("inf"))
            futures[token] = future
        data = server_bytes(publisher._prefix_b, tokens)
        points = sorted({c % len(data) for c in cuts} | {0, len(data)})
        for start, end in itertools.pairwise(points):
            publisher._feed(data[start:end])
        for i, token in enumerate(tokens):
            headers, payload = futures[token].result()
            if i % 3 == 2:
                assert (headers[9:12], payload) == (b"503", b"")
            else:
                assert payload == b'{"stream":"INBOUND","seq":%d}' % (i + 1)
        assert bytes(transport.written) == b"PONG\r\n" * len(tokens)
        assert not publisher._buf

    asyncio.run(run())
