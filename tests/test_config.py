"""Settings: typed, from the environment, and a bad one stops the service by name."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from podium.common.config import (
    AgentSettings,
    CommonSettings,
    Secret,
    ignored_variables,
    load,
    variables,
)
from podium.common.errors import ConfigError
from podium.conductor.config import ConductorSettings
from podium.ingress.config import IngressSettings
from podium.notifier.config import NotifierSettings
from podium.worker.config import WorkerSettings

TOKEN = "local:abcdefghijklmnopqrstuvwxyz"


def test_defaults_and_conversions() -> None:
    settings = load(
        IngressSettings,
        {
            "PODIUM_API_TOKENS": TOKEN,
            "PODIUM_PORT": "8181",
            "PODIUM_OWN_ADDRESSES": "a@x.org, b@x.org",
        },
    )
    assert settings.port == 8181
    assert settings.own_addresses == ["a@x.org", "b@x.org"]
    assert settings.tokens() == {"local": "abcdefghijklmnopqrstuvwxyz"}
    assert settings.nats_url == "nats://127.0.0.1:4222"


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load(IngressSettings, {"PODIUM_PORT": "eighty", "PODIUM_LOG_LEVEL": "LOUD"})
    text = str(caught.value)
    assert "PODIUM_API_TOKENS is required" in text
    assert "PODIUM_PORT='eighty' is invalid" in text
    assert "PODIUM_LOG_LEVEL='LOUD' is invalid" in text


def test_constraints_and_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="PODIUM_HEALTH_PORT"):
        load(CommonSettings, {"PODIUM_HEALTH_PORT": "70000"})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load(IngressSettings, {"PODIUM_API_TOKENS": "short"})
    with pytest.raises(ConfigError, match="user:password"):
        load(IngressSettings, {"PODIUM_API_TOKENS": TOKEN, "PODIUM_SENDGRID_BASIC_AUTH": "x"})


def test_secrets_never_show_themselves() -> None:
    settings = load(NotifierSettings, {"PODIUM_SMTP_PASSWORD": "hunter2-very-secret"})
    assert settings.smtp_password.reveal() == "hunter2-very-secret"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(Secret("hunter2"))
    with pytest.raises(ConfigError) as caught:
        load(NotifierSettings, {"PODIUM_SMTP_PORT": "nope", "PODIUM_SMTP_PASSWORD": "hunter2"})
    assert "hunter2" not in str(caught.value)


def test_a_service_without_a_required_setting_stops_at_start_naming_it() -> None:
    env = {"PATH": "/usr/bin:/bin", "PODIUM_PORT": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "podium.ingress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "PODIUM_API_TOKENS is required" in proc.stderr


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"PODIUM_REQUIRE_WEBHOOK_AUTH": "true"}, "PODIUM_TWILIO_AUTH_TOKEN is required"),
        (
            {"PODIUM_REQUIRE_WEBHOOK_AUTH": "true", "PODIUM_TWILIO_AUTH_TOKEN": "t" * 32},
            "PODIUM_SENDGRID_WEBHOOK_PUBLIC_KEY or PODIUM_SENDGRID_BASIC_AUTH is required",
        ),
        ({"PODIUM_SENDGRID_WEBHOOK_PUBLIC_KEY": "bm90IGEga2V5"}, "not a base64 DER public key"),
    ],
    ids=["no-twilio-token", "no-sendgrid-auth", "bad-sendgrid-key"],
)
def test_webhook_authentication_settings_fail_fast(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(IngressSettings, {"PODIUM_API_TOKENS": TOKEN, **env})


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"PODIUM_EMAIL_TRANSPORT": "sendgrid"}, "PODIUM_SENDGRID_API_KEY is required"),
        ({"PODIUM_SMS_TRANSPORT": "twilio"}, "PODIUM_TWILIO_ACCOUNT_SID"),
        (
            {
                "PODIUM_SMS_TRANSPORT": "twilio",
                "PODIUM_TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
                "PODIUM_TWILIO_AUTH_TOKEN": "x" * 32,
            },
            "PODIUM_SMS_FROM or PODIUM_TWILIO_MESSAGING_SERVICE_SID is required",
        ),
    ],
    ids=["sendgrid-without-key", "twilio-without-account", "twilio-without-sender"],
)
def test_provider_transports_need_their_credentials(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load(NotifierSettings, env)


def test_provider_secrets_are_never_shown() -> None:
    settings = load(
        NotifierSettings,
        {
            "PODIUM_SMS_TRANSPORT": "twilio",
            "PODIUM_TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
            "PODIUM_TWILIO_AUTH_TOKEN": "twilio-secret-value-123",
            "PODIUM_SMS_FROM": "+15550100999",
            "PODIUM_EMAIL_TRANSPORT": "sendgrid",
            "PODIUM_SENDGRID_API_KEY": "SG.secret-value-456",
        },
    )
    shown = repr(settings)
    assert "twilio-secret-value-123" not in shown
    assert "SG.secret-value-456" not in shown


def test_agent_settings_are_per_role_from_one_environment() -> None:
    env = {
        "PODIUM_CLAUDE_MODEL": "shared-model",
        "PODIUM_CONDUCTOR_CLAUDE_MODEL": "conductor-model",
        "PODIUM_AGENT_TIMEOUT_S": "90",
        "PODIUM_WORKER_AGENT_TIMEOUT_S": "1200",
        "PODIUM_WORKER_CLAUDE_PERMISSION_MODE": "bypassPermissions",
    }
    conductor, worker = load(ConductorSettings, env), load(WorkerSettings, env)
    assert (conductor.claude_model, worker.claude_model) == ("conductor-model", "shared-model")
    # The worker's own variable wins over the shared one; the conductor keeps the short
    # turns it has its own default for, whatever the shared variable says.
    assert (conductor.agent_timeout_s, worker.agent_timeout_s) == (180.0, 1200.0)
    assert load(WorkerSettings, {"PODIUM_AGENT_TIMEOUT_S": "90"}).agent_timeout_s == 90.0
    assert ignored_variables(ConductorSettings, env) == [
        "PODIUM_AGENT_TIMEOUT_S (this role reads PODIUM_CONDUCTOR_AGENT_TIMEOUT_S)"
    ]
    # One role's own variable does not reach the other.
    assert conductor.claude_permission_mode == "default"
    assert worker.claude_permission_mode == "bypassPermissions"
    # Untouched, each role keeps its own defaults.
    bare_conductor, bare_worker = load(ConductorSettings, {}), load(WorkerSettings, {})
    assert (bare_conductor.agent_max_turns, bare_worker.agent_max_turns) == (3, 0)
    assert (bare_conductor.agent_timeout_s, bare_worker.agent_timeout_s) == (180.0, 600.0)


def test_shared_tool_settings_never_give_the_conductor_tools() -> None:
    env = {
        "PODIUM_CLAUDE_TOOLS": "default",
        "PODIUM_CLAUDE_ALLOWED_TOOLS": "Bash(python3:*)",
        "PODIUM_CLAUDE_PERMISSION_MODE": "bypassPermissions",
        "PODIUM_CLAUDE_MCP_CONFIG": "/etc/mcp.json",
    }
    conductor, worker = load(ConductorSettings, env), load(WorkerSettings, env)
    assert (conductor.claude_tools, conductor.claude_allowed_tools) == ("", "")
    assert conductor.claude_permission_mode == "default"
    assert conductor.claude_mcp_config == ""
    assert (worker.claude_tools, worker.claude_allowed_tools) == ("default", "Bash(python3:*)")
    # And its own variables cannot: a conductor given tools refuses to start, saying so.
    for variable in (
        "PODIUM_CONDUCTOR_CLAUDE_TOOLS",
        "PODIUM_CONDUCTOR_CLAUDE_ALLOWED_TOOLS",
        "PODIUM_CONDUCTOR_CLAUDE_MCP_CONFIG",
    ):
        with pytest.raises(ConfigError, match=f"the conductor takes no tools: {variable}"):
            load(ConductorSettings, {variable: "Read"})
    assert "PODIUM_CLAUDE_TOOLS" not in variables(ConductorSettings)
    assert "PODIUM_CONDUCTOR_CLAUDE_TOOLS" in variables(ConductorSettings)
    assert {"PODIUM_CLAUDE_TOOLS", "PODIUM_WORKER_CLAUDE_TOOLS"} <= variables(WorkerSettings)


def test_every_agent_default_the_conductor_changes_is_its_own_only() -> None:
    # A shared value meant for workers must not undo a default the conductor chose.
    changed = {
        f.name
        for f in msgspec.structs.fields(ConductorSettings)
        if f.name in {a.name for a in msgspec.structs.fields(AgentSettings)}
        and f.default
        != next(a.default for a in msgspec.structs.fields(AgentSettings) if a.name == f.name)
    }
    assert changed == {
        "claude_tools",
        "claude_permission_mode",
        "agent_max_turns",
        "agent_timeout_s",
    }
    assert changed <= ConductorSettings.ROLE_ONLY
    # A role prompt is one role's: the shared variable reaches neither.
    for cls in (ConductorSettings, WorkerSettings):
        assert "PODIUM_CLAUDE_ROLE_PROMPT_FILE" not in variables(cls)


def test_a_bad_role_setting_is_named_by_the_variable_that_holds_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load(WorkerSettings, {"PODIUM_AGENT_POOL_SIZE": "4", "PODIUM_WORKER_AGENT_POOL_SIZE": "-1"})
    assert "PODIUM_WORKER_AGENT_POOL_SIZE='-1' is invalid" in str(caught.value)
