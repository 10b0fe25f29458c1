"""The fake Anthropic API: its wire format, and the real Claude Code CLI running against it."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from podium.testing.anthropic import (
    FakeAnthropic,
    MessagesCall,
    Reply,
    Rule,
    ScriptExhausted,
    Usage,
    rules,
    script,
)
from podium.testing.claude import claude_binary

CLAUDE_BIN = claude_binary() or "claude"

needs_claude = pytest.mark.skipif(
    claude_binary() is None,
    reason="the Claude Code CLI is not installed (make test installs it into tools/claude)",
)

# A main-agent request body as the CLI shapes it (trimmed): note the harness reminder
# block before the prompt and the system-role entry after the user message.
MAIN_BODY: dict[str, Any] = {
    "model": "claude-opus-4-8",
    "max_tokens": 64000,
    "stream": True,
    "context_management": {"edits": []},
    "tools": [{"name": "Write"}, {"name": "Bash"}],
    "system": [{"type": "text", "text": "You are an agent."}, {"type": "text", "text": "X"}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>\ndate\n</system-reminder>\n\n"},
                {"type": "text", "text": "first"},
            ],
        },
        {"role": "system", "content": "Available agent types..."},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "system", "content": "more context"},
    ],
}

TITLE_BODY: dict[str, Any] = {
    "model": "claude-opus-4-8",
    "max_tokens": 64000,
    "stream": True,
    "tools": [],
    "thinking": {"type": "disabled"},
    "system": [{"type": "text", "text": "Generate a concise, sentence-case title (3-7 words)"}],
    "output_config": {
        "format": {
            "type": "json_schema",
            "schema": {"type": "object", "properties": {"title": {"type": "string"}}},
        }
    },
    "messages": [{"role": "user", "content": [{"type": "text", "text": "<session>hi</session>"}]}],
}


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of an SSE body; asserts the API's event/data framing."""
    events = []
    for chunk in text.strip().split("\n\n"):
        event_line, data_line = chunk.split("\n")
        assert event_line.startswith("event: ")
        assert data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == event_line.removeprefix("event: ")
        events.append((data["type"], data))
    return events


# --------------------------------------------------------------------------- wire format


async def test_streams_text_and_tool_use_like_the_api() -> None:
    reply = Reply.tool("Write", {"file_path": "/x/y.txt", "content": "z" * 40}, text="working")
    async with (
        FakeAnthropic(script(reply)) as api,
        aiohttp.ClientSession() as http,
        http.post(f"{api.base_url}/v1/messages?beta=true", json=MAIN_BODY) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = parse_sse(await resp.text())
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert events[0][1]["message"]["content"] == []
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "Write"
    assert starts[1]["id"].startswith("toolu_")
    text = "".join(
        d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["index"] == 0
    )
    partial = "".join(
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["index"] == 1
    )
    assert text == "working"
    assert json.loads(partial) == {"file_path": "/x/y.txt", "content": "z" * 40}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert api.requests == [MAIN_BODY]


async def test_non_streaming_error_count_tokens_and_unknown_paths() -> None:
    replies = script(
        Reply.text("plain", usage=Usage(input_tokens=7, output_tokens=3)),
        Reply.overloaded(should_retry=False),
    )
    async with FakeAnthropic(replies) as api, aiohttp.ClientSession() as http:
        body = {**MAIN_BODY, "stream": False}
        async with http.post(f"{api.base_url}/v1/messages", json=body) as resp:
            message = await resp.json()
        assert message["content"] == [{"type": "text", "text": "plain"}]
        assert message["stop_reason"] == "end_turn"
        assert message["usage"]["input_tokens"] == 7
        async with http.post(f"{api.base_url}/v1/messages", json=body) as resp:
            assert resp.status == 529
            assert resp.headers["x-should-retry"] == "false"
            error = await resp.json()
        assert error["type"] == "error"
        assert error["error"] == {"type": "overloaded_error", "message": "Overloaded"}
        async with http.post(f"{api.base_url}/v1/messages/count_tokens", json=body) as resp:
            assert (await resp.json())["input_tokens"] > 0
        async with http.get(f"{api.base_url}/v1/models") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found_error"
        async with http.head(f"{api.base_url}/") as resp:
            assert resp.status == 200
    assert [r.path for r in api.http_log][-2:] == ["/v1/models", "/"]


def test_messages_call_views() -> None:
    call = MessagesCall(MAIN_BODY, {"X-Claude-Code-Session-Id": "s-1"}, 0, "/v1/messages")
    assert call.last_user_text == "second"
    assert call.all_user_texts == ["first", "second"]
    assert call.system == "You are an agent.\nX"
    assert call.tools == ["Write", "Bash"]
    assert call.session_id == "s-1"
    assert not call.is_auxiliary
    title = MessagesCall(TITLE_BODY, {}, 1, "/v1/messages")
    assert title.is_auxiliary
    # A main turn run with `--tools ""` still carries context_management: not auxiliary.
    bare = MessagesCall({**MAIN_BODY, "tools": []}, {}, 2, "/v1/messages")
    assert not bare.is_auxiliary


async def test_auxiliary_calls_bypass_the_responder() -> None:
    async with FakeAnthropic(script(Reply.text("main"))) as api, aiohttp.ClientSession() as http:
        body = {**TITLE_BODY, "stream": False}
        async with http.post(f"{api.base_url}/v1/messages", json=body) as resp:
            title = await resp.json()
        assert json.loads(title["content"][0]["text"]) == {"title": "Test session"}
        async with http.post(f"{api.base_url}/v1/messages", json={**MAIN_BODY, "stream": False}):
            pass
    assert [c.is_auxiliary for c in api.calls] == [True, False]
    assert len(api.main_calls) == 1


async def test_responder_failures_surface_in_the_test() -> None:
    api = FakeAnthropic(script())
    await api.start()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{api.base_url}/v1/messages", json={**MAIN_BODY, "stream": False}) as resp,
    ):
        assert resp.status == 400
        assert resp.headers["x-should-retry"] == "false"
    with pytest.raises(ScriptExhausted):
        await api.stop()


