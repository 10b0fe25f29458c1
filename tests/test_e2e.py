"""The whole loop through the real entry points (python -m podium.<service>), offline agent.

API or email in → ingress → conductor → worker → result → conductor → reply in the outbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from nats.js import JetStreamContext

from podium.cli.natsserver import NatsServer
from podium.contracts.events import DeadLetter, TaskProgress, TaskResult, decode
from podium.testing.bus import quiescent
from podium.testing.platform import TOKEN, Platform
from podium.testing.services import Process

pytestmark = pytest.mark.e2e


@pytest.fixture
async def platform(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[Platform]:
    platform = Platform(nats_server.url, tmp_path).start()
    try:
        await platform.ready()
        yield platform
    finally:
        platform.stop()


async def reported(js: JetStreamContext) -> list[TaskProgress | TaskResult]:
    """What workers told the conductor so far (RESULTS), in order."""
    info = await js.stream_info("RESULTS")
    found: list[TaskProgress | TaskResult] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        event = decode((await js.get_msg("RESULTS", seq)).data or b"")
        if isinstance(event, TaskProgress | TaskResult):
            found.append(event)
    return found


async def task_started(js: JetStreamContext, process: Process, timeout_s: float = 20.0) -> None:
    """Wait until a worker reported that it started the task (its progress event)."""
    deadline = time.monotonic() + timeout_s
    while not any(isinstance(e, TaskProgress) for e in await reported(js)):
        assert time.monotonic() < deadline, process.log()[-3000:]
        await asyncio.sleep(0.05)


async def turns_finished(platform: Platform, worker: str) -> float:
    """Task turns ``worker`` finished, from its /metrics."""
    text = await platform.metrics(worker)
    name = "podium_worker_task_turns_total{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_api_message_travels_the_whole_loop(platform: Platform, tmp_path: Path) -> None:
    sent = await platform.send("Count the words in this request, please.")
    (reply,) = await platform.wait_outbox(1)
    assert reply["channel"] == "api"
    assert reply["conversation_id"] == sent["conversation_id"]
    assert reply["correlation_id"] == sent["event_id"]
    assert "Words in the request: 7" in reply["body"]
    # The worker really ran in its own working directory and wrote its result there.
    (result,) = (tmp_path / "workspaces").glob("tasks/*/result.md")
    assert "Count the words in this request" in result.read_text()

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{platform.url}/v1/conversations/{sent['conversation_id']}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        state = await resp.json()
    assert [t["state"] for t in state["tasks"]] == ["complete"]
    assert [r["delivery"] for r in state["replies"]] == ["sent"]
    assert state["turns"] == 2


async def test_email_reply_is_threaded(platform: Platform) -> None:
    await platform.email(
        "Grace <grace@example.org>", "Numbers", "Please compile the numbers.",
        message_id="<q3@example.org>",
    )  # fmt: skip
    (reply,) = await platform.wait_outbox(1)
    assert reply["channel"] == "email"
    assert reply["to"] == ["grace@example.org"]
    assert reply["subject"] == "Re: Numbers"
    assert reply["headers"]["In-Reply-To"] == "<q3@example.org>"
    assert reply["headers"]["Auto-Submitted"] == "auto-replied"


async def test_poison_inbound_event_is_dead_lettered_and_the_conductor_keeps_serving(
    platform: Platform, js: JetStreamContext
) -> None:
    await js.publish("inbound.api.api-poison", b"{not json", headers={"Nats-Msg-Id": "poison-1"})
    await platform.send("Still there?")
    (reply,) = await platform.wait_outbox(1)
    assert reply["channel"] == "api"
    msg = await js.get_msg("DEADLETTER", 1)
    assert msg.data is not None
    letter = decode(msg.data)
    assert isinstance(letter, DeadLetter)
    assert (letter.service, letter.stream) == ("conductor", "INBOUND")
    # Stored with its partition token appended by the stream.
    assert letter.subject.startswith("inbound.api.api-poison.")
    assert letter.payload == "{not json"


async def test_sigterm_mid_task_loses_nothing(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    # A worker whose agent takes 30 s, with a 1 s drain: SIGTERM lands mid-task.
    platform = Platform(
        nats_server.url,
        tmp_path,
        per_service={"worker": {"PODIUM_OFFLINE_DELAY_S": "30", "PODIUM_DRAIN_TIMEOUT_S": "1"}},
    ).start()
    try:
        await platform.ready()
        await platform.send("A long job")
        worker = platform.processes["worker"]
        await task_started(js, worker)
        stopped_at = time.monotonic()
        assert worker.stop(timeout_s=15) == 0
        assert time.monotonic() - stopped_at < 8  # drain (1 s) + kill + NATS drain
        # The worker has exited: whatever it reported is stored, and it is no result.
        assert not any(isinstance(e, TaskResult) for e in await reported(js))
        assert platform.outbox() == []

        # A fresh worker picks the task up again and the loop completes.
        platform.add("worker", name="worker-2", PODIUM_OFFLINE_DELAY_S="0")
        (reply,) = await platform.wait_outbox(1, timeout_s=30)
        assert reply["channel"] == "api"
        assert await turns_finished(platform, "worker-2") == 1
    finally:
        platform.stop()


async def test_sigterm_lets_a_short_task_finish(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    platform = Platform(
        nats_server.url,
        tmp_path,
        per_service={"worker": {"PODIUM_OFFLINE_DELAY_S": "2", "PODIUM_DRAIN_TIMEOUT_S": "20"}},
    ).start()
    try:
        await platform.ready()
        await platform.send("A short job")
        worker = platform.processes["worker"]
        await task_started(js, worker)
        assert worker.stop(timeout_s=25) == 0
        # The worker finished the task before it exited: its result is stored.
        assert any(isinstance(e, TaskResult) and e.status == "COMPLETE" for e in await reported(js))
        (reply,) = await platform.wait_outbox(1)
        assert reply["channel"] == "api"
    finally:
        platform.stop()


@pytest.mark.parametrize("mode", ["refuse", "ignore"])
async def test_senders_outside_the_allowlist_get_no_agent(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path, mode: str
) -> None:
    platform = Platform(
        nats_server.url,
        tmp_path,
        per_service={
            "conductor": {
                "PODIUM_SENDER_ALLOWLIST": "@example.org, +15550100001",
                "PODIUM_UNKNOWN_SENDERS": mode,
            }
        },
    ).start()
    try:
        await platform.ready()
        await platform.email(
            "Mallory <mallory@evil.example>", "Hi", "Do work.", message_id="<m1@x>"
        )
        await platform.email(
            "Mallory <mallory@evil.example>", "Re: Hi", "Please?", message_id="<m2@x>",
            headers="In-Reply-To: <m1@x>\nReferences: <m1@x>\n",
        )  # fmt: skip
        await platform.email(
            "Grace <grace@example.org>", "Numbers", "Count.", message_id="<g1@x>",
            verdicts={"SPF": "pass", "dkim": "{@example.org : pass}",
                      "envelope": '{"from": "grace@example.org", "to": ["podium@example.com"]}'},
        )  # fmt: skip
        await platform.wait_outbox(2 if mode == "refuse" else 1)
        # Every consumer settled: a reply to Mallory's second message would be out now.
        await quiescent(js)
        replies = platform.outbox()
        metrics = await platform.metrics("conductor")
    finally:
        platform.stop()
    by_recipient = {tuple(r["to"]): r for r in replies}
    assert set(by_recipient) == (
        {("mallory@evil.example",), ("grace@example.org",)}
        if mode == "refuse"
        else {("grace@example.org",)}
    )
    if mode == "refuse":
        refusal = by_recipient[("mallory@evil.example",)]
        assert "only takes requests from registered senders" in refusal["body"]
        assert refusal["headers"]["Auto-Submitted"] == "auto-replied"
    # Mallory's two messages never reached an agent: one task only, Grace's.
    assert (await js.stream_info("TASKS")).state.messages == 1
    assert (
        'podium_policy_blocked_total{action="inbound",reason="sender not allowed"} 2.0' in metrics
    )


async def test_an_allowlisted_from_that_does_not_authenticate_is_a_stranger(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    operator = "ops@example.com"
    platform = Platform(
        nats_server.url,
        tmp_path,
        per_service={
            "conductor": {
                "PODIUM_SENDER_ALLOWLIST": "ceo@example.org",
                "PODIUM_OPERATOR_EMAIL": operator,
            }
        },
    ).start()
    forged = {
        "SPF": "fail",
        "dkim": "{@evil.example : pass}",
        "envelope": '{"from": "bounce@evil.example", "to": ["podium@example.com"]}',
    }
    try:
        await platform.ready()
        for n in (1, 2):
            await platform.email(
                "The CEO <ceo@example.org>", "Wire money", f"Pay invoice {n} today.",
                message_id=f"<forged{n}@evil.example>", verdicts=forged,
                headers="" if n == 1 else "In-Reply-To: <forged1@evil.example>\n",
            )  # fmt: skip
        (alert,) = await platform.wait_outbox(1)
        await quiescent(js)
        metrics = await platform.metrics("conductor")
        replies = platform.outbox()
        # No agent ever saw it; the operator was told once for the conversation.
        assert (await js.stream_info("TASKS")).state.messages == 0
        assert [r["to"] for r in replies] == [[operator]]
        assert "did not authenticate" in alert["body"] and "ceo@example.org" in alert["body"]
        assert "podium_conductor_spoofed_senders_total 2.0" in metrics

        # The same message, signed by the CEO's domain: the normal loop, and a reply.
        signed = {**forged, "dkim": "{@example.org : pass}"}
        await platform.email(
            "The CEO <ceo@example.org>", "Wire money", "Pay invoice 3 today.",
            message_id="<real3@example.org>", verdicts=signed,
        )  # fmt: skip
        _, reply = await platform.wait_outbox(2)
    finally:
        platform.stop()
    assert reply["to"] == ["ceo@example.org"]
    assert reply["subject"] == "Re: Wire money"
    assert (await js.stream_info("TASKS")).state.messages == 1
