"""Files generated from the code stay in step with it, and say true things.

``podium generate --check`` covers every generated file; the other tests check
what the files claim: the AsyncAPI document describes the events as the
services really encode them, and every metric the alert rules and the
dashboard name is one a service exports.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import jsonschema
import msgspec
import promql_parser
import pytest
import yaml

from podium.contracts import events, subjects
from podium.docgen import asyncapi, metricsdoc, monitoring
from podium.docgen.generate import artifacts, generate
from tests.conftest import ROOT


def test_every_generated_file_is_current() -> None:
    assert generate(ROOT, check=True) == 0, "run `make docs` (podium generate)"
    assert len(artifacts()) >= 9


# --- AsyncAPI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text())
    return loaded


def test_every_event_type_has_a_channel(document: dict[str, Any]) -> None:
    all_events = set(typing.get_args(events.AnyEvent))
    documented = {t for c in asyncapi.CHANNELS for t in c.events}
    assert documented == all_events
    assert set(document["components"]["messages"]) == {t.__name__ for t in all_events}


def test_channel_addresses_are_what_the_subject_functions_produce() -> None:
    made = {
        "inbound": subjects.inbound("email", "c1"),
        "task": subjects.task("t1"),
        "taskFollowup": subjects.task_followup("t1"),
        "taskCancel": subjects.task_cancel("t1"),
        "deliveryStatus": subjects.delivery_status("k1"),
        "recipientPreference": subjects.preference("c1"),
        "result": subjects.result("c1", "t1"),
        "deliveryReport": subjects.delivery_report("c1", "k1"),
        "emailCommand": subjects.command("email", "c1"),
        "smsCommand": subjects.command("sms", "c1"),
        "apiCommand": subjects.command("api", "c1"),
        "kill": subjects.kill("t1"),
        "deadLetter": subjects.dead_letter("worker", "TASKS"),
        "operatorCommand": subjects.operator_command("c1"),
        "turn": subjects.turn("c1"),
        "audit": subjects.audit("kill"),
    }
    values = {
        "channel": "email",
        "conversation": "c1",
        "task": "t1",
        "command": "k1",
        "service": "worker",
        "stream": "TASKS",
        "action": "kill",
    }
    assert {c.key for c in asyncapi.CHANNELS} == set(made)
    for channel in asyncapi.CHANNELS:
        assert channel.address.format(**values) == made[channel.key], channel.key
        assert set(re.findall(r"{(\w+)}", channel.address)) == set(channel.parameters)


SAMPLES: list[events.Event] = [
    events.InboundMessage(
        event_id="e1",
        correlation_id="e1",
        conversation_id="c1",
        channel="sms",
        sender="+15550001",
        text="hi",
        media=[events.Media(url="https://x/1.jpg", content_type="image/jpeg")],
    ),
    events.TaskRequested(
        event_id="e2", correlation_id="e1", conversation_id="c1", task_id="t1", instructions="go"
    ),
    events.TaskFollowup(
        event_id="e3", correlation_id="e1", conversation_id="c1", task_id="t1", message="more"
    ),
    events.TaskResult(
        event_id="e4",
        correlation_id="e1",
        conversation_id="c1",
        task_id="t1",
        status="COMPLETE",
        summary="done",
        cost_usd=0.01,
    ),
    events.TaskProgress(
        event_id="e5", correlation_id="e1", conversation_id="c1", task_id="t1", note="started"
    ),
    events.SendEmail(
        event_id="e6",
        correlation_id="e1",
        conversation_id="c1",
        command_id="k1",
        to=["a@example.com"],
        subject="Re: x",
        body="b",
    ),
    events.SendSms(
        event_id="e7", correlation_id="e1", conversation_id="c1", command_id="k2", to="+1", body="b"
    ),
    events.ApiReply(
        event_id="e8",
        correlation_id="e1",
        conversation_id="c1",
        command_id="k3",
        client="cli",
        thread_id="th",
        body="b",
    ),
    events.KillTask(event_id="e9", correlation_id="e1", conversation_id="c1", task_id="t1"),
    events.DeliveryFailed(
        event_id="e11",
        correlation_id="e1",
        conversation_id="c1",
        command_id="k2",
        channel="sms",
        to=["+15550001"],
        outcome="suppressed",
        reason="opted out",
        provider_code="21610",
    ),
    events.DeliveryStatus(
        event_id="e12",
        correlation_id="k2",
        conversation_id="",
        command_id="k2",
        channel="sms",
        provider_id="SM1",
        status="delivered",
    ),
    events.RecipientPreference(
        event_id="e13",
        correlation_id="e13",
        conversation_id="c1",
        channel="sms",
        address="+15550001",
        opted_out=True,
        keyword="STOP",
        source_id="SM2",
    ),
    events.DeadLetter(
        event_id="e10",
        correlation_id="e1",
        conversation_id="",
        service="worker",
        stream="TASKS",
        consumer="worker-tasks",
        subject="tasks.t1",
        stream_seq=3,
        deliveries=5,
        reason="gave up",
    ),
    events.TurnRecorded(
        event_id="e14",
        correlation_id="e1",
        conversation_id="c1",
        trigger="email",
        trigger_event_id="e1",
        prompt="[EMAIL] …",
        answer="SPAWN_WORKER: count the words",
        commands=["SPAWN_WORKER t1"],
        input_tokens=120,
        output_tokens=12,
        cost_usd=0.002,
    ),
    events.OperatorAnswer(
        event_id="e15", correlation_id="e15", conversation_id="c1", operator="alice", text="Yes."
    ),
    events.OperatorKill(
        event_id="e16", correlation_id="e16", conversation_id="c1", operator="alice", task_id="t1"
    ),
    events.OperatorClose(
        event_id="e17", correlation_id="e17", conversation_id="c1", operator="alice"
    ),
    events.OperatorAction(
        event_id="e18",
        correlation_id="e18",
        conversation_id="c1",
        operator="alice",
        action="kill",
        target="t1",
    ),
]


def test_encoded_events_validate_against_the_document(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert {type(s) for s in SAMPLES} == set(typing.get_args(events.AnyEvent))
    registry_root = {"components": {"schemas": schemas}}
    for sample in SAMPLES:
        payload = msgspec.json.decode(events.encode(sample))
        schema = {"$ref": f"#/components/schemas/{type(sample).__name__}", **registry_root}
        jsonschema.validate(payload, schema)
        # And a payload that breaks the contract does not.
        broken = {**payload, "event_id": 42}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_operations_follow_the_nats_permissions(document: dict[str, Any]) -> None:
    operations = document["operations"]
    assert operations["ingress.send.inbound"]["action"] == "send"
    assert operations["conductor.receive.inbound"]["action"] == "receive"
    assert operations["worker.receive.kill"]["channel"] == {"$ref": "#/channels/kill"}
    assert not any(k.startswith("notifier.send.") and "Command" in k for k in operations)
    # Facts go from the ingress to the notifier; only the notifier reports failures.
    assert operations["ingress.send.deliveryStatus"]["action"] == "send"
    assert operations["notifier.receive.recipientPreference"]["action"] == "receive"
    assert "notifier.send.deliveryReport" in operations
    assert "ingress.send.deliveryReport" not in operations


# --- monitoring ----------------------------------------------------------------------

PODIUM_NAME = re.compile(r"\bpodium_[a-z_]+\b")


def test_alerts_and_panels_parse_and_name_only_exported_metrics() -> None:
    exported = metricsdoc.all_series()
    assert "podium_consumer_pending" in exported
    assert "podium_handler_seconds_bucket" in exported
    named: set[str] = set()
    for expr in monitoring.expressions():
        promql_parser.parse(expr.replace("$__rate_interval", "5m"))
        named |= set(PODIUM_NAME.findall(expr))
    unknown = named - exported
    assert not unknown, f"not exported by any service: {sorted(unknown)}"
    # The alerts: consumer lag, dead letters, agent spend, error rate.
    alerts = {a.name for a in monitoring.ALERTS}
    assert {
        "PodiumConsumerLag",
        "PodiumDeadLetters",
        "PodiumAgentSpendHigh",
        "PodiumHandlerErrors",
    } <= alerts


def test_a_misspelt_metric_would_be_caught() -> None:
    exported = metricsdoc.all_series()
    assert "podium_events_in_totl" not in exported
    with pytest.raises(ValueError):  # noqa: PT011 - the parser's own error type
        promql_parser.parse("sum(rate(podium_events_in_total[5m])")


def test_rule_files_are_what_prometheus_reads() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    (group,) = rules["groups"]
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_dashboard_is_a_grafana_model() -> None:
    model = monitoring.dashboard()
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "timeseries":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
