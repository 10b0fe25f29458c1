"""The conductor's policy, decided in code: each rule on its own."""

from __future__ import annotations

from datetime import timedelta

from podium.conductor.config import ConductorSettings
from podium.conductor.policy import Policy
from podium.contracts.events import utcnow
from podium.contracts.state import Conversation, Outbound, TaskInfo


def conv(*, spend_usd: float = 0.0, outbound: list[Outbound] | None = None) -> Conversation:
    return Conversation(
        conversation_id="email-1",
        channel="email",
        participants=["grace@example.org"],
        spend_usd=spend_usd,
        outbound=outbound or [],
    )


def test_senders() -> None:
    open_door = Policy(ConductorSettings())
    assert open_door.sender_allowed("email", "anyone@anywhere.example")
    strict = Policy(ConductorSettings(sender_allowlist=["@example.org", "+1 555 010 0001"]))
    assert strict.sender_allowed("email", "Grace@Example.org", "pass")
    # The From: header alone is forgeable: by default only an authenticated one counts.
    assert not strict.sender_allowed("email", "grace@example.org", "fail")
    assert not strict.sender_allowed("email", "grace@example.org", "none")
    assert strict.spoofed("email", "grace@example.org", "fail")
    assert not strict.spoofed("email", "mallory@evil.example", "fail")  # just a stranger
    lenient = Policy(
        ConductorSettings(
            sender_allowlist=["@example.org", "@relay.example.org"],
            sender_auth="prefer",
            sender_auth_exempt_domains=["relay.example.org"],
        )
    )
    assert lenient.sender_allowed("email", "grace@example.org", "none")
    assert not lenient.sender_allowed("email", "grace@example.org", "fail")
    assert lenient.sender_allowed("email", "build@relay.example.org", "fail")
    off = Policy(ConductorSettings(sender_allowlist=["@example.org"], sender_auth="off"))
    assert off.sender_allowed("email", "grace@example.org", "fail")
    assert strict.sender_allowed("sms", "+15550100001")
    assert not strict.sender_allowed("email", "grace@example.org.evil.example")
    assert not strict.sender_allowed("sms", "+15550100002")
    assert strict.sender_allowed("api", "whoever")  # API clients carry a token


def test_recipients() -> None:
    policy = Policy(ConductorSettings(outbound_allowlist=["@partner.example", "+15550100009"]))
    c = conv()
    assert policy.may_write(c, "GRACE@example.org") is None
    assert policy.may_write(c, "bob@partner.example") is None
    assert policy.may_write(c, "+1 555 010 0009") is None
    refusal = policy.may_write(c, "thief@evil.example")
    assert refusal is not None
    assert refusal.reason == "recipient not allowed"


def test_hourly_outbound_budget_ignores_old_and_operator_mail() -> None:
    policy = Policy(ConductorSettings(max_outbound_per_hour=2))
    now = utcnow()
    c = conv(
        outbound=[
            Outbound(command_id="a", kind="email", to=["x"], at=now - timedelta(hours=2)),
            Outbound(command_id="b", kind="operator", to=["ops"], at=now),
            Outbound(command_id="c", kind="email", to=["x"], at=now),
        ]
    )
    assert policy.may_send(c) is None
    c.outbound.append(Outbound(command_id="d", kind="sms", to=["x"], at=now))
    refusal = policy.may_send(c)
    assert refusal is not None
    assert refusal.reason == "outbound rate"


def test_spend_and_open_tasks_limit_new_work() -> None:
    policy = Policy(ConductorSettings(max_spend_usd=1.0, max_workers_per_conversation=2))
    c = conv(spend_usd=0.5)
    assert policy.may_spawn(c) is None
    c.tasks = {t: TaskInfo(task_id=t, instructions="x") for t in ("t1", "t2")}
    refusal = policy.may_spawn(c)
    assert refusal is not None
    assert refusal.reason == "too many open tasks"
    c.tasks["t1"].state = "complete"
    assert policy.may_spawn(c) is None
    c.spend_usd = 1.0
    refusal = policy.may_spawn(c)
    assert refusal is not None
    assert refusal.reason == "spend limit"
    refusal = policy.may_tell(c.tasks["t2"], "t2", c)
    assert refusal is not None
    assert refusal.reason == "spend limit"


def test_follow_ups() -> None:
    policy = Policy(ConductorSettings(max_validation_rounds=1))
    c = conv()
    done = TaskInfo(task_id="t1", instructions="x", state="complete")
    assert policy.may_tell(done, "t1", c) is None
    done.rounds = 1
    refusal = policy.may_tell(done, "t1", c)
    assert refusal is not None
    assert refusal.reason == "validation rounds exhausted"
    refusal = policy.may_tell(None, "t9", c)
    assert refusal is not None
    assert refusal.reason == "unknown task"
    over = TaskInfo(task_id="t2", instructions="x", state="cancelled")
    refusal = policy.may_tell(over, "t2", c)
    assert refusal is not None
    assert refusal.reason == "task is over"
