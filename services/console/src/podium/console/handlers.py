"""The console's routes: pages (server-rendered), the JSON API, live updates, sign-in.

Every route goes through :meth:`Console._guard`, which decides who may use it:

- pages redirect to the sign-in form without a session;
- the JSON API takes a session cookie or an operator's token (``Authorization: Bearer``,
  the CLI's way), and answers 401 without either;
- actions (forms and the API's POSTs) need the ``operator`` role, and, in a browser
  session, the session's CSRF token (a form field or ``X-CSRF-Token``).

Everything shown is escaped by the templates (inbound text is hostile), and bidi and
other invisible control characters are shown as what they are (:func:`inert`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import jinja2
import msgspec
from aiohttp import web
from aiohttp_sse import sse_response
from markupsafe import Markup

from podium.common.operators import Operator, Tokens
from podium.console.actions import ActionError, Operations
from podium.console.auth import COOKIE, Session, Sessions, csrf_ok
from podium.console.config import ConsoleSettings
from podium.console.metrics import ConsoleMetrics
from podium.console.readmodel import Index, Spend, dead_letter, dead_letters, task_view, timeline
from podium.contracts.http import (
    AnswerRequest,
    CloseRequest,
    ConversationDetail,
    ConversationList,
    DeadLetterDetail,
    DeadLetterList,
    KillRequest,
    TaskList,
    document,
)
from podium.contracts.ids import new_id
from podium.contracts.state import ReplyView

log = logging.getLogger(__name__)

#: New tokens waiting for their scrypt check beyond which sign-ins get a 429.
MAX_WAITING_CHECKS = 16

Access = Literal["page", "api", "action", "session", "public"]
Handler = Callable[["Visit"], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: Characters that reorder, hide or smuggle text: controls, format characters (bidi
#: overrides and isolates, zero-width marks, tag characters), private-use and unassigned
#: code points, line and paragraph separators — and variation selectors and the
#: combining grapheme joiner, which change nothing a reader sees.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"}
_HIDDEN_MARKS = re.compile("[\u034f\u180b-\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_JSON = msgspec.json.Encoder()


def inert(value: object) -> Markup:
    """Text as the pages show it: escaped, with every character a reader could not see
    (or that reorders what they see) spelled out as ``⟦U+202E⟧``, so a hostile message
    cannot disguise itself or hide instructions meant for the agent."""
    text = "" if value is None else str(value)
    shown = "".join(
        f"⟦U+{ord(c):04X}⟧"
        if c not in "\n\t"
        and (unicodedata.category(c) in _HIDDEN_CATEGORIES or _HIDDEN_MARKS.match(c))
        else c
        for c in text
    )
    return Markup.escape(shown)


@dataclass
class Visit:
    """A request, and who made it."""

    request: web.Request
    operator: str
    role: str
    #: The browser session (None for a bearer token).
    session: Session | None

    @property
    def csrf(self) -> str:
        """The token forms of this session must carry."""
        return self.session.csrf if self.session else ""


class Console:
    """Routes, templates and what they read."""

    def __init__(
        self,
        settings: ConsoleSettings,
        *,
        index: Index,
        spend: Spend,
        operations: Operations,
        tokens: Tokens,
        sessions: Sessions,
        metrics: ConsoleMetrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.index = index
        self.spend = spend
        self.ops = operations
        self.tokens = tokens
        self.sessions = sessions
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("podium.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["inert"] = inert
        self._checking = asyncio.Semaphore(2)
        self._waiting = 0

    def routes(self) -> list[web.AbstractRouteDef]:
        """Every route, each with who may use it."""
        table: list[tuple[str, str, Access, Handler]] = [
            ("GET", "/login", "public", self.login_form),
            ("POST", "/login", "public", self.login),
            ("POST", "/logout", "session", self.logout),
            ("GET", "/", "page", self.conversations_page),
            ("GET", "/conversations/{conversation_id}", "page", self.conversation_page),
            ("GET", "/tasks", "page", self.tasks_page),
            ("GET", "/escalations", "page", self.escalations_page),
            ("GET", "/dead-letters", "page", self.dead_letters_page),
            ("GET", "/dead-letters/{seq}", "page", self.dead_letter_page),
            ("GET", "/spend", "page", self.spend_page),
            ("GET", "/events", "page", self.events),
            ("POST", "/actions/answer", "action", self.answer_form),
            ("POST", "/actions/close", "action", self.close_form),
            ("POST", "/actions/kill", "action", self.kill_form),
            ("POST", "/actions/replay", "action", self.replay_form),
            ("GET", "/api/conversations", "api", self.api_conversations),
            ("GET", "/api/conversations/{conversation_id}", "api", self.api_conversation),
            ("GET", "/api/tasks", "api", self.api_tasks),
            ("GET", "/api/escalations", "api", self.api_escalations),
            ("GET", "/api/dead-letters", "api", self.api_dead_letters),
            ("GET", "/api/dead-letters/{seq}", "api", self.api_dead_letter),
            ("GET", "/api/spend", "api", self.api_spend),
            ("POST", "/api/conversations/{conversation_id}/answer", "action", self.api_answer),
            ("POST", "/api/conversations/{conversation_id}/close", "action", self.api_close),
            ("POST", "/api/tasks/{task_id}/kill", "action", self.api_kill),
            ("POST", "/api/dead-letters/{seq}/replay", "action", self.api_replay),
            ("GET", "/openapi.json", "public", self.openapi),
        ]
        routes: list[web.AbstractRouteDef] = [
            web.route(m, p, self._guard(access, h, p.rsplit("/", 1)[-1]))
            for m, p, access, h in table
        ]
        routes.append(web.static("/static", _static_dir()))
        return routes

    # --- who may do what ------------------------------------------------------

    def _guard(self, access: Access, handler: Handler, name: str) -> Callable[..., Any]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            outcome = "ok"
            try:
                visit = await self._visit(request, access)
                if visit is None:
                    response: web.StreamResponse = web.HTTPSeeOther(
                        "/login?" + urlencode({"next": request.path_qs})
                    )
                else:
                    response = await handler(visit)
            except ActionError as err:
                outcome = "refused" if err.status in (401, 403) else "failed"
                response = _error(err.status, err.code, err.message, request)
            except web.HTTPException as err:
                outcome = "failed" if err.status >= 400 else "ok"
                response = err
            except Exception:
                if access == "action":
                    self.metrics.actions.labels(name, "failed").inc()
                raise
            if access == "action":
                self.metrics.actions.labels(name, outcome).inc()
            if not response.prepared:
                response.headers.update(SECURITY_HEADERS)
            return response

        return guarded

    async def _visit(self, request: web.Request, access: Access) -> Visit | None:
        """Who makes ``request``; None for a page without a session (sign in first).
        Raises the answer for anyone else who may not."""
        if access == "public":
            return Visit(request, "", "", None)
        bearer = request.headers.get("Authorization", "")
        if bearer.startswith("Bearer ") and access not in ("page", "session"):
            operator = await self._check(bearer.removeprefix("Bearer ").strip())
            if operator is None:
                raise ActionError(401, "unauthorized", "unknown token")
            self._may(operator.role, access)
            return Visit(request, operator.name, operator.role, None)
        session = self.sessions.read(request.cookies.get(COOKIE, ""), self.tokens.operators)
        if session is None:
            if access == "page":
                return None
            raise ActionError(401, "unauthorized", "sign in, or send an operator's token")
        self._may(session.role, access)
        if access in ("action", "session") and not csrf_ok(session, await _csrf_of(request)):
            raise ActionError(403, "csrf", "the form is stale or not from this console")
        return Visit(request, session.operator, session.role, session)

    async def _check(self, token: str) -> Operator | None:
        """The operator a token belongs to. A token seen before is known at once; a new
        one costs scrypt (tens of milliseconds), done in a thread, a few at a time, so
        guessing cannot stall the pages; too many waiting is a 429."""
        known = self.tokens.known(token)
        if known is not None:
            return known
        if self._checking.locked() and self._waiting >= MAX_WAITING_CHECKS:
            raise ActionError(429, "busy", "too many sign-in attempts; try again shortly")
        self._waiting += 1
        try:
            async with self._checking:
                return await asyncio.to_thread(self.tokens.check, token)
        finally:
            self._waiting -= 1

    @staticmethod
    def _may(role: str, access: Access) -> None:
        if access == "action" and role != "operator":
            raise ActionError(403, "read_only", "a viewer may look, not act")

    # --- signing in and out -----------------------------------------------------

    async def login_form(self, visit: Visit) -> web.StreamResponse:
        """The sign-in form."""
        return self._page("login.html", visit, error="", next=_local(visit.request.query))

    async def login(self, visit: Visit) -> web.StreamResponse:
        """Check a token; set the session cookie."""
        form = await visit.request.post()
        operator = await self._check(str(form.get("token", "")))
        if operator is None:
            self.metrics.signins.labels("refused").inc()
            log.warning("console sign-in refused")
            return self._page(
                "login.html", visit, error="That token is not one of this console's.",
                next=_local(form), status=401,
            )  # fmt: skip
        self.metrics.signins.labels("ok").inc()
        value, _ = self.sessions.issue(operator)
        response = web.HTTPSeeOther(_local(form))
        response.set_cookie(
            COOKIE,
            value,
            httponly=True,
            samesite="Strict",
            secure=self.settings.secure_cookies,
            max_age=int(self.sessions.ttl_s),
            path="/",
        )
        await self.ops.audit(operator.name, "login")
        return response

    async def logout(self, visit: Visit) -> web.StreamResponse:
        """Forget the session."""
        await self.ops.audit(visit.operator, "logout")
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        return response

    # --- pages ------------------------------------------------------------------

    async def conversations_page(self, visit: Visit) -> web.StreamResponse:
        """Every conversation, filtered."""
        query = visit.request.query
        listed = self._list(query.get("state", ""), query.get("channel", ""), query.get("q", ""))
        return self._page("conversations.html", visit, listed=listed, query=dict(query))

    async def conversation_page(self, visit: Visit) -> web.StreamResponse:
        """One conversation and its timeline."""
        detail = await self._detail(visit.request.match_info["conversation_id"])
        return self._page("conversation.html", visit, detail=detail, nonce=_nonce())

    async def tasks_page(self, visit: Visit) -> web.StreamResponse:
        """Tasks running, waiting for input, finished."""
        tasks = self.index.tasks()
        groups = {
            "Running": [t for t in tasks if t.state in ("queued", "running")],
            "Waiting for input": [t for t in tasks if t.state == "needs_input"],
            "Finished": [t for t in tasks if t.state in ("complete", "failed", "cancelled")],
        }
        return self._page("tasks.html", visit, groups=groups, nonce=_nonce())

    async def escalations_page(self, visit: Visit) -> web.StreamResponse:
        """Conversations waiting for an operator."""
        escalated = [
            (summary, self.index.conversations[summary.conversation_id])
            for summary in self.index.search(state="escalated")
        ]
        return self._page("escalations.html", visit, escalated=escalated, nonce=_nonce())

    async def dead_letters_page(self, visit: Visit) -> web.StreamResponse:
        """Dead letters, newest first."""
        letters = await dead_letters(self.index.js)
        return self._page("dead_letters.html", visit, letters=letters)

    async def dead_letter_page(self, visit: Visit) -> web.StreamResponse:
        """One dead letter, with its payload."""
        detail = await self._dead_letter(visit.request.match_info["seq"])
        return self._page("dead_letter.html", visit, detail=detail, nonce=_nonce())

    async def spend_page(self, visit: Visit) -> web.StreamResponse:
        """Spend by day, sender and conversation, against the limits."""
        return self._page("spend.html", visit, spend=self.index.spend(self.spend.by_day))

    async def events(self, visit: Visit) -> web.StreamResponse:
        """Server-sent events: the id of each conversation that changes (or only the one
        asked for); the page fetches itself again."""
        wanted = visit.request.query.get("conversation", "")
        queue = self.index.listen()
        self.metrics.live.inc()
        try:
            async with sse_response(visit.request, ping_interval=15) as stream:
                # The ping task ends when the page goes away: stop waiting then too.
                gone = asyncio.ensure_future(stream.wait())
                try:
                    while stream.is_connected():
                        change = asyncio.ensure_future(queue.get())
                        await asyncio.wait({change, gone}, return_when=asyncio.FIRST_COMPLETED)
                        if not change.done():
                            change.cancel()
                            break
                        key = change.result()
                        if not key:
                            break  # the console is stopping
                        if not wanted or key == wanted:
                            await stream.send(json.dumps({"conversation": key}), event="change")
                except ConnectionResetError:
                    pass  # the page went away while it was being told
                finally:
                    gone.cancel()
                return stream
        finally:
            self.metrics.live.dec()
            self.index.unlisten(queue)

    # --- actions from forms ---------------------------------------------------

    async def answer_form(self, visit: Visit) -> web.StreamResponse:
        """Answer a conversation; back to it."""
        form = await visit.request.post()
        conversation = str(form.get("conversation_id", ""))
        await self.ops.answer(
            visit.operator, conversation, str(form.get("text", "")), str(form.get("nonce", ""))
        )
        return web.HTTPSeeOther(f"/conversations/{conversation}")

    async def close_form(self, visit: Visit) -> web.StreamResponse:
        """Close a conversation; back to it."""
        form = await visit.request.post()
        conversation = str(form.get("conversation_id", ""))
        await self.ops.close(
            visit.operator, conversation, str(form.get("reason", "")), str(form.get("nonce", ""))
        )
        return web.HTTPSeeOther(f"/conversations/{conversation}")

    async def kill_form(self, visit: Visit) -> web.StreamResponse:
        """Kill a task; back where the form was."""
        form = await visit.request.post()
        await self.ops.kill(
            visit.operator, str(form.get("task_id", "")), str(form.get("reason", "")),
            str(form.get("nonce", "")),
        )  # fmt: skip
        return web.HTTPSeeOther(_local(form, default="/tasks"))

    async def replay_form(self, visit: Visit) -> web.StreamResponse:
        """Replay a dead letter; back to the list."""
        form = await visit.request.post()
        await self.ops.replay(
            visit.operator, _seq(str(form.get("seq", ""))), str(form.get("nonce", ""))
        )
        return web.HTTPSeeOther("/dead-letters")

    # --- the JSON API ---------------------------------------------------------

    async def api_conversations(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/conversations?state=&channel=&q=``."""
        query = visit.request.query
        listed = self._list(query.get("state", ""), query.get("channel", ""), query.get("q", ""))
        return _json(listed)

    async def api_conversation(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/conversations/{id}``."""
        return _json(await self._detail(visit.request.match_info["conversation_id"]))

    async def api_tasks(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/tasks``."""
        return _json(TaskList(tasks=self.index.tasks()))

    async def api_escalations(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/escalations``."""
        return _json(self._list("escalated", "", ""))

    async def api_dead_letters(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/dead-letters``."""
        return _json(DeadLetterList(dead_letters=await dead_letters(self.index.js)))

    async def api_dead_letter(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/dead-letters/{seq}``."""
        return _json(await self._dead_letter(visit.request.match_info["seq"]))

    async def api_spend(self, visit: Visit) -> web.StreamResponse:
        """``GET /api/spend``."""
        return _json(self.index.spend(self.spend.by_day))

    async def api_answer(self, visit: Visit) -> web.StreamResponse:
        """``POST /api/conversations/{id}/answer``."""
        body = await _body(visit.request, AnswerRequest)
        result = await self.ops.answer(
            visit.operator, visit.request.match_info["conversation_id"], body.text, _key(visit)
        )
        return _json(result, status=202)

    async def api_close(self, visit: Visit) -> web.StreamResponse:
        """``POST /api/conversations/{id}/close``."""
        body = await _body(visit.request, CloseRequest)
        result = await self.ops.close(
            visit.operator, visit.request.match_info["conversation_id"], body.reason, _key(visit)
        )
        return _json(result, status=202)

    async def api_kill(self, visit: Visit) -> web.StreamResponse:
        """``POST /api/tasks/{task_id}/kill``."""
        body = await _body(visit.request, KillRequest)
        result = await self.ops.kill(
            visit.operator, visit.request.match_info["task_id"], body.reason, _key(visit)
        )
        return _json(result, status=202)

    async def api_replay(self, visit: Visit) -> web.StreamResponse:
        """``POST /api/dead-letters/{seq}/replay``."""
        result = await self.ops.replay(
            visit.operator, _seq(visit.request.match_info["seq"]), _key(visit)
        )
        return _json(result, status=202)

    async def openapi(self, visit: Visit) -> web.StreamResponse:
        """The OpenAPI document of Podium's HTTP APIs."""
        return web.json_response(document())

    # --- shared -------------------------------------------------------------------

    def _list(self, state: str, channel: str, text: str) -> ConversationList:
        return ConversationList(
            conversations=self.index.search(state=state, channel=channel, text=text)[:500],
            total=len(self.index.conversations),
        )

    async def _detail(self, conversation_id: str) -> ConversationDetail:
        conv = self.index.conversations.get(conversation_id)
        if conv is None:
            raise ActionError(404, "not_found", "no such conversation")
        replies: dict[str, ReplyView] = {}
        if self.index.replies is not None:
            found = await self.index.replies.get(conversation_id)
            replies = {r.command_id: r for r in (found[0].replies if found else [])}
        entries = await timeline(
            self.index.js, conversation_id, replies.get, self.settings.console_timeline_max
        )
        return ConversationDetail(
            conversation=self.index.summary(conv),
            original_request=conv.original_request,
            tasks=[task_view(conversation_id, t) for t in conv.tasks.values()],
            timeline=entries,
        )

    async def _dead_letter(self, seq_text: str) -> DeadLetterDetail:
        found = await dead_letter(self.index.js, _seq(seq_text))
        if found is None:
            raise ActionError(404, "not_found", "no such dead letter")
        view, letter = found
        return DeadLetterDetail(
            dead_letter=view,
            headers=letter.headers,
            payload=letter.payload,
            payload_encoding=letter.payload_encoding,
        )

    def _page(
        self, template: str, visit: Visit, *, status: int = 200, **values: Any
    ) -> web.Response:
        html = self.templates.get_template(template).render(
            operator=visit.operator,
            role=visit.role,
            csrf=visit.csrf,
            path=visit.request.path_qs,
            **values,
        )
        return web.Response(text=html, content_type="text/html", status=status)


def _error(status: int, code: str, message: str, request: web.Request) -> web.Response:
    """The JSON API's error shape; a plain page for a browser's page or form."""
    if request.path.startswith("/api/"):
        return web.Response(
            body=_JSON.encode({"error": {"code": code, "message": message}}),
            content_type="application/json",
            status=status,
        )
    return web.Response(text=f"{status}: {message}", status=status)


def _json(value: msgspec.Struct, *, status: int = 200) -> web.Response:
    return web.Response(body=_JSON.encode(value), content_type="application/json", status=status)


async def _body(request: web.Request, kind: type[Any]) -> Any:
    raw = await request.read()
    if len(raw) > 64 * 1024:
        raise ActionError(413, "too_large", "body over 64 KiB")
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as err:
        raise ActionError(422, "invalid", str(err)) from err
    except msgspec.DecodeError as err:
        raise ActionError(400, "malformed_json", f"body is not valid JSON: {err}") from err


async def _csrf_of(request: web.Request) -> str:
    header = request.headers.get("X-CSRF-Token", "")
    if header:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        return str(form.get("csrf", ""))
    return ""


def _key(visit: Visit) -> str:
    return visit.request.headers.get("Idempotency-Key", "")[:200]


def _seq(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise ActionError(404, "not_found", "no such dead letter")
    return int(text)


def _local(values: Any, default: str = "/") -> str:
    """Where to go after a form: a path of this console, never another site.

    Browsers and URL libraries drop tabs and newlines (``/\t/evil`` becomes ``//evil``)
    and read ``\\`` as ``/``, so a target with any of them, or with a scheme or host,
    is refused.
    """
    target = str(values.get("next", "") or values.get("back", "") or default)
    if any(c.isspace() or unicodedata.category(c)[0] == "C" or c == "\\" for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return default
    return target


def _nonce() -> str:
    return new_id()


def _static_dir() -> str:
    return str(Path(__file__).parent / "static")
