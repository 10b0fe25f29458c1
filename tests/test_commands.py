"""The conductor's command parser, on what real models write."""

from __future__ import annotations

import pytest

from podium.conductor.commands import (
    Escalate,
    KillWorker,
    NoAction,
    Parsed,
    Reply,
    SendEmail,
    SendSms,
    SpawnWorker,
    TellWorker,
    parse,
)

CASES: list[tuple[str, str, list[object], list[str]]] = [
    ("bare spawn", "SPAWN_WORKER: Summarise the report", [SpawnWorker("Summarise the report")], []),
    (
        "prose around",
        "I'll delegate this.\n\nSPAWN_WORKER: Draft the memo\n",
        [SpawnWorker("Draft the memo")],
        [],
    ),
    (
        "multi-line body runs to the next command",
        "SPAWN_WORKER: Research vendors\n- price\n- support\nREPLY: On it!",
        [SpawnWorker("Research vendors\n- price\n- support"), Reply("On it!")],
        [],
    ),
    (
        "fenced",
        "```\nSEND_EMAIL: bob@example.com | Re: Plan | Hi Bob,\n\nAll good.\n```",
        [SendEmail(("bob@example.com",), "Re: Plan", "Hi Bob,\n\nAll good.")],
        [],
    ),
    (
        "lower case and markdown bold",
        "**reply**: Thanks, done.",
        [Reply("Thanks, done.")],
        [],
    ),
    (
        "list marker and spaces",
        "  - TELL_WORKER :  t1a2b3 |  Use metric units  ",
        [TellWorker("t1a2b3", "Use metric units")],
        [],
    ),
    ("kill", "KILL_WORKER: tabc123 (it is stuck)", [KillWorker("tabc123")], []),
    (
        "sms with a formatted number",
        "SEND_SMS: +1 (555) 010-2030 | Your report is ready",
        [SendSms("+15550102030", "Your report is ready")],
        [],
    ),
    ("no action", "NO_ACTION: just a thank-you note", [NoAction("just a thank-you note")], []),
    ("escalate", "ESCALATE: legal question", [Escalate("legal question")], []),
    ("unknown command", "SEND_FAX: 555 | hi", [], ["unknown command SEND_FAX"]),
    ("email without subject", "SEND_EMAIL: bob@example.com | hi", [], ["SEND_EMAIL needs"]),
    ("email with bad address", "SEND_EMAIL: bob | s | b", [], ["invalid recipient"]),
    ("sms bad number", "SEND_SMS: call me | hi", [], ["not an E.164 number"]),
    ("tell without message", "TELL_WORKER: t1", [], ["TELL_WORKER needs"]),
    ("empty spawn", "SPAWN_WORKER:", [], ["needs a task description"]),
    ("nothing", "Hello there, no commands here.", [], []),
]


@pytest.mark.parametrize(
    ("name", "text", "commands", "rejections"), CASES, ids=[c[0] for c in CASES]
)
def test_parse(name: str, text: str, commands: list[object], rejections: list[str]) -> None:
    result = parse(text)
    assert result.commands == commands
    assert len(result.rejected) == len(rejections)
    for rejection, expected in zip(result.rejected, rejections, strict=True):
        assert expected in rejection.reason


def test_several_commands_in_order_with_a_rejection_between() -> None:
    result: Parsed = parse(
        "Plan:\nSPAWN_WORKER: A\nFROB_THING: x\nSPAWN_WORKER: B\nREPLY: started two tasks"
    )
    assert result.commands == [SpawnWorker("A"), SpawnWorker("B"), Reply("started two tasks")]
    assert [r.line for r in result.rejected] == ["FROB_THING: x"]
