"""A local fake of the Anthropic Messages API that the real Claude Code CLI runs against.

Point the CLI at it with ``ANTHROPIC_BASE_URL=api.base_url`` and any
``ANTHROPIC_API_KEY``; a *responder* (a plain function, sync or async) decides every
answer, so a test scripts exactly what "the model" says, tool calls included, and the
CLI executes those tools for real (a scripted ``Write`` really writes the file)::

    async with FakeAnthropic(script(Reply.write(path, "hi"), Reply.text("done"))) as api:
        ...run `claude -p ...` with ANTHROPIC_BASE_URL=api.base_url...
        assert api.main_calls[1].tool_results[0].text.startswith("File created")

What the CLI sends (2.1.197, observed with this server; details in the docstrings):

* ``HEAD /`` once at start-up (a reachability probe): answered 200.
* ``POST /v1/messages?beta=true`` with ``"stream": true`` for every model call. The
  first user message opens with a harness-injected ``<system-reminder>`` text block;
  ``messages`` may hold ``system``-role entries after a user message.
* An auxiliary session-title call unless ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``
  (and only for prompts of 10+ characters): see `MessagesCall.is_auxiliary`.
* Nothing else (no ``count_tokens``, ``/v1/models``, quota probe or haiku call).
  ``/v1/messages/count_tokens`` is answered anyway; other paths get the API's own
  404 error shape. Every request of any kind is kept in `FakeAnthropic.http_log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web

__all__ = [
    "ApiError",
    "Block",
    "FakeAnthropic",
    "HangMode",
    "HttpRecord",
    "MessagesCall",
    "Reply",
    "Responder",
    "Rule",
    "ScriptExhausted",
    "TextBlock",
    "ToolResult",
    "ToolUse",
    "Usage",
    "auxiliary_reply",
    "rules",
    "script",
]

# Text blocks the harness injects into user messages (date, CLAUDE.md, agent lists):
# not what the user typed, so the convenience accessors leave them out.
_REMINDER_PREFIX = "<system-reminder>"

# The system prompt of the CLI's session-title call (seen in 2.1.197).
_TITLE_MARKER = "Generate a concise, sentence-case title"


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class TextBlock:
    """A ``text`` content block of the assistant's answer."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` content block: the CLI runs tool ``name`` with ``input``.

    ``id`` is generated (``toolu_…``) when left empty; the follow-up request's
    `ToolResult.tool_use_id` refers to it.
    """

    name: str
    input: Mapping[str, Any]
    id: str = ""


Block = TextBlock | ToolUse


@dataclass(frozen=True)
class Usage:
    """Token counts reported for a reply; the CLI prices them into ``total_cost_usd``.

    With the defaults one opus call costs the CLI $0.000175 (10 in, 5 out), so a
    ``--max-budget-usd`` test needs large counts here to trip the budget.
    """

    input_tokens: int = 10
    output_tokens: int = 5
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The API's ``usage`` object."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass(frozen=True)
class ApiError:
    """An HTTP error in the API's shape: ``{"type":"error","error":{"type","message"}}``.

    How the CLI (2.1.197) takes it, measured: a 5xx is retried 10 times with
    exponential back-off (11 requests over ~185 s) unless ``CLAUDE_CODE_MAX_RETRIES``
    says otherwise (``0``: one request, ``2``: three in ~2 s); a 529 gets at most 3
    requests in all (~2 s); ``x-should-retry: false`` (``should_retry=False``) stops
    retries at once. Then it prints a result with ``is_error: true`` but
    ``subtype: "success"``, ``result: "API Error: …"``, and exits 1.
    """

    status: int = 500
    type: str = "api_error"
    message: str = "Internal server error"
    should_retry: bool | None = None
    retry_after_s: float | None = None


HangMode = Literal["before_headers", "mid_stream"]
"""How a `Reply` stalls. ``before_headers``: never answer at all (the CLI gives up
after ``API_TIMEOUT_MS``, default 600 s). ``mid_stream``: send ``message_start`` and a
first delta, then go silent; the CLI waits 300 s (its stream-idle floor, which no
environment variable lowers), then re-asks without streaming, which also stalls.
Either way Podium's own watchdog must end the run. Released when the server stops."""


