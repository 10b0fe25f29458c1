"""Client verbs of ``podium``: demo, send, status, watch, provision.

They talk to a running platform the way a user would: HTTP to the ingress,
and the NATS API to look at streams, consumers and state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from podium.cli.up import running_platform
from podium.common.bus import connect, shown_url
from podium.common.config import CommonSettings, load
from podium.common.errors import ConfigError, NatsUnreachable
from podium.common.kv import Store
from podium.contracts import streams, subjects
from podium.contracts.events import AnyEvent, ApiReply, SendEmail, decode, event_type
from podium.contracts.ids import new_id
from podium.contracts.state import OutboxRecord

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def _out(text: str = "") -> None:
    print(text, flush=True)  # noqa: T201


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201


def home() -> Path:
    """The folder ``podium up`` keeps its files in (``PODIUM_HOME``, default ``.podium``)."""
    return Path(os.environ.get("PODIUM_HOME", ".podium"))


def settings() -> CommonSettings:
    """NATS settings from the environment: ``NATS_URL`` (else the server of the ``podium up``
    running from ``PODIUM_HOME``, else the default) and, where the server has users,
    ``PODIUM_NATS_USER`` / ``PODIUM_NATS_PASSWORD`` or ``PODIUM_NATS_CREDS`` (the admin user)."""
    env = {k: v for k, v in os.environ.items() if k == "NATS_URL" or k.startswith("PODIUM_")}
    platform = running_platform(home())
    if "NATS_URL" not in env:
        env["NATS_URL"] = str(platform["nats_url"]) if platform else DEFAULT_NATS_URL
    given = "PODIUM_NATS_USER" in env or "PODIUM_NATS_CREDS" in env
    embedded = bool(platform and platform.get("nats_user"))
    if platform and embedded and not given and env["NATS_URL"] == platform["nats_url"]:
        # The embedded server of that podium up: its operators' user.
        env["PODIUM_NATS_USER"] = str(platform["nats_user"])
        env["PODIUM_NATS_PASSWORD"] = str(platform.get("nats_password", ""))
    try:
        return load(CommonSettings, env)
    except ConfigError as err:
        raise SystemExit(f"podium: {err}") from None


def ingress_url(given: str | None) -> str:
    """The ingress to talk to: ``--url``, ``PODIUM_URL``, the running ``podium up``'s, or :8080."""
    if given:
        return given
    if env := os.environ.get("PODIUM_URL"):
        return env
    platform = running_platform(home())
    return str(platform["ingress_url"]) if platform else "http://127.0.0.1:8080"


async def nats_client(name: str = "podium-cli", config: CommonSettings | None = None) -> Client:
    """A connection for a verb: given up after ``PODIUM_NATS_CONNECT_TIMEOUT_S``.

    Raises :class:`~podium.common.errors.PodiumError` whose message names the URL:
    unreachable, refused, or a server too old for Podium.
    """
    config = config or settings()
    # Each server of a cluster URL gets its turn.
    servers = len([s for s in config.nats_url.split(",") if s.strip()])
    timeout_s = config.nats_connect_timeout_s * max(1, servers)
    try:
        async with asyncio.timeout(timeout_s):
            return await connect(config, name=name)
    except TimeoutError:
        raise NatsUnreachable(shown_url(config), f"no answer within {timeout_s:g}s") from None


async def _nats() -> Client:
    return await nats_client()


