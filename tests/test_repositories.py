"""Repository tasks: a worktree on ``podium/<task>``, then commit, check, push and a pull
request, against a local bare repository (a file URL) and a fake of GitHub's pulls API."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from podium.agents import AgentCall
from podium.agents.claude import ClaudeRuntime
from podium.cli.natsserver import NatsServer
from podium.common import repositories
from podium.common.bus import publish
from podium.common.errors import ConfigError
from podium.common.kv import Store
from podium.common.metrics import Metrics
from podium.conductor import commands as cmds
from podium.conductor.actions import Actions, Effects
from podium.conductor.config import ConductorSettings
from podium.conductor.metrics import ConductorMetrics
from podium.contracts import streams, subjects
from podium.contracts.events import (
    EventIds,
    InboundMessage,
    TaskFollowup,
    TaskRequested,
    TaskResult,
    decode,
)
from podium.contracts.state import Conversation, SessionRecord
from podium.testing.anthropic import FakeAnthropic, MessagesCall, Reply
from podium.testing.github import FakeGitHub
from podium.testing.platform import Platform
from podium.testing.services import Running, in_process
from podium.worker.config import WorkerSettings
from podium.worker.repos import GitError, Repositories
from podium.worker.service import WorkerService
from tests.test_claude_e2e import claude_platform, is_worker

TOKEN = "ghp_test0123456789abcdefTOKEN"


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A bare repository with one commit on main, as a company's remote would be."""
    bare = tmp_path / "origin.git"
    git("init", "--bare", "--quiet", "-b", "main", str(bare), cwd=tmp_path)
    seed = tmp_path / "seed"
    git("clone", "--quiet", str(bare), str(seed), cwd=tmp_path)
    (seed / "index.html").write_text("<p>Price: $10</p>\n")
    git("add", ".", cwd=seed)
    git("-c", "user.name=Ann", "-c", "user.email=ann@example.com", "commit", "-qm", "site",
        cwd=seed)  # fmt: skip
    git("push", "--quiet", "origin", "HEAD:main", cwd=seed)
    return bare


def write_repositories(path: Path, origin: Path, api_url: str, check: str) -> Path:
    path.write_text(
        "repositories:\n"
        "  - name: site\n"
        "    description: The marketing site\n"
        f"    url: file://{origin}\n"
        "    default_branch: main\n"
        "    provider: github\n"
        f"    api_url: {api_url}\n"
        "    repo: acme/site\n"
        "    token_setting: PODIUM_TEST_GITHUB_TOKEN\n"
        f"    check: {json.dumps(check)}\n"
        "    check_timeout_s: 30\n"
    )
    return path