@dataclass(frozen=True)
class Reply:
    """What the fake model answers to one ``/v1/messages`` request.

    ``stop_reason`` defaults to ``"tool_use"`` when any block is a `ToolUse`, else
    ``"end_turn"``. ``delay_s`` waits before answering; ``hang`` never answers (see
    `HangMode`); ``error`` answers with an HTTP error instead of a message;
    ``model`` overrides the echoed request model. The classmethods build the usual
    shapes; `dataclasses.replace` adjusts one.
    """

    content: Sequence[Block] = ()
    stop_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    delay_s: float = 0.0
    hang: HangMode | None = None
    error: ApiError | None = None
    model: str | None = None

    @classmethod
    def text(
        cls,
        text: str,
        *,
        usage: Usage | None = None,
        delay_s: float = 0.0,
        stop_reason: str | None = None,
    ) -> Reply:
        """A plain text answer (ends the CLI's turn)."""
        return cls((TextBlock(text),), stop_reason, usage or Usage(), delay_s)

    @classmethod
    def tool(
        cls,
        name: str,
        input: Mapping[str, Any],
        *,
        text: str | None = None,
        usage: Usage | None = None,
        delay_s: float = 0.0,
    ) -> Reply:
        """One call of tool ``name``, optionally preceded by some text."""
        blocks: tuple[Block, ...] = (ToolUse(name, input),)
        if text is not None:
            blocks = (TextBlock(text), *blocks)
        return cls(blocks, None, usage or Usage(), delay_s)

    @classmethod
    def write(
        cls,
        file_path: str,
        content: str,
        *,
        text: str | None = None,
        usage: Usage | None = None,
        delay_s: float = 0.0,
    ) -> Reply:
        """A call of the CLI's ``Write`` tool (``file_path`` absolute, inside the cwd
        so that ``--permission-mode acceptEdits`` allows it)."""
        return cls.tool(
            "Write",
            {"file_path": file_path, "content": content},
            text=text,
            usage=usage,
            delay_s=delay_s,
        )

    @classmethod
    def structured(
        cls, value: Mapping[str, Any], *, usage: Usage | None = None, delay_s: float = 0.0
    ) -> Reply:
        """The answer to a ``--json-schema`` run: a call of the CLI's ``StructuredOutput``.

        The CLI ends the run on it (no further request) and reports the value as
        ``structured_output`` (and, JSON-encoded, as ``result``); a text answer
        instead makes it ask once more ("You MUST call the StructuredOutput tool").
        """
        return cls.tool("StructuredOutput", value, usage=usage, delay_s=delay_s)

    @classmethod
    def http_error(
        cls,
        status: int = 500,
        type: str = "api_error",
        message: str = "Internal server error",
        *,
        should_retry: bool | None = None,
        retry_after_s: float | None = None,
        delay_s: float = 0.0,
    ) -> Reply:
        """An HTTP error answer (see `ApiError` for how the CLI retries)."""
        error = ApiError(status, type, message, should_retry, retry_after_s)
        return cls(delay_s=delay_s, error=error)

    @classmethod
    def overloaded(cls, *, should_retry: bool | None = None) -> Reply:
        """The API's 529 ``overloaded_error`` (the CLI tries at most 3 times, ~2 s)."""
        return cls.http_error(529, "overloaded_error", "Overloaded", should_retry=should_retry)

    @classmethod
    def hanging(cls, mode: HangMode = "before_headers") -> Reply:
        """Never answer (for watchdog tests); released when the server stops."""
        return cls(hang=mode)

    @property
    def effective_stop_reason(self) -> str:
        """The ``stop_reason`` sent: explicit, else derived from the blocks."""
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if any(isinstance(b, ToolUse) for b in self.content) else "end_turn"


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ToolResult:
    """A ``tool_result`` block the CLI sends back after running a tool."""

    tool_use_id: str
    text: str
    is_error: bool
    raw: Mapping[str, Any]


