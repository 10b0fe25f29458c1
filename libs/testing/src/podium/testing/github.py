"""A local stand-in for GitHub's pull-requests REST API (the parts Podium calls).

It speaks the real request and response formats of
``POST /repos/{owner}/{repo}/pulls`` (201 with the pull request; 422 "Validation
Failed" when one is open for the head already), ``GET …/pulls?head=owner:branch&state=``
and ``PATCH …/pulls/{number}``, and answers 401 "Bad credentials" without the right
``Authorization: Bearer <token>`` (or ``token <token>``). Every request is recorded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DOCS = "https://docs.github.com/rest/pulls/pulls"


@dataclass
class Call:
    """One request as received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class FakeGitHub:
    """``async with FakeGitHub(token) as gh:`` — ``gh.api_url`` is its base URL."""

    token: str
    calls: list[Call] = field(default_factory=list)
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    api_url: str = ""

    async def __aenter__(self) -> FakeGitHub:
        app = web.Application()
        app.router.add_post("/repos/{owner}/{repo}/pulls", self._create)
        app.router.add_get("/repos/{owner}/{repo}/pulls", self._list)
        app.router.add_patch("/repos/{owner}/{repo}/pulls/{number}", self._update)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.api_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return given in (f"Bearer {self.token}", f"token {self.token}")

    async def _record(self, request: web.Request) -> dict[str, Any] | None:
        body = await request.json() if request.can_read_body else None
        self.calls.append(Call(request.method, request.path_qs, dict(request.headers), body))
        return body

    @staticmethod
    def _error(status: int, message: str, **extra: Any) -> web.Response:
        return web.json_response(
            {"message": message, "documentation_url": DOCS, **extra}, status=status
        )

    async def _create(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._error(401, "Bad credentials")
        owner, repo = request.match_info["owner"], request.match_info["repo"]
        if not isinstance(body, dict) or not all(body.get(k) for k in ("title", "head", "base")):
            return self._error(422, "Validation Failed", errors=[{"code": "missing_field"}])
        head = str(body["head"])
        if any(p["head"]["ref"] == head and p["state"] == "open" for p in self.pulls.values()):
            return self._error(
                422,
                "Validation Failed",
                errors=[
                    {
                        "resource": "PullRequest",
                        "code": "custom",
                        "message": f"A pull request already exists for {owner}:{head}.",
                    }
                ],
            )
        number = next(self._numbers)
        base = f"{self.api_url}/repos/{owner}/{repo}/pulls/{number}"
        pull = {
            "url": base,
            "id": 1000 + number,
            "node_id": f"PR_{number}",
            "html_url": f"https://github.example/{owner}/{repo}/pull/{number}",
            "number": number,
            "state": "open",
            "title": body["title"],
            "body": body.get("body", ""),
            "draft": bool(body.get("draft", False)),
            "head": {"ref": head, "label": f"{owner}:{head}"},
            "base": {"ref": body["base"], "label": f"{owner}:{body['base']}"},
        }
        self.pulls[number] = pull
        return web.json_response(pull, status=201)

    async def _list(self, request: web.Request) -> web.Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401, "Bad credentials")
        head = request.query.get("head", "")
        state = request.query.get("state", "open")
        found = [
            p
            for p in self.pulls.values()
            if (not head or p["head"]["label"] == head) and (state == "all" or p["state"] == state)
        ]
        return web.json_response(found)

    async def _update(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._error(401, "Bad credentials")
        pull = self.pulls.get(int(request.match_info["number"]))
        if pull is None:
            return self._error(404, "Not Found")
        for key in ("title", "body", "state"):
            if isinstance(body, dict) and key in body:
                pull[key] = body[key]
        return web.json_response(pull)
