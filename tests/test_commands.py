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
    from_structured,
    parse,
)
from podium.contracts.ids import reply_subject

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
    (
        "numbered list",
        "1. SPAWN_WORKER: Collect the invoices\n2. REPLY: Working on it.",
        [SpawnWorker("Collect the invoices"), Reply("Working on it.")],
        [],
    ),
    (
        "bullet dot",
        "• NO_ACTION: duplicate of an earlier mail",
        [NoAction("duplicate of an earlier mail")],
        [],
    ),
    ("backticked name", "`REPLY`: All set.", [Reply("All set.")], []),
    ("space before colon", "REPLY : Thanks!", [Reply("Thanks!")], []),
    ("tab indented", "\tREPLY: indented", [Reply("indented")], []),
    (
        "mixed case name",
        "Spawn_Worker: Tidy the spreadsheet",
        [SpawnWorker("Tidy the spreadsheet")],
        [],
    ),
    ("windows newlines", "REPLY: line one\r\nline two", [Reply("line one\nline two")], []),
    ("tilde fence", "~~~\nREPLY: fenced with tildes\n~~~", [Reply("fenced with tildes")], []),
    (
        "language fence",
        "```text\nSPAWN_WORKER: Draft the agenda\n```\nThat is all.",
        [SpawnWorker("Draft the agenda\nThat is all.")],
        [],
    ),
    (
        "email to several",
        "SEND_EMAIL: a@example.com, B@Example.com | Minutes | Attached below.",
        [SendEmail(("a@example.com", "b@example.com"), "Minutes", "Attached below.")],
        [],
    ),
    (
        "email with display name",
        "SEND_EMAIL: Grace Hopper <grace@example.org> | Re: Q3 | Done.",
        [SendEmail(("grace@example.org",), "Re: Q3", "Done.")],
        [],
    ),
    (
        "email body with pipes",
        "SEND_EMAIL: a@example.com | Table | col1 | col2\nv1 | v2",
        [SendEmail(("a@example.com",), "Table", "col1 | col2\nv1 | v2")],
        [],
    ),
    ("email empty body", "SEND_EMAIL: a@example.com | Subject |   ", [], ["empty body"]),
    (
        "sms dotted number",
        "SEND_SMS: +44.20.7946.0958 | Call me",
        [SendSms("+442079460958", "Call me")],
        [],
    ),
    ("sms without plus", "SEND_SMS: 5550102030 | hi", [], ["not an E.164 number"]),
    ("sms empty text", "SEND_SMS: +15550102030 |", [], ["empty text"]),
    ("kill without id", "KILL_WORKER:   ", [], ["needs a task id"]),
    ("kill with bad id", "KILL_WORKER: ../etc/passwd", [], ["needs a task id"]),
    ("tell with bad id", "TELL_WORKER: t 1 | fix", [], ["TELL_WORKER needs"]),
    ("reply empty", "REPLY:", [], ["REPLY needs text"]),
    ("escalate without reason", "ESCALATE:", [Escalate("no reason given")], []),
    ("no action without reason", "NO_ACTION:", [NoAction("")], []),
    (
        "unknown lookalike in prose is a rejection",
        "Let me think.\nDELETE_ALL_FILES: now\nREPLY: ok",
        [Reply("ok")],
        ["unknown command DELETE_ALL_FILES"],
    ),
    ("prose mentioning a command mid-line", "I will not SEND_EMAIL: anyone today.", [], []),
    (
        "command text keeps inner blank lines",
        "REPLY: Hello,\n\nHere is the plan.\n\nBest",
        [Reply("Hello,\n\nHere is the plan.\n\nBest")],
        [],
    ),
    (
        "two tells",
        "TELL_WORKER: ta | use EU\nTELL_WORKER: tb | use US",
        [TellWorker("ta", "use EU"), TellWorker("tb", "use US")],
        [],
    ),
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


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40


STRUCTURED = [
    (
        {"commands": [{"command": "SPAWN_WORKER", "task": "Draft the memo"}]},
        [SpawnWorker("Draft the memo")],
        [],
    ),
    (
        {
            "commands": [
                {"command": "send_email", "to": ["a@example.com"], "subject": "Hi", "body": "x"},
                {"command": "SEND_SMS", "to": "+15550102030", "text": "y"},
                {"command": "TELL_WORKER", "task_id": "t1", "message": "fix"},
            ]
        },
        [
            SendEmail(("a@example.com",), "Hi", "x"),
            SendSms("+15550102030", "y"),
            TellWorker("t1", "fix"),
        ],
        [],
    ),
    ({"commands": [{"command": "FORMAT_DISK"}]}, [], ["unknown command"]),
    ({"commands": [{"command": "SEND_SMS", "to": "nobody", "text": "y"}]}, [], ["E.164"]),
    ({"answer": "no commands key"}, [], ["without commands"]),
]


@pytest.mark.parametrize(("answer", "commands", "rejections"), STRUCTURED)
def test_structured_answers_give_the_same_commands(
    answer: object, commands: list[object], rejections: list[str]
) -> None:
    result = from_structured(answer)
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


@pytest.mark.parametrize(
    ("subject", "reply"),
    [
        ("Quarterly numbers", "Re: Quarterly numbers"),
        ("Re: Quarterly numbers", "Re: Quarterly numbers"),
        ("RE:Quarterly  numbers", "RE:Quarterly numbers"),
        ("re : numbers", "re : numbers"),
        ("Reports", "Re: Reports"),
    ],
)
def test_a_reply_subject_has_re_once(subject: str, reply: str) -> None:
    # The one rule for it: the conductor, the offline agent and the notifier all use it.
    assert reply_subject(subject) == reply