def _blocks(content: Any) -> list[dict[str, Any]]:
    """A message's content as a block list (the API also accepts a bare string)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def _user_text(content: Any) -> str:
    """The user-typed text of one message: its text blocks minus harness reminders."""
    return "\n".join(
        b.get("text", "")
        for b in _blocks(content)
        if b.get("type") == "text" and not str(b.get("text", "")).startswith(_REMINDER_PREFIX)
    )


class MessagesCall:
    """One ``POST /v1/messages`` request, with the views a responder needs.

    ``raw`` is the parsed JSON body; the properties read it lazily.
    """

    def __init__(
        self, raw: dict[str, Any], headers: Mapping[str, str], index: int, path: str
    ) -> None:
        self.raw = raw
        self.headers = headers
        self.index = index
        self.path = path

    def __repr__(self) -> str:
        kind = "aux" if self.is_auxiliary else "main"
        return f"<MessagesCall #{self.index} {kind} {self.model} {self.last_user_text[:40]!r}>"

    @property
    def model(self) -> str:
        """The requested model id (``claude-opus-4-8`` is 2.1.197's default)."""
        return str(self.raw.get("model", ""))

    @property
    def stream(self) -> bool:
        """Whether the client asked for SSE (the CLI always does)."""
        return bool(self.raw.get("stream"))

    @property
    def session_id(self) -> str | None:
        """The CLI's session id, from its ``X-Claude-Code-Session-Id`` header."""
        for key, value in self.headers.items():
            if key.lower() == "x-claude-code-session-id":
                return value
        return None

    @property
    def system(self) -> str:
        """The system prompt flattened to text (blocks joined by newlines).

        The CLI sends a list of blocks: a billing header, an identity line, then the
        prompt proper; ``--append-system-prompt`` text ends up in here.
        """
        system = self.raw.get("system")
        if isinstance(system, str):
            return system
        return "\n".join(b.get("text", "") for b in _blocks(system) if b.get("type") == "text")

    @property
    def cwd(self) -> str:
        """The CLI's working directory, from "Primary working directory: …" in the system
        prompt ("" if absent): where a scripted ``Write`` should put its file."""
        for line in self.system.splitlines():
            _, found, rest = line.partition("Primary working directory:")
            if found:
                return rest.strip()
        return ""

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The raw ``messages`` list (may hold ``system``-role entries)."""
        messages = self.raw.get("messages")
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    @property
    def tools(self) -> list[str]:
        """Names of the tools offered to the model."""
        tools = self.raw.get("tools") or []
        return [str(t.get("name", "")) for t in tools if isinstance(t, dict)]

    def _last_user(self) -> dict[str, Any] | None:
        # The CLI may append system-role entries after the user's message, so the
        # last user message is not necessarily the last message.
        for message in self.messages[::-1]:
            if message.get("role") == "user":
                return message
        return None

    @property
    def last_user_text(self) -> str:
        """Text of the last ``user`` message, without ``<system-reminder>`` blocks.

        Empty when that message only carries tool results (see `tool_results`).
        """
        last = self._last_user()
        return _user_text(last.get("content")) if last is not None else ""

    @property
    def tool_results(self) -> list[ToolResult]:
        """The ``tool_result`` blocks of the last ``user`` message."""
        last = self._last_user()
        if last is None:
            return []
        results = []
        for block in _blocks(last.get("content")):
            if block.get("type") != "tool_result":
                continue
            content = block.get("content")
            text = content if isinstance(content, str) else _user_text(content)
            results.append(
                ToolResult(
                    tool_use_id=str(block.get("tool_use_id", "")),
                    text=text,
                    is_error=bool(block.get("is_error", False)),
                    raw=block,
                )
            )
        return results

    @property
    def all_user_texts(self) -> list[str]:
        """The user-typed text of every ``user`` message in order (tool-result-only
        messages skipped): on ``--resume`` it starts with the earlier turns' prompts."""
        texts = (_user_text(m.get("content")) for m in self.messages if m.get("role") == "user")
        return [t for t in texts if t]

    @property
    def is_auxiliary(self) -> bool:
        """True for the CLI's housekeeping calls, False for agent turns (main or subagent).

        Evidence (2.1.197, ``-p``, every model alias, ``--tools ""``,
        ``--system-prompt``, ``--bare``, ``--json-schema``, the ``Agent`` tool):

        * main-agent turns always carry ``context_management`` (even with no tools);
        * subagent turns lack ``context_management`` but always carry tools;
        * the session-title call has ``"tools": []``, no ``context_management``,
          ``thinking`` disabled, a JSON ``output_config.format`` and the system
          prompt "Generate a concise, sentence-case title…". The CLI sends it
          (before the main turn, in ``-p`` and per turn in stream-json mode) only
          when nonessential traffic is allowed and the prompt is at least 10
          characters long; ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` stops it.
          No other auxiliary call was seen (no quota probe, no haiku call, no
          ``count_tokens``).

        So: no tools and no ``context_management``, or a known auxiliary marker
        (the title prompt, or ``max_tokens`` ≤ 1 as in a quota probe).
        """
        if _TITLE_MARKER in self.system:
            return True
        max_tokens = self.raw.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens <= 1:
            return True
        return not self.tools and "context_management" not in self.raw


# --------------------------------------------------------------------------- responders

Responder = Callable[[MessagesCall], Reply | Awaitable[Reply]]
"""Decides the answer to each call; may be sync or async."""


class ScriptExhausted(AssertionError):
    """A scripted responder got more main calls than it has replies."""


def script(*replies: Reply) -> Responder:
    """A responder answering successive calls with ``replies`` in order.

    One more call than replies raises `ScriptExhausted`, which the server turns
    into a non-retryable error for the CLI and re-raises when the test's
    ``async with`` block ends.
    """
    queue = list(replies)

    def respond(call: MessagesCall) -> Reply:
        if not queue:
            raise ScriptExhausted(f"no scripted reply left for {call!r}")
        return queue.pop(0)

    return respond


@dataclass(frozen=True)
class Rule:
    """Answer ``reply`` when ``when`` matches: a substring of `MessagesCall.last_user_text`
    or a predicate over the call. ``once`` retires the rule after its first use."""

    when: str | Callable[[MessagesCall], bool]
    reply: Reply | Callable[[MessagesCall], Reply]
    once: bool = False

    def matches(self, call: MessagesCall) -> bool:
        """Whether this rule applies to ``call``."""
        if isinstance(self.when, str):
            return self.when in call.last_user_text
        return self.when(call)


def rules(*items: Rule | tuple[str, Reply], default: Reply | None = None) -> Responder:
    """A responder trying ``items`` in order; the first match answers.

    ``("text", reply)`` is shorthand for ``Rule("text", reply)``. Tool results
    carry no user text, so follow-ups are matched with a predicate, e.g.
    ``Rule(lambda c: bool(c.tool_results), Reply.text("done"))``. Without a match
    ``default`` answers, else `ScriptExhausted` is raised.
    """
    active = [item if isinstance(item, Rule) else Rule(*item) for item in items]

    def respond(call: MessagesCall) -> Reply:
        for rule in active:
            if rule.matches(call):
                if rule.once:
                    active.remove(rule)
                return rule.reply(call) if callable(rule.reply) else rule.reply
        if default is not None:
            return default
        raise ScriptExhausted(f"no rule matches {call!r}")

    return respond


def _sample(schema: Any) -> Any:
    """A minimal value satisfying a simple JSON schema (for auxiliary JSON answers)."""
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _sample(sub) for name, sub in props.items()}
    if kind == "array":
        return []
    if kind == "string":
        return "Test session"
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    return None


