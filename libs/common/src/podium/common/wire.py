"""A lean JetStream publisher on its own NATS connection, for the ingress's hot path.

Every accepted webhook waits for one durable publish: a core ``HPUB`` whose
reply subject receives the stream's acknowledgement. Through nats-py that
round trip costs about as much CPU as all of aiohttp's handling of the request
(a flusher task, a ``StreamReader``, a per-message queue and task switch,
header validation by regex; docs/performance.md). This client speaks the same
wire protocol with only what a publisher needs, on an ``asyncio.Protocol``:

- writes made in one event-loop iteration go out in one ``transport.write``;
- replies are parsed in ``data_received`` and resolve their waiter directly;
- deadlines are kept with the waiting publishes and swept by one timer, not a timer
  per publish.

Scope, on purpose: plain TCP with user/password (or none). A deployment with
TLS or a ``.creds`` file uses :class:`podium.common.bus.Publisher` on the
service's nats-py connection instead (:func:`open_publisher` chooses).

A lost connection fails every publish waiting for its acknowledgement with
:class:`PublishError` (the ingress answers 503 and the provider retries; the
stable ``Nats-Msg-Id`` makes the retry harmless if the first one was stored)
and reconnects in the background; publishes fail fast until it is back.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import re
import secrets
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit

import msgspec
from nats.aio.client import Client

from podium.common import subjects
from podium.common.bus import _ACK, Ack, Publisher, PublishError
from podium.common.config import CommonSettings
from podium.common.events import SCHEMA_VERSION, Event, encode

log = logging.getLogger(__name__)

_CRLF = b"\r\n"
_CONNECT_TIMEOUT_S = 5.0
_SWEEP_S = 0.1
#: Silence on the connection for this long sends a PING; twice as long, it is given up
#: (a peer gone without a FIN or RST is otherwise noticed only by publishes timing out).
_IDLE_PING_S = 15.0
_BAD_SUBJECT = re.compile(r"\s")
_REFUSED_PUBLISH = re.compile(r'^Permissions Violation for Publish to "([^"]+)"')


class EventPublisher(Protocol):
    """What the ingress needs: publish an event durably, or raise PublishError."""

    async def publish(
        self, subject: str, event: Event, *, msg_id: str | None = None, timeout_s: float = 5.0
    ) -> Ack: ...

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...


class Unsupported(Exception):
    """The server or settings need something this client does not do (TLS, nkeys)."""


class _Server:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "://" in url else "nats://" + url)
        if parts.scheme not in ("nats", ""):
            raise Unsupported(f"scheme {parts.scheme}://")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 4222
        self.user = unquote(parts.username or "")
        self.password = unquote(parts.password or "")
        if self.user and parts.password is None:
            # nats://TOKEN@host is token authentication, which this client does not speak.
            raise Unsupported("token authentication in the URL")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _Wire(asyncio.Protocol):
    """Bytes in, bytes out; the parsing lives in :class:`DirectPublisher`."""

    def __init__(self, owner: DirectPublisher) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The server's INFO can arrive before create_connection() returns: the
        # answer to it must find the transport already in place.
        self.owner._made(self, transport)  # noqa: SLF001

    def data_received(self, data: bytes) -> None:
        self.owner._feed(data)  # noqa: SLF001 - the owner's parser

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)  # noqa: SLF001


class DirectPublisher:
    """Durable publishes over a dedicated NATS connection (see the module docstring)."""

    def __init__(
        self,
        servers: list[str],
        *,
        user: str = "",
        password: str = "",
        name: str = "podium",
        inbox_prefix: str = "_INBOX",
        idle_ping_s: float = _IDLE_PING_S,
    ) -> None:
        self._idle_ping_s = idle_ping_s
        self._servers = [_Server(s) for s in servers]
        self._user = user
        self._password = password
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._wire: _Wire | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # The service's own inbox (its NATS user may subscribe nowhere else), made unique.
        self._prefix = f"{inbox_prefix}.{secrets.token_hex(8)}."
        self._prefix_b = self._prefix.encode()
        self._tokens = itertools.count(1)
        #: reply token -> (waiter, subject, deadline): the subject names a publish the
        #: server refused; the sweep fails waiters past their deadline. Only publishes in
        #: flight are here, so the sweep looks at a few dozen entries, not every publish.
        self._waiting: dict[bytes, tuple[asyncio.Future[tuple[bytes, bytes]], bytes, float]] = {}
        self._handshake: asyncio.Future[None] | None = None
        self._max_payload = 1024 * 1024
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._next_server = 0
        self._current = self._servers[0]
        self._last_heard = 0.0
        self._pinged = False

    @property
    def connected(self) -> bool:
        """Whether publishes can go out now."""
        return self._transport is not None and self._handshake is None

    async def start(self) -> DirectPublisher:
        """Connect (to the first server that answers); raises on failure."""
        await self._connect_any()
        self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)
        return self

    async def close(self) -> None:
        """Close the connection; publishes still waiting fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        self._flush()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail_all("publisher closed")

    # --- connection -------------------------------------------------------------

    async def _connect_any(self) -> None:
        errors = []
        unsupported: list[Unsupported] = []
        for i in range(len(self._servers)):
            server = self._servers[(self._next_server + i) % len(self._servers)]
            try:
                await self._connect(server)
            except Unsupported as err:
                unsupported.append(err)
                errors.append(f"{server}: {err}")
                continue
            except (OSError, TimeoutError, PublishError) as err:
                errors.append(f"{server}: {err or type(err).__name__}")
                continue
            self._next_server = (self._next_server + i + 1) % len(self._servers)
            return
        if len(unsupported) == len(self._servers):
            raise unsupported[0]  # no server this client can talk to: use nats-py
        raise PublishError("no NATS server answered: " + "; ".join(errors))

    async def _connect(self, server: _Server) -> None:
        self._current = server
        self._buf.clear()
        self._out.clear()
        self._last_heard = self._loop.time()
        handshake = self._handshake = self._loop.create_future()
        transport: asyncio.BaseTransport | None = None
        try:
            transport, _ = await asyncio.wait_for(
                self._loop.create_connection(lambda: _Wire(self), server.host, server.port),
                _CONNECT_TIMEOUT_S,
            )
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                # INFO arrives first; _feed answers it with CONNECT, SUB and PING, and
                # the PONG (or an -ERR such as an authorization violation) settles it.
                await handshake
            if self._transport is None:
                raise PublishError("connection closed during the handshake")
        except BaseException:
            if transport is not None:
                transport.close()
            self._transport = self._wire = None
            raise
        finally:
            self._handshake = None
            if not handshake.done():
                handshake.cancel()
            elif not handshake.cancelled():
                handshake.exception()  # retrieved: no "never retrieved" warning

    def _on_info(self, info: dict[str, Any]) -> None:
        handshake = self._handshake
        self._max_payload = int(info.get("max_payload", self._max_payload))
        if handshake is None or handshake.done():
            return  # an update (cluster membership, lame duck): nothing to do here
        if info.get("tls_required"):
            handshake.set_exception(Unsupported("the server requires TLS"))
            return
        if not info.get("headers", False):
            handshake.set_exception(Unsupported("the server does not support headers"))
            return
        server = self._current
        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "lang": "python",
            "version": "podium",
            "protocol": 1,
            "name": self._name,
        }
        user = self._user or server.user
        if user:
            connect["user"] = user
            connect["pass"] = self._password or server.password
        if info.get("nonce") and not user:
            handshake.set_exception(Unsupported("the server asks for an nkey signature"))
            return
        self._write(b"CONNECT " + json.dumps(connect).encode() + _CRLF)
        self._write(b"SUB " + self._prefix_b + b"* 1\r\nPING\r\n")
        self._flush()

    def _made(self, wire: _Wire, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's is not a subclass of asyncio.Transport).
        self._transport, self._wire = cast("asyncio.Transport", transport), wire

    def _lost(self, wire: _Wire, exc: Exception | None) -> None:
        if wire is not self._wire:
            return
        self._transport = self._wire = None
        if self._handshake is not None:
            # Lost while connecting: the connecting code reports it (and retries).
            if not self._handshake.done():
                self._handshake.set_exception(PublishError(f"connection closed: {exc!r}"))
            return
        self._fail_all("connection to NATS lost")
        if not self._closed and self._reconnecting is None:
            log.warning("publisher connection lost", extra={"error": repr(exc)})
            self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        try:
            while not self._closed:
                try:
                    await self._connect_any()
                except (Unsupported, PublishError) as err:
                    # Not ready meanwhile (readiness probe); keep trying: a server may
                    # come back, or its configuration be put right.
                    level = logging.ERROR if isinstance(err, Unsupported) else logging.DEBUG
                    log.log(level, "publisher reconnect failed", extra={"error": str(err)})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                log.info("publisher reconnected")
                return
        finally:
            self._reconnecting = None

    # --- reading ----------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._last_heard = self._loop.time()
        self._pinged = False
        buf = self._buf
        buf += data
        pos = 0
        size = len(buf)
        while True:
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            if buf.startswith((b"HMSG", b"MSG "), pos):
                parts = bytes(buf[pos:end]).split()
                total = int(parts[-1])
                body = end + 2
                if size < body + total + 2:
                    break  # the rest of this message has not arrived yet
                hdr_len = int(parts[-2]) if parts[0] == b"HMSG" else 0
                self._reply(
                    parts[1],
                    bytes(buf[body : body + hdr_len]),
                    bytes(buf[body + hdr_len : body + total]),
                )
                pos = body + total + 2
                continue
            line = bytes(buf[pos:end])
            pos = end + 2
            self._control(line)
        if pos:
            del buf[:pos]

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._write(b"PONG\r\n")
            self._flush()
        elif line == b"PONG":
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_result(None)
        elif line.startswith(b"INFO "):
            try:
                info = json.loads(line[5:])
            except ValueError:
                return
            self._on_info(info)
        elif line.startswith(b"-ERR"):
            message = line[4:].strip().strip(b"'").decode(errors="replace")
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_exception(PublishError(f"NATS refused: {message}"))
                return
            log.error("NATS error on the publisher connection", extra={"error": message})
            refused = _REFUSED_PUBLISH.match(message)
            if refused:
                # The server drops a publish its permissions forbid, and says so only here.
                subject = refused.group(1).encode()
                for token, (waiter, target, _) in list(self._waiting.items()):
                    if target == subject:
                        del self._waiting[token]
                        if not waiter.done():
                            waiter.set_exception(PublishError(f"NATS refused: {message}"))

    def _reply(self, subject: bytes, headers: bytes, payload: bytes) -> None:
        entry = self._waiting.pop(subject[len(self._prefix_b) :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((headers, payload))

    # --- writing ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.append(data)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _sweep(self) -> None:
        now = self._loop.time()
        waiting = self._waiting
        for token in [token for token, entry in waiting.items() if entry[2] <= now]:
            waiter = waiting.pop(token)[0]
            if not waiter.done():
                waiter.set_exception(TimeoutError())
        if self.connected and self._transport is not None:
            silent = now - self._last_heard
            if silent > 2 * self._idle_ping_s:
                log.warning("publisher connection silent; reconnecting", extra={"silent_s": silent})
                self._transport.abort()
            elif silent > self._idle_ping_s and not self._pinged:
                self._pinged = True
                self._write(b"PING\r\n")
                self._flush()
        if not self._closed:
            self._sweeper = self._loop.call_later(_SWEEP_S, self._sweep)

    def _fail_all(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for waiter, _, _ in waiting.values():
            if not waiter.done():
                waiter.set_exception(PublishError(reason))

    # --- publishing -------------------------------------------------------------

    async def publish(
        self, subject: str, event: Event, *, msg_id: str | None = None, timeout_s: float = 5.0
    ) -> Ack:
        """Publish ``event`` and wait until JetStream stored it; raises :class:`PublishError`."""
        if not self.connected:
            raise PublishError("not connected to NATS")
        payload = encode(event)
        header = _header_block(event, msg_id or event.event_id)
        total = len(header) + len(payload)
        if total > self._max_payload:
            raise PublishError(f"message of {total} bytes over the server's max_payload")
        if not subject or _BAD_SUBJECT.search(subject):
            raise PublishError(f"invalid subject {subject!r}")
        token = str(next(self._tokens)).encode()
        subject_b = subject.encode()
        waiter: asyncio.Future[tuple[bytes, bytes]] = self._loop.create_future()
        self._waiting[token] = (waiter, subject_b, self._loop.time() + timeout_s)
        self._out.append(
            b"HPUB %s %s%s %d %d\r\n%s%s\r\n"
            % (subject_b, self._prefix_b, token, len(header), total, header, payload)
        )
        self._schedule_flush()
        try:
            headers, data = await waiter
        except TimeoutError as err:
            raise PublishError(f"no acknowledgement from JetStream in {timeout_s}s") from err
        finally:
            self._waiting.pop(token, None)
        if not data:
            # A status-only answer: 503 "no responders" when no stream takes the subject.
            status = headers[9:12].decode(errors="replace") if headers else ""
            raise PublishError(f"not stored (status {status.strip() or 'unknown'})")
        try:
            ack = _ACK.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise PublishError(f"unreadable acknowledgement: {err}") from err
        if ack.error is not None:
            raise PublishError(f"JetStream error {ack.error.code}: {ack.error.description}")
        if not ack.stream:
            # Something answered that is not a stream (a core subscriber on the subject).
            raise PublishError("the reply is not a JetStream acknowledgement")
        return ack


@functools.lru_cache(maxsize=64)
def _fixed_headers(kind: type[Event]) -> bytes:
    """The header lines every event of one type carries (as :func:`headers_for` spells them)."""
    return (
        f"NATS/1.0\r\n{subjects.HDR_EVENT_TYPE}: {kind.__struct_config__.tag}\r\n"
        f"{subjects.HDR_SCHEMA}: {SCHEMA_VERSION}\r\n"
    ).encode()


def _header_block(event: Event, msg_id: str) -> bytes:
    """The NATS header block of a publish: the same headers as :func:`headers_for`."""
    correlation = event.correlation_id
    for value in (correlation, msg_id):
        if "\r" in value or "\n" in value:
            raise PublishError(f"invalid header value {value!r}")
    return b"%s%s: %s\r\n%s: %s\r\n\r\n" % (
        _fixed_headers(type(event)),
        _CORRELATION,
        correlation.encode(),
        _MSG_ID,
        msg_id.encode(),
    )


_CORRELATION = subjects.HDR_CORRELATION.encode()
_MSG_ID = subjects.HDR_MSG_ID.encode()


async def open_publisher(
    nc: Client, settings: CommonSettings, *, name: str, direct: bool = True
) -> EventPublisher:
    """The direct publisher where it applies, else nats-py's connection (TLS, creds)."""
    if direct and not settings.nats_creds:
        servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]
        try:
            publisher = DirectPublisher(
                servers,
                user=settings.nats_user,
                password=settings.nats_password.reveal(),
                name=f"podium-{name}-publisher",
                inbox_prefix=subjects.inbox_prefix(name),
            )
            return await publisher.start()
        except Unsupported as err:
            log.info(
                "publishing through the main NATS connection",
                extra={"reason": str(err)},
            )
    return await Publisher(nc).start()