async def wait_for_command(
    nc: Client,
    subject: str,
    accept: Callable[[AnyEvent], bool],
    timeout_s: float,
) -> AnyEvent | None:
    """The first stored event on ``subject`` that ``accept`` likes, or None at the timeout."""
    js = nc.jetstream()
    found: asyncio.Future[AnyEvent] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(Exception):
            event = decode(msg.data)
            if accept(event) and not found.done():
                found.set_result(event)

    sub = await js.subscribe(
        subject, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await found
    except TimeoutError:
        return None
    finally:
        await sub.unsubscribe()


async def wait_sent(nc: Client, command_id: str, timeout_s: float) -> OutboxRecord | None:
    """The outbox record of ``command_id`` once it is final, or None at the timeout."""
    outbox = await Store.open(nc.jetstream(), streams.OUTBOX.name, OutboxRecord)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await outbox.get(command_id)
        if found and found[0].state in ("sent", "failed", "ambiguous"):
            return found[0]
        await asyncio.sleep(0.1)
    return None


async def demo(url: str, timeout_s: float) -> int:
    """Send one sample email through the SendGrid webhook and wait for the reply."""
    message_id = f"<demo-{new_id()}@example.com>"
    sender = "Ada Lovelace <ada@example.com>"
    subject = "Launch checklist"
    text = "Please draft a short launch checklist for our Monday release."
    headers = (
        f"Message-ID: {message_id}\nFrom: {sender}\nTo: podium@localhost\nSubject: {subject}\n"
    )
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in (
        ("from", sender),
        ("to", "podium@localhost"),
        ("subject", subject),
        ("text", text),
        ("headers", headers),
        ("envelope", json.dumps({"from": "ada@example.com", "to": ["podium@localhost"]})),
        ("charsets", json.dumps({"from": "UTF-8", "subject": "UTF-8", "text": "UTF-8"})),
    ):
        form.add_field(name, value)
    http_headers: dict[str, str] = {}
    if basic := os.environ.get("PODIUM_SENDGRID_BASIC_AUTH"):
        http_headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
    # NATS first: the reply is read from it, so a message it could not see is not sent.
    nc = await _nats()
    try:
        _out(f"→ email from {sender}: {subject!r}\n  {text}")
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
                http.post(
                    f"{url}/webhooks/sendgrid/inbound", data=form, headers=http_headers
                ) as resp,
            ):
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    _err(f"podium demo: ingress answered {resp.status}: {body}")
                    return 1
        except aiohttp.ClientError as err:
            _err(f"podium demo: cannot reach the ingress at {url} ({err}); is `podium up` running?")
            return 1
        conversation = body["conversation_id"]
        _out(f"  stored as conversation {conversation}; waiting for the reply…")
        reply = await wait_for_command(
            nc,
            subjects.command("email", conversation),
            lambda e: isinstance(e, SendEmail) and "ada@example.com" in e.to,
            timeout_s,
        )
        if not isinstance(reply, SendEmail):
            _err(f"podium demo: no reply within {timeout_s:g}s")
            return 1
        record = await wait_sent(nc, reply.command_id, timeout_s)
    finally:
        await nc.close()
    if record is None or record.state != "sent":
        _err(f"podium demo: reply not delivered ({record.state if record else 'no record'})")
        return 1
    _out(f"← reply to {', '.join(reply.to)} via {record.transport} ({record.provider_id})")
    _out(f"  Subject: {reply.subject}\n  In-Reply-To: {reply.in_reply_to}\n")
    _out("\n".join("  " + line for line in reply.body.splitlines()))
    return 0


async def send(
    url: str, token: str, text: str, *, thread: str, wait: bool, timeout_s: float
) -> int:
    """Send an API message; with ``wait``, print the reply when it comes."""
    payload: dict[str, Any] = {"text": text}
    if thread:
        payload["thread_id"] = thread
    # With --wait, NATS first: the reply is read from it.
    nc = await _nats() if wait else None
    try:
        return await _send(url, token, payload, nc, timeout_s)
    finally:
        if nc is not None:
            await nc.close()


async def _send(
    url: str, token: str, payload: dict[str, Any], nc: Client | None, timeout_s: float
) -> int:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
            http.post(
                f"{url}/v1/messages",
                json=payload,
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": new_id()},
            ) as resp,
        ):
            body = await resp.json(content_type=None)
    except aiohttp.ClientError as err:
        _err(f"podium send: cannot reach the ingress at {url} ({err})")
        return 1
    if resp.status != 202:
        _err(f"podium send: {resp.status} {json.dumps(body)}")
        return 1
    _out(json.dumps(body))
    if nc is None:
        return 0
    reply = await wait_for_command(
        nc,
        subjects.command("api", body["conversation_id"]),
        lambda e: isinstance(e, ApiReply),
        timeout_s,
    )
    if not isinstance(reply, ApiReply):
        _err(f"podium send: no reply within {timeout_s:g}s")
        return 1
    _out(reply.body)
    return 0


