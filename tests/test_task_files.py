"""A task's files: the conversation's attachments under ``inputs/``, its ``outputs/`` kept as
artifacts, and the conductor's ``ATTACH`` putting them on the turn's message."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.cli.natsserver import NatsServer
from podium.common.bus import publish
from podium.common.metrics import Metrics
from podium.conductor import commands as cmds
from podium.conductor.actions import Actions, Effects
from podium.conductor.config import ConductorSettings
from podium.conductor.metrics import ConductorMetrics
from podium.contracts import streams, subjects
from podium.contracts.events import (
    Artifact,
    Channel,
    EventIds,
    InboundMessage,
    Media,
    SendEmail,
    SendSms,
    TaskRequested,
    TaskResult,
    decode,
)
from podium.contracts.state import Conversation
from podium.testing.services import Running, in_process
from podium.worker.config import WorkerSettings
from podium.worker.files import collect_artifacts, safe_name
from podium.worker.service import WorkerService

CSV = b"sku,price\nA-1,10.00\nB-2,12.50\n"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def test_names_from_outside_become_one_safe_component() -> None:
    taken: set[str] = set()
    assert safe_name("../../etc/passwd", taken) == "passwd"
    assert safe_name("C:\\Users\\me\\prices.csv", taken) == "prices.csv"
    assert safe_name("prices.csv", taken) == "prices-2.csv"
    assert safe_name(".bashrc", taken) == "bashrc"
    assert safe_name("..", taken) == "file"
    assert safe_name("a\x00b\nc;rm -rf.txt", taken) == "a_b_c_rm -rf.txt"


@pytest.fixture
async def worker(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Running]:
    settings = WorkerSettings(
        nats_url=nats_server.url,
        health_port=0,
        agent="offline",
        workspace_root=str(tmp_path / "workspaces"),
        state_dir=str(tmp_path / "state"),
        task_inputs_max_bytes=len(CSV) + len(PDF) + len(PNG),
    )
    async with in_process(WorkerService(settings), settings) as running:
        yield running


async def result_of(js: JetStreamContext, task_id: str) -> TaskResult:
    sub = await js.subscribe("results.>", ordered_consumer=True)
    try:
        while True:
            event = decode((await sub.next_msg(timeout=30)).data)
            if isinstance(event, TaskResult) and event.task_id == task_id:
                return event
    finally:
        await sub.unsubscribe()


async def test_a_task_gets_its_files_and_its_outputs_become_artifacts(
    worker: Running, js: JetStreamContext, tmp_path: Path
) -> None:
    attachments = await js.object_store(streams.ATTACHMENTS)
    await attachments.put("in-1/0", CSV)
    await attachments.put("in-1/1", PDF)
    await attachments.put("in-2/0", PNG)
    media = [
        Media(filename="prices.csv", content_type="text/csv", size=len(CSV), object="in-1/0"),
        Media(
            filename="../spec.pdf", content_type="application/pdf", size=len(PDF), object="in-1/1"
        ),
        Media(filename="big.iso", size=50_000_000, note="not stored: over the 10485760 byte limit"),
        Media(
            url="https://api.twilio.com/M1",
            content_type="image/png",
            size=len(PNG),
            object="in-2/0",
        ),
        # Past the task's own limit (PODIUM_TASK_INPUTS_MAX_BYTES): told, not placed.
        Media(filename="extra.csv", content_type="text/csv", size=len(CSV), object="in-1/0"),
    ]
    ids = EventIds(event_id="e-files", correlation_id="c", conversation_id="email-c1")
    task = TaskRequested(**ids, task_id="tfiles", instructions="List the files", inputs=media)
    waiting = asyncio.create_task(result_of(js, "tfiles"))
    await asyncio.sleep(0)
    await publish(js, subjects.task("tfiles"), task)
    result = await waiting

    inputs = tmp_path / "workspaces" / "tasks" / "tfiles" / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["file.png", "prices.csv", "spec.pdf"]
    assert (inputs / "prices.csv").read_bytes() == CSV
    assert (inputs / "spec.pdf").read_bytes() == PDF
    assert (inputs / "file.png").read_bytes() == PNG

    # The prompt the agent got lists what it has and what it does not.
    session = next((tmp_path / "state").rglob(f"{result.session_id}.jsonl"))
    prompt = json.loads(session.read_text().splitlines()[0])["prompt"]
    assert f"inputs/prices.csv (text/csv, {len(CSV)} bytes)" in prompt
    assert f"inputs/spec.pdf (application/pdf, {len(PDF)} bytes)" in prompt
    assert "big.iso: not stored: over the 10485760 byte limit" in prompt
    assert "extra.csv" in prompt and "PODIUM_TASK_INPUTS_MAX_BYTES" in prompt

    # The offline worker wrote outputs/inputs.csv: the platform stored it as an artifact.
    assert [a.ref for a in result.artifacts] == ["tfiles/inputs.csv"]
    artifact = result.artifacts[0]
    data = (await (await js.object_store(streams.ARTIFACTS)).get(artifact.object)).data
    assert data is not None
    assert artifact.size == len(data) and artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert artifact.content_type == "text/csv"
    assert hashlib.sha256(CSV).hexdigest() in data.decode()


async def test_only_regular_files_within_limits_become_artifacts(
    js: JetStreamContext, tmp_path: Path
) -> None:
    store = await js.object_store(streams.ARTIFACTS)
    outputs = tmp_path / "work" / "outputs"
    (outputs / "charts").mkdir(parents=True)
    (outputs / "report.csv").write_bytes(CSV)
    (outputs / "charts" / "q3.png").write_bytes(PNG)
    (outputs / "huge.bin").write_bytes(b"x" * 2000)
    (outputs / ".secret").write_text("hidden")
    os.symlink("/etc/passwd", outputs / "passwd")
    collected = await collect_artifacts(
        store, "t9", tmp_path / "work", max_count=10, max_bytes=1000
    )
    assert [a.ref for a in collected.artifacts] == ["t9/charts/q3.png", "t9/report.csv"]
    report = next(a for a in collected.artifacts if a.name == "report.csv")
    assert report.object == f"t9/{hashlib.sha256(CSV).hexdigest()[:16]}/report.csv"
    assert (await store.get(report.object)).data == CSV
    left = "\n".join(collected.left_out)
    assert "huge.bin: 2000 bytes, over the 1000 byte limit" in left
    assert "passwd: not a regular file" in left
    assert ".secret: unsafe name" in left
    # Unchanged files are not stored again; a changed one is.
    before = (await store.get_info(report.object)).nuid
    chart = next(a for a in collected.artifacts if a.name == "charts/q3.png")
    (outputs / "charts" / "q3.png").write_bytes(PNG + b"more")
    again = await collect_artifacts(store, "t9", tmp_path / "work", max_count=10, max_bytes=1000)
    assert (await store.get_info(report.object)).nuid == before
    changed = next(a for a in again.artifacts if a.name == "charts/q3.png")
    assert (await store.get(changed.object)).data == PNG + b"more"
    # The earlier version stays as it was, for a message that attached it.
    assert changed.object != chart.object
    assert (await store.get(chart.object)).data == PNG


def _artifact(ref: str) -> Artifact:
    task_id, name = ref.split("/", 1)
    return Artifact(
        task_id=task_id, name=name, size=3, content_type="text/csv", sha256="0" * 64, object=ref
    )


def _conv(channel: Channel = "email") -> Conversation:
    conv = Conversation(
        conversation_id="email-c2",
        channel=channel,
        reply_to="ann@example.com",
        subject="Prices",
    )
    conv.participants = ["ann@example.com"]
    conv.artifacts = {"t1/report.csv": _artifact("t1/report.csv")}
    return conv


def _turn(conv: Conversation, answer: str) -> Effects:
    settings = ConductorSettings(health_port=0, agent="offline")
    registry = CollectorRegistry()
    actions = Actions(settings, Metrics(registry, "conductor"), ConductorMetrics(registry))
    event = InboundMessage(
        event_id="in-9",
        correlation_id="in-9",
        conversation_id=conv.conversation_id,
        channel="email",
        sender="ann@example.com",
        text="hi",
    )
    parsed = cmds.parse(answer)
    effects = Effects()
    actions.gather_attachments(conv, parsed.commands, effects)
    for index, command in enumerate(parsed.commands):
        actions.apply(conv, event, index, command, effects)
    actions.check_attached(conv, effects)
    return effects


def test_attach_goes_with_the_turns_reply_even_written_before_it() -> None:
    conv = _conv()
    effects = _turn(conv, "ATTACH: t1/report.csv\nREPLY: Here are the new prices.")
    [(_, message)] = effects.stored
    assert isinstance(message, SendEmail)
    assert [a.ref for a in message.attachments] == ["t1/report.csv"]
    assert not conv.notes


def test_attach_on_sms_and_unknown_or_orphan_attach_are_refused() -> None:
    conv = _conv("sms")
    conv.reply_to = "+15551230000"
    effects = _turn(conv, "REPLY: done\nATTACH: t1/report.csv\nATTACH: t1/nope.csv")
    [(_, message)] = effects.stored
    assert isinstance(message, SendSms) and [a.ref for a in message.attachments] == [
        "t1/report.csv"
    ]
    assert any("ATTACH refused (unknown artifact)" in n and "t1/nope.csv" in n for n in conv.notes)

    conv = _conv()
    effects = _turn(conv, "ATTACH: t1/report.csv\nNO_ACTION: waiting")
    assert effects.stored == []
    assert any("ATTACH refused (nothing to attach to)" in n for n in conv.notes)
    assert effects.escalations
