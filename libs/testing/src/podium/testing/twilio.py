"""A fake of Twilio's Programmable Messaging REST API, for tests driven by the real client.

It speaks the real wire format of ``POST /2010-04-01/Accounts/{sid}/Messages.json``:
form-encoded parameters, HTTP basic auth with the account SID and auth token, a
201 JSON message resource, Twilio's JSON error bodies (``code``, ``message``,
``more_info``, ``status``) and the error codes the notifier must tell apart
(21211 invalid number, 21610 opted out, 21617 body too long, 20429 too many
requests). It also plays Twilio's side of status callbacks: ``callback`` POSTs a
form signed with ``X-Twilio-Signature`` to the StatusCallback URL a message was
created with.

Only a paid API gets a fake; everything else in the tests is real.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

from podium.common.runtime import listen

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass
class Sent:
    """A message the fake accepted."""

    sid: str
    to: str
    from_: str
    body: str
    messaging_service_sid: str
    status_callback: str
    form: dict[str, str]


@dataclass
class Script:
    """What to answer next, in order, before accepting normally.

    Entries: an HTTP status (429, 500, 503…) to refuse with, ``"hang"`` to hold
    the request until :meth:`FakeTwilio.release` (the message *is* accepted:
    a request that left and got no answer), or ``"drop"`` to accept the message
    and close the connection without answering.
    """

    replies: list[int | str] = field(default_factory=list)


class FakeTwilio:
    """The fake API on a free loopback port."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.sent: list[Sent] = []
        self.requests = 0
        self.script = Script()
        self.opted_out: set[str] = set()
        self.received = asyncio.Event()
        self._held = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL to give the client (in place of https://api.twilio.com)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeTwilio:
        """Listen on a free port."""
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", self._create_message)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = await listen(self._runner, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Stop listening (a held request is released first)."""
        self._held.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        """Let held requests answer."""
        self._held.set()

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        auth = request.headers.get("Authorization", "")
        try:
            given = aiohttp.BasicAuth.decode(auth)
        except ValueError:
            given = None
        if (
            given is None
            or request.match_info["account"] != self.account_sid
            or given.login != self.account_sid
            or not secrets.compare_digest(given.password, self.auth_token)
        ):
            return _error(401, 20003, "Authenticate")
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self.script.replies:
            reply = self.script.replies.pop(0)
            if isinstance(reply, int):
                code = 20429 if reply == 429 else 20500
                return _error(reply, code, "Too Many Requests" if reply == 429 else "Internal")
        else:
            reply = ""
        to = form.get("To", "")
        sender = form.get("From", "")
        service = form.get("MessagingServiceSid", "")
        body = form.get("Body", "")
        if not E164.match(to):
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not (sender or service):
            return _error(400, 21603, "A 'From' phone number is required.")
        if not body and not form.get("MediaUrl"):
            return _error(400, 21602, "Message body is required.")
        if len(body.encode("utf-16-le")) // 2 > 1600:
            return _error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if to in self.opted_out:
            return _error(400, 21610, "Attempt to send to unsubscribed recipient")
        sid = "SM" + secrets.token_hex(16)
        message = Sent(
            sid=sid,
            to=to,
            from_=sender,
            body=body,
            messaging_service_sid=service,
            status_callback=form.get("StatusCallback", ""),
            form=form,
        )
        self.sent.append(message)
        self.received.set()
        if reply == "hang":
            await self._held.wait()
        elif reply == "drop":
            assert request.transport is not None  # noqa: S101
            request.transport.close()
            return web.Response(status=201)
        return web.json_response(self._resource(message, form), status=201)

    def _resource(self, message: Sent, form: dict[str, str]) -> dict[str, Any]:
        now = formatdate(usegmt=True)
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{message.sid}.json"
        body = message.body
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": message.from_ or None,
            "messaging_service_sid": message.messaging_service_sid or None,
            "num_media": "0",
            "num_segments": str(max(1, -(-len(body) // 153))),
            "price": None,
            "price_unit": "USD",
            "sid": message.sid,
            "status": "accepted" if message.messaging_service_sid else "queued",
            "subresource_uris": {"media": uri.replace(".json", "/Media.json")},
            "to": message.to,
            "uri": uri,
        }

    async def callback(
        self, message: Sent, status: str, *, error_code: str = "", reach: tuple[str, str] = ("", "")
    ) -> int:
        """POST a status callback for ``message``, signed as Twilio signs it; the HTTP status.

        Twilio signs and calls the public StatusCallback URL; ``reach`` =
        (public base, reachable base) maps it to where the test's ingress listens.
        """
        target = message.status_callback
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "From": message.from_,
            "MessageSid": message.sid,
            "MessageStatus": status,
            "SmsSid": message.sid,
            "SmsStatus": status,
            "To": message.to,
        }
        if error_code:
            params["ErrorCode"] = error_code
        if message.messaging_service_sid:
            params["MessagingServiceSid"] = message.messaging_service_sid
        signature = RequestValidator(self.auth_token).compute_signature(target, params)
        public, reachable = reach
        return await post_signed(target.replace(public, reachable, 1), params, signature)


async def post_signed(url: str, params: dict[str, str], signature: str) -> int:
    """POST ``params`` as a form with ``X-Twilio-Signature``; the response status."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=params, headers={"X-Twilio-Signature": signature}) as resp,
    ):
        await resp.read()
        return resp.status


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
    )