def github_repositories(
    tmp_path: Path, origin: Path, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> Repositories:
    """The platform's side of ``origin`` with GitHub pull requests, its token set."""
    monkeypatch.setenv("PODIUM_TEST_GITHUB_TOKEN", TOKEN)
    repos_file = write_repositories(tmp_path / "r.yaml", origin, github.api_url, "true")
    return Repositories(
        repositories.load(str(repos_file)), tmp_path / "state", author="Podium <p@example.com>"
    )


def test_the_repositories_file_is_checked_at_start(tmp_path: Path) -> None:
    good = tmp_path / "repos.json"
    good.write_text(
        json.dumps([{"name": "site", "description": "The site", "url": "git@github.com:a/b.git"}])
    )
    assert repositories.load(str(good))["site"].default_branch == "main"
    cases = {
        '[{"name": "x", "description": "d", "url": "ftp://h/x"}]': "url must be",
        '[{"name": "x", "description": "d", "url": "file:///x", "provider": "github"}]': "owner",
        '[{"name": "x", "description": "d", "url": "file:///x", "colour": 1}]': "colour",
        '[{"name": "x", "description": "d", "url": "file:///x"},'
        ' {"name": "x", "description": "e", "url": "file:///y"}]': "used twice",
        "[{": "not valid JSON",
    }
    for text, expected in cases.items():
        good.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            repositories.load(str(good))
    with pytest.raises(ConfigError, match="cannot be read"):
        repositories.load(str(tmp_path / "missing.yaml"))
    assert repositories.named_in("Fix the price\nRepository: site\n") == "site"
    assert repositories.named_in("No repository here") == ""


@pytest.fixture
async def github() -> AsyncIterator[FakeGitHub]:
    async with FakeGitHub(TOKEN) as fake:
        yield fake


@pytest.fixture
async def worker(
    nats_server: NatsServer,
    tmp_path: Path,
    origin: Path,
    github: FakeGitHub,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Running]:
    monkeypatch.setenv("PODIUM_TEST_GITHUB_TOKEN", TOKEN)
    # The check runs in the worktree: it sees the agent's change, and no credential.
    check = 'test -f result.md && ! env | grep -q "$(printf ghp_test)" && echo all good'
    repos = write_repositories(tmp_path / "repositories.yaml", origin, github.api_url, check)
    settings = WorkerSettings(
        nats_url=nats_server.url,
        health_port=0,
        agent="offline",
        workspace_root=str(tmp_path / "workspaces"),
        state_dir=str(tmp_path / "state"),
        repositories_file=str(repos),
    )
    async with in_process(WorkerService(settings), settings) as running:
        yield running


async def next_result(sub: object) -> TaskResult:
    while True:
        msg = await sub.next_msg(timeout=60)  # type: ignore[attr-defined]
        event = decode(msg.data)
        if isinstance(event, TaskResult):
            return event


def facts(result: TaskResult) -> dict[str, str]:
    return dict(f.split(": ", 1) for f in result.facts)


async def test_a_repository_task_is_pushed_and_gets_one_pull_request(
    worker: Running,
    js: JetStreamContext,
    tmp_path: Path,
    origin: Path,
    github: FakeGitHub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ids = EventIds(event_id="e-repo", correlation_id="c", conversation_id="email-r1")
    task = TaskRequested(
        **ids,
        task_id="trepo",
        instructions="Update the pricing on the landing page\nRepository: site",
        repository="site",
    )
    sub = await js.subscribe("results.>", ordered_consumer=True)
    await publish(js, subjects.task("trepo"), task)
    first = await next_result(sub)

    assert first.status == "COMPLETE", first
    found = facts(first)
    assert found["Branch"] == "podium/trepo"
    assert found["Diff"] == "1 file changed, 7 insertions(+)"
    assert found["Check"] == "passed"
    assert found["Pull request"] == "https://github.example/acme/site/pull/1"
    assert "all good" in first.details
    # The branch is on the remote, with the agent's change, made from main.
    assert "Request: Update the pricing" in git("show", "podium/trepo:result.md", cwd=origin)
    assert (
        git("merge-base", "main", "podium/trepo", cwd=origin).strip()
        == git("rev-parse", "main", cwd=origin).strip()
    )
    [opened] = [c for c in github.calls if c.method == "POST"]
    assert opened.headers["Authorization"] == f"Bearer {TOKEN}"
    assert opened.body is not None
    assert opened.body["head"] == "podium/trepo" and opened.body["base"] == "main"
    assert opened.body["title"] == "Update the pricing on the landing page"

    # A fix round continues in the same worktree and branch, and updates the same PR.
    followup = TaskFollowup(
        **(ids | {"event_id": "e-fix"}), task_id="trepo", message="Also mention the date."
    )
    await publish(js, subjects.task_followup("trepo"), followup)
    second = await next_result(sub)
    await sub.unsubscribe()
    assert facts(second)["Pull request"] == "https://github.example/acme/site/pull/1"
    assert "Revision 1" in git("show", "podium/trepo:result.md", cwd=origin)
    assert len(git("rev-list", "main..podium/trepo", cwd=origin).split()) == 2
    assert [c.method for c in github.calls] == ["POST", "PATCH"]
    assert len(github.pulls) == 1

    # The token is the platform's alone: not in any file the agent can see, nor a log.
    for path in (tmp_path / "workspaces").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in caplog.text
    # Nor in the environment the Claude CLI would get for this task.
    runtime = ClaudeRuntime(worker.service.settings, tmp_path / "claude-state")  # type: ignore[attr-defined]
    call = AgentCall(role="worker", key="trepo", prompt="", workdir=tmp_path, session_id=None)
    assert TOKEN not in json.dumps(runtime.environment(call))
    # The session record does not carry the worktree (a fix round elsewhere remakes it
    # from the pushed branch); its transcript it does.
    sessions = await Store.open(js, streams.SESSIONS.name, SessionRecord)
    stored = await sessions.get("worker.trepo")
    assert stored is not None
    assert stored[0].transcript_inline and not stored[0].workspace_inline
    assert not stored[0].workspace
    # Nor a remote the agent could push to by itself.
    worktree = tmp_path / "workspaces" / "tasks" / "trepo"
    assert git("remote", cwd=worktree).strip() == ""


async def test_an_unknown_repository_fails_the_task_and_says_why(
    worker: Running, js: JetStreamContext
) -> None:
    ids = EventIds(event_id="e-unknown", correlation_id="c", conversation_id="email-r2")
    task = TaskRequested(**ids, task_id="tnone", instructions="x", repository="nope")
    sub = await js.subscribe("results.>", ordered_consumer=True)
    await publish(js, subjects.task("tnone"), task)
    result = await asyncio.wait_for(next_result(sub), 60)
    await sub.unsubscribe()
    assert result.status == "FAILED"
    assert "unknown repository 'nope'" in result.summary


def test_a_task_naming_an_unknown_repository_is_refused_by_the_conductor(tmp_path: Path) -> None:
    known = {"site": repositories.Repository(name="site", description="The site", url="file:///x")}
    registry = CollectorRegistry()
    actions = Actions(
        ConductorSettings(health_port=0, agent="offline"),
        Metrics(registry, "conductor"),
        ConductorMetrics(registry),
        known,
    )
    conv = Conversation(conversation_id="api-r3", channel="api")
    event = InboundMessage(
        event_id="in-r3", correlation_id="in-r3", conversation_id="api-r3", channel="api",
        sender="ann", text="x",
    )  # fmt: skip
    effects = Effects()
    answer = "SPAWN_WORKER: Fix it\nRepository: other\nSPAWN_WORKER: Fix it\nRepository: site"
    for index, command in enumerate(cmds.parse(answer).commands):
        actions.apply(conv, event, index, command, effects)
    [(_, task)] = effects.stored
    assert isinstance(task, TaskRequested) and task.repository == "site"
    assert any("unknown repository" in n and "'other'" in n for n in conv.notes)


@pytest.mark.e2e
async def test_the_whole_loop_replies_with_the_pull_request(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    origin: Path,
    github: FakeGitHub,
) -> None:
    repos = write_repositories(tmp_path / "repositories.yaml", origin, github.api_url, "true")
    platform = Platform(
        nats_server.url,
        tmp_path,
        env={"PODIUM_REPOSITORIES_FILE": str(repos)},
        per_service={"worker": {"PODIUM_TEST_GITHUB_TOKEN": TOKEN}},
    ).start()
    try:
        await platform.ready()
        await platform.send("Update the pricing on the landing page.\nRepository: site")
        (reply,) = await platform.wait_outbox(1)
        logs = platform.logs(tail=10**7)
    finally:
        platform.stop()
    assert "Pull request: https://github.example/acme/site/pull/1" in reply["body"]
    assert "Check: passed" in reply["body"]
    assert "podium/" in git("branch", "--list", "podium/*", cwd=origin)
    assert TOKEN not in logs


async def test_worktrees_come_from_the_mirror_and_are_removed_when_stale(
    tmp_path: Path, origin: Path
) -> None:
    site = repositories.Repository(name="site", description="The site", url=f"file://{origin}")
    repos = Repositories({"site": site}, tmp_path / "state", author="Podium <p@example.com>")
    workdir = tmp_path / "tasks" / "t1"
    assert await repos.worktree("site", "t1", workdir) == "podium/t1"
    assert (workdir / "index.html").read_text() == "<p>Price: $10</p>\n"
    # Again for the same task (a redelivery): the same worktree, not a new one.
    (workdir / "draft.txt").write_text("work in progress")
    assert await repos.worktree("site", "t1", workdir) == "podium/t1"
    assert (workdir / "draft.txt").exists()
    # inputs/ and outputs/ are the platform's: never part of the commit.
    (workdir / "outputs").mkdir()
    (workdir / "outputs" / "report.csv").write_text("a,b\n")
    assert "outputs" not in git("status", "--porcelain", "--untracked-files=all", cwd=workdir)
    assert await repos.prune("site", 3600) == 0
    assert await repos.prune("site", 0) == 1
    assert not workdir.exists()


@pytest.mark.claude
@pytest.mark.e2e
async def test_the_repository_round_trip_with_the_real_cli(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    origin: Path,
    github: FakeGitHub,
    claude_bin: str,
) -> None:
    def respond(call: MessagesCall) -> Reply:
        text = call.last_user_text
        if is_worker(call):
            if call.tool_results:
                return Reply.text(
                    "Status: COMPLETE\nSummary: Added the new pricing\nDetails:\npricing.md: $12."
                )
            assert "Repository: site" in text, text
            return Reply.write(f"{call.cwd}/pricing.md", "Price: $12\n")
        if "[WORKER:" in text:
            assert "Check: passed" in text and "Diff: 1 file changed" in text, text
            url = re.search(r"^Pull request: (\S+)$", text, re.MULTILINE)
            assert url, text
            return Reply.text(f"REPLY: Done! PR: {url.group(1)}")
        assert "- site: The marketing site" in call.system
        return Reply.text("SPAWN_WORKER: Add pricing.md with the new price ($12)\nRepository: site")

    repos = write_repositories(
        tmp_path / "repositories.yaml", origin, github.api_url, "grep -q 12 pricing.md"
    )
    async with FakeAnthropic(respond) as api:
        platform = claude_platform(
            nats_server,
            tmp_path,
            api,
            claude_bin,
            PODIUM_REPOSITORIES_FILE=str(repos),
            PODIUM_TEST_GITHUB_TOKEN=TOKEN,
        )
        try:
            await platform.ready()
            await platform.send("Please update the pricing on the landing page to $12.")
            (reply,) = await platform.wait_outbox(1)
        finally:
            platform.stop()
    assert reply["body"] == "Done! PR: https://github.example/acme/site/pull/1"
    branch = github.pulls[1]["head"]["ref"]
    assert git("show", f"{branch}:pricing.md", cwd=origin) == "Price: $12\n"
    assert all(TOKEN not in json.dumps(c.raw) for c in api.main_calls)


async def test_what_the_agent_does_to_git_cannot_redirect_the_platforms_push(
    tmp_path: Path, origin: Path, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    repos = github_repositories(tmp_path, origin, github, monkeypatch)
    workdir = tmp_path / "tasks" / "t7"
    await repos.worktree("site", "t7", workdir)
    (workdir / "pricing.md").write_text("Price: $12\n")
    # What a hostile agent (or code it wrote, run by the check) could leave behind:
    decoy = tmp_path / "decoy.git"
    git("init", "--bare", "--quiet", str(decoy), cwd=tmp_path)
    mirror = tmp_path / "state" / "repos" / "site.git"
    marker = tmp_path / "hook-ran"
    (mirror / "hooks" / "pre-push").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (mirror / "hooks" / "pre-push").chmod(0o755)
    (mirror / "hooks" / "pre-commit").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (mirror / "hooks" / "pre-commit").chmod(0o755)
    git("--git-dir", str(mirror), "config", f"url.file://{decoy}.pushInsteadOf", f"file://{origin}",
        cwd=tmp_path)  # fmt: skip
    (workdir / ".git").write_text(f"gitdir: {decoy}\n")
    (workdir / ".gitignore").write_text("!inputs/\n")
    (workdir / "inputs").mkdir()
    (workdir / "inputs" / "private.csv").write_text("secret,data\n")

    async with aiohttp.ClientSession() as http:
        done = await repos.deliver(
            "site", "t7", workdir, title="Pricing", summary="New price", pull_request=0, http=http
        )
    assert "Push: podium/t7 pushed" in done.facts, done.facts
    assert git("show", "podium/t7:pricing.md", cwd=origin) == "Price: $12\n"
    assert "private.csv" not in git("ls-tree", "-r", "--name-only", "podium/t7", cwd=origin)
    assert git("for-each-ref", cwd=decoy).strip() == ""
    assert not marker.exists()


async def test_a_gone_worktree_is_reported_and_never_found_in_a_parent_repository(
    tmp_path: Path, origin: Path
) -> None:
    # The workspace inside someone's checkout (podium up in a project directory).
    git("init", "--quiet", str(tmp_path / "project"), cwd=tmp_path)
    site = repositories.Repository(name="site", description="The site", url=f"file://{origin}")
    repos = Repositories({"site": site}, tmp_path / "state", author="Podium <p@example.com>")
    workdir = tmp_path / "project" / "tasks" / "t8"
    await repos.worktree("site", "t8", workdir)
    await repos.remove("site", workdir)
    workdir.mkdir(parents=True)
    (workdir / "stray.txt").write_text("x")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(GitError, match="worktree is gone"):
            await repos.deliver(
                "site", "t8", workdir, title="t", summary="s", pull_request=0, http=http
            )
    assert git("status", "--porcelain", cwd=tmp_path / "project").strip() == "?? tasks/"
    # A fix round on another replica: the worktree comes back from the pushed branch.
    assert await repos.worktree("site", "t8", workdir) == "podium/t8"
    assert (workdir / "index.html").exists() and not (workdir / "stray.txt").exists()


async def test_a_closed_pull_request_gets_a_new_one(
    tmp_path: Path, origin: Path, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    repos = github_repositories(tmp_path, origin, github, monkeypatch)
    workdir = tmp_path / "tasks" / "t9"
    await repos.worktree("site", "t9", workdir)
    async with aiohttp.ClientSession() as http:
        (workdir / "a.md").write_text("one\n")
        first = await repos.deliver(
            "site", "t9", workdir, title="A", summary="one", pull_request=0, http=http
        )
        github.pulls[first.pull_request]["state"] = "closed"
        (workdir / "a.md").write_text("two\n")
        second = await repos.deliver(
            "site", "t9", workdir, title="A", summary="two", pull_request=first.pull_request,
            http=http,
        )  # fmt: skip
    assert first.pull_request == 1 and second.pull_request == 2
    assert f"Pull request: {github.pulls[2]['html_url']}" in second.facts


def test_agent_services_keep_their_environment_from_their_agents() -> None:
    # PR_SET_DUMPABLE 0: /proc/<pid>/environ (tokens, the NATS password) and memory are
    # closed to other processes of the same user, which is what the agents run as; the
    # processes it starts (the CLI, git) get their own flag back at exec.
    script = (
        "import ctypes, subprocess, sys\n"
        "from podium.common.procs import not_dumpable\n"
        "assert not_dumpable()\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "child = subprocess.run([sys.executable, '-c', "
        "'import ctypes; print(ctypes.CDLL(\"libc.so.6\").prctl(3))'], capture_output=True)\n"
        "print(libc.prctl(3), child.stdout.decode().strip())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    )
    assert done.stdout.split() == ["0", "1"]