def auxiliary_reply(call: MessagesCall) -> Reply:
    """The harmless default answer to an auxiliary call.

    JSON matching the requested ``output_config.format`` schema when there is one
    (the title call wants ``{"title": …}``), else a short text.
    """
    fmt = (call.raw.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return Reply.text(json.dumps(_sample(fmt.get("schema"))))
    return Reply.text("OK")


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class HttpRecord:
    """Any HTTP request the server received (all paths), for protocol discovery."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    # The API's own framing: an `event:` line, one compact JSON `data:` line, blank line.
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(text: str, size: int = 16) -> list[str]:
    # Several deltas per block, as the real API sends, so clients must accumulate.
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class FakeAnthropic:
    """A local Anthropic Messages API server; use as ``async with FakeAnthropic(r) as api``.

    ``responder`` answers agent turns; auxiliary calls (`MessagesCall.is_auxiliary`)
    get `auxiliary_reply` unless ``answer_auxiliary`` hands them to the responder too.
    Every ``/v1/messages`` body lands in `requests` (as `MessagesCall` in `calls`),
    every HTTP request of any kind in `http_log`. An exception raised by the responder
    is answered with a non-retryable 400 (so the CLI fails at once instead of
    retrying), kept in `errors`, and re-raised by `stop` / the ``async with`` exit.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        answer_auxiliary: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.responder: Responder = responder or (lambda _call: Reply.text("OK"))
        self.answer_auxiliary = answer_auxiliary
        self.requests: list[dict[str, Any]] = []
        self.calls: list[MessagesCall] = []
        self.http_log: list[HttpRecord] = []
        self.errors: list[BaseException] = []
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._counter = itertools.count()

    # -- lifecycle

    async def start(self) -> None:
        """Bind (port 0 picks a free port) and start serving."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Hung handlers are released by `_closing`, so shutdown needs no long grace.
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Release hung requests, stop serving, and re-raise the first responder error."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.errors:
            raise self.errors[0]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
            return
        # The block's own failure is the better story; don't mask it with ours.
        with contextlib.suppress(Exception):
            await self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``, the value for ``ANTHROPIC_BASE_URL``."""
        if self._runner is None:
            raise RuntimeError("FakeAnthropic is not started")
        return f"http://{self._host}:{self._port}"

    def cli_env(self, config_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Environment entries that point a Claude Code CLI at this server, offline.

        Merge into the child's environment. ``config_dir`` becomes both
        ``CLAUDE_CONFIG_DIR`` (sessions live there, per cwd) and ``HOME``; give each
        concurrent CLI its own. Nonessential traffic is off, which also stops the
        auxiliary session-title call.
        """
        return {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": "test-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CONFIG_DIR": os.fspath(config_dir),
            "HOME": os.fspath(config_dir),
        }

    @property
    def main_calls(self) -> list[MessagesCall]:
        """The calls that were agent turns (not `MessagesCall.is_auxiliary`)."""
        return [c for c in self.calls if not c.is_auxiliary]

    # -- HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        self.http_log.append(HttpRecord(request.method, request.path_qs, request.headers, body))
        if request.method == "HEAD":
            # The CLI probes `HEAD /` at start-up; any answer will do.
            return web.Response()
        if request.method == "POST" and request.path == "/v1/messages":
            if not isinstance(body, dict):
                return self._error(ApiError(400, "invalid_request_error", "body is not JSON"))
            return await self._messages(request, body)
        if request.method == "POST" and request.path == "/v1/messages/count_tokens":
            # A rough count is enough: nothing the CLI does with it matters offline.
            size = len(json.dumps(body.get("messages", []) if isinstance(body, dict) else ""))
            return web.json_response({"input_tokens": max(1, size // 4)})
        return self._error(ApiError(404, "not_found_error", f"no route {request.path}"))

    def _error(self, error: ApiError) -> web.Response:
        request_id = _new_id("req")
        headers = {"request-id": request_id}
        if error.should_retry is not None:
            headers["x-should-retry"] = "true" if error.should_retry else "false"
        if error.retry_after_s is not None:
            headers["retry-after"] = str(error.retry_after_s)
        payload = {
            "type": "error",
            "error": {"type": error.type, "message": error.message},
            "request_id": request_id,
        }
        return web.json_response(payload, status=error.status, headers=headers)

    async def _messages(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        self.requests.append(body)
        call = MessagesCall(body, request.headers, next(self._counter), request.path_qs)
        self.calls.append(call)
        try:
            if call.is_auxiliary and not self.answer_auxiliary:
                reply = auxiliary_reply(call)
            else:
                result = self.responder(call)
                reply = await result if inspect.isawaitable(result) else result
        except Exception as exc:  # noqa: BLE001 - reported to the test via stop()
            self.errors.append(exc)
            return self._error(
                ApiError(400, "invalid_request_error", f"fake responder failed: {exc!r}", False)
            )
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        # A non-streaming request has no "middle": a stalled upstream just never answers.
        if reply.hang == "before_headers" or (reply.hang and not call.stream):
            await self._closing.wait()
            return web.Response(status=503)
        if reply.error is not None:
            return self._error(reply.error)
        message = self._message(call, reply)
        if not call.stream:
            return web.json_response(message, headers={"request-id": _new_id("req")})
        return await self._stream(request, message, reply)

    def _message(self, call: MessagesCall, reply: Reply) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for block in reply.content:
            if isinstance(block, TextBlock):
                content.append({"type": "text", "text": block.text})
            else:
                content.append(
                    {
                        "type": "tool_use",
                        "id": block.id or _new_id("toolu"),
                        "name": block.name,
                        "input": dict(block.input),
                    }
                )
        return {
            "id": _new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": reply.model or call.model,
            "content": content,
            "stop_reason": reply.effective_stop_reason,
            "stop_sequence": None,
            "usage": reply.usage.as_dict(),
        }

    async def _stream(
        self, request: web.Request, message: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": _new_id("req"),
            }
        )
        await response.prepare(request)
        usage = reply.usage.as_dict()
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            # The API reports output_tokens=1 at the start and the total at the end.
            "usage": {**usage, "output_tokens": 1},
        }
        await response.write(_sse("message_start", {"type": "message_start", "message": start}))
        await response.write(_sse("ping", {"type": "ping"}))
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                opening: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": c} for c in _chunks(block["text"])]
            else:
                opening = {**block, "input": {}}
                encoded = json.dumps(block["input"], separators=(",", ":"))
                # The API opens every tool input with an empty partial_json.
                deltas = [{"type": "input_json_delta", "partial_json": ""}]
                deltas += [
                    {"type": "input_json_delta", "partial_json": c} for c in _chunks(encoded)
                ]
            await response.write(
                _sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": opening},
                )
            )
            for delta in deltas:
                await response.write(
                    _sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
                )
                if reply.hang == "mid_stream":
                    # Headers and a first delta are out: the CLI is mid-stream, then silence.
                    await self._closing.wait()
                    return response
            await response.write(
                _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            )
        if reply.hang == "mid_stream":
            # A reply with no blocks stalls right after message_start.
            await self._closing.wait()
            return response
        await response.write(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": usage,
                },
            )
        )
        await response.write(_sse("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response