async def test_hang_is_released_by_stop() -> None:
    api = FakeAnthropic(script(Reply.hanging()))
    await api.start()
    async with aiohttp.ClientSession() as http:

        async def post() -> int:
            async with http.post(f"{api.base_url}/v1/messages", json=MAIN_BODY) as resp:
                return resp.status

        request = asyncio.create_task(post())
        await asyncio.sleep(0.3)
        assert not request.done()
        await asyncio.wait_for(api.stop(), 5)
        try:
            status = await request
        except aiohttp.ClientError:
            status = 0  # the connection closed under it: just as good
    assert status in (0, 503)


def test_rules_match_in_order() -> None:
    responder = rules(
        Rule(lambda c: bool(c.tool_results), Reply.text("after tool")),
        ("second", Reply.text("matched")),
        default=Reply.text("fallback"),
    )
    call = MessagesCall(MAIN_BODY, {}, 0, "/v1/messages")
    reply = responder(call)
    assert isinstance(reply, Reply)
    assert reply.content[0] == Reply.text("matched").content[0]


# --------------------------------------------------------------------------- real CLI


async def run_claude(
    api: FakeAnthropic, cwd: Path, home: Path, *args: str, timeout_s: float = 20.0
) -> tuple[int, str, str]:
    """Run the CLI with ``args`` in ``cwd`` against ``api``; return (rc, stdout, stderr)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **api.cli_env(home)}
    # stdin must not be an open pipe: the CLI would wait 3 s for a piped prompt.
    proc = await asyncio.create_subprocess_exec(
        CLAUDE_BIN,
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A working directory and a private config dir / HOME."""
    cwd, home = tmp_path / "work", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    return cwd, home


@pytest.mark.claude
@needs_claude
async def test_cli_print_json(dirs: tuple[Path, Path]) -> None:
    cwd, home = dirs
    async with FakeAnthropic(script(Reply.text("hi there"))) as api:
        rc, out, err = await run_claude(api, cwd, home, "-p", "hello", "--output-format", "json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["type"] == "result"
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["result"] == "hi there"
    assert result["num_turns"] == 1
    assert result["total_cost_usd"] > 0
    uuid.UUID(result["session_id"])
    [call] = api.calls
    assert call.last_user_text == "hello"
    assert call.session_id == result["session_id"]
    assert not call.is_auxiliary


@pytest.mark.claude
@needs_claude
async def test_cli_resume_sends_history_and_needs_same_cwd(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    cwd, home = dirs
    session = str(uuid.uuid4())
    responder = rules(("ALPHA", Reply.text("first answer")), ("BETA", Reply.text("second answer")))
    async with FakeAnthropic(responder) as api:
        rc, out, err = await run_claude(
            api, cwd, home, "-p", "ALPHA", "--output-format", "json", "--session-id", session
        )
        assert rc == 0, err
        assert json.loads(out)["session_id"] == session
        rc, out, err = await run_claude(
            api, cwd, home, "-p", "BETA", "--output-format", "json", "--resume", session
        )
        assert rc == 0, err
        result = json.loads(out)
        assert result["result"] == "second answer"
        assert result["session_id"] == session
        resumed = api.main_calls[-1]
        assert resumed.all_user_texts == ["ALPHA", "BETA"]
        assistant = [m for m in resumed.messages if m["role"] == "assistant"]
        assert assistant[0]["content"][0]["text"] == "first answer"

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        calls_before = len(api.calls)
        rc, out, err = await run_claude(
            api, elsewhere, home, "-p", "GAMMA", "--output-format", "json", "--resume", session
        )
    assert rc == 1
    assert out == ""
    assert f"No conversation found with session ID: {session}" in err
    assert len(api.calls) == calls_before


@pytest.mark.claude
@needs_claude
async def test_cli_runs_a_scripted_write(dirs: tuple[Path, Path]) -> None:
    cwd, home = dirs
    target = cwd / "out.txt"
    responder = script(Reply.write(str(target), "hello file\n", text="writing"), Reply.text("done"))
    async with FakeAnthropic(responder) as api:
        args = ["-p", "write it", "--output-format", "json", "--permission-mode", "acceptEdits"]
        rc, out, err = await run_claude(api, cwd, home, *args)
    assert rc == 0, err
    result = json.loads(out)
    assert (result["subtype"], result["result"], result["num_turns"]) == ("success", "done", 2)
    assert target.read_text() == "hello file\n"
    _, follow_up = api.main_calls
    [assistant] = [m for m in follow_up.messages if m["role"] == "assistant"]
    tool_use = assistant["content"][-1]
    assert tool_use["type"] == "tool_use"
    [tool_result] = follow_up.tool_results
    assert tool_result.tool_use_id == tool_use["id"]
    assert tool_result.text.startswith(f"File created successfully at: {target}")
    assert not tool_result.is_error
    assert follow_up.last_user_text == ""