async def status() -> int:
    """Streams, consumers (pending, redelivered) and dead letters."""
    nc = await _nats()
    try:
        js = nc.jetstream()
        _out(f"{'stream':<12} {'messages':>9} {'bytes':>12} {'first':>8} {'last':>8}")
        for spec in streams.TOPOLOGY.streams:
            try:
                info = await js.stream_info(spec.name)
            except NotFoundError:
                _out(f"{spec.name:<12} missing (run `podium provision`)")
                continue
            st = info.state
            row = f"{spec.name:<12} {st.messages:>9} {st.bytes:>12}"
            _out(f"{row} {st.first_seq:>8} {st.last_seq:>8}")
        _out()
        _out(f"{'consumer':<22} {'pending':>8} {'ack pending':>12} {'redelivered':>12}")
        for c in streams.TOPOLOGY.consumers:
            try:
                ci = await js.consumer_info(c.stream, c.durable)
            except NotFoundError:
                _out(f"{c.durable:<22} missing")
                continue
            _out(
                f"{c.durable:<22} {ci.num_pending or 0:>8} {ci.num_ack_pending or 0:>12} "
                f"{ci.num_redelivered or 0:>12}"
            )
    finally:
        await nc.close()
    return 0


async def watch(stream_names: list[str], history: bool) -> int:
    """Print every event as it is stored, one line each, until Ctrl-C."""
    nc = await _nats()
    js = nc.jetstream()
    policy = DeliverPolicy.ALL if history else DeliverPolicy.NEW

    async def on_msg(msg: Msg) -> None:
        try:
            event = decode(msg.data)
        except Exception:  # noqa: BLE001 - show what cannot be decoded, too
            _out(f"{msg.subject}  <undecodable {len(msg.data)} bytes>")
            return
        _out(f"{msg.subject}  {event_type(event)}  {_gist(event)}")

    subs = []
    for spec in streams.TOPOLOGY.streams:
        if stream_names and spec.name not in stream_names:
            continue
        for subject in spec.subjects:
            subs.append(
                await js.subscribe(
                    subject,
                    cb=on_msg,
                    ordered_consumer=True,
                    deliver_policy=policy,
                    stream=spec.name,
                )
            )
    _out(f"watching {', '.join(s for s in stream_names) or 'all streams'}; Ctrl-C to stop")
    try:
        await asyncio.Event().wait()
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await nc.close()
    return 0


def _gist(event: AnyEvent) -> str:
    fields = {
        "inbound.message": ("channel", "sender", "subject", "text"),
        "task.requested": ("task_id", "instructions"),
        "task.followup": ("task_id", "message"),
        "task.result": ("task_id", "status", "summary"),
        "command.email": ("to", "subject"),
        "command.sms": ("to", "body"),
        "command.api": ("thread_id", "body"),
        "deadletter": ("stream", "stream_seq", "reason"),
    }.get(event_type(event), ())
    parts = []
    for name in fields:
        value = str(getattr(event, name, ""))
        value = " ".join(value.split())
        parts.append(f"{name}={value[:60]}{'…' if len(value) > 60 else ''}")
    return " ".join(parts)


async def provision_cmd(wait_s: float = 0.0) -> int:
    """Create or update every stream, consumer and bucket (``PODIUM_STREAM_REPLICAS`` each).

    With ``wait_s``, keep trying to reach NATS that long first: a Kubernetes Job or a
    compose one-shot may start before the server answers.
    """
    from podium.common.provision import provision  # noqa: PLC0415

    config = settings()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            nc = await nats_client("podium-provision", config)
            break
        except NatsUnreachable:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(1.0)
    try:
        await provision(
            nc.jetstream(), replicas=config.stream_replicas, budget=config.store_budget_bytes
        )
    finally:
        await nc.close()
    _out(
        "provisioned: "
        + ", ".join(s.name for s in streams.TOPOLOGY.streams)
        + f" (replicas: {config.stream_replicas})"
    )
    return 0
