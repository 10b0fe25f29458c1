"""The worker's egress proxy: the only way out of its agents' sandboxes.

Two Unix sockets, which each sandbox sees as local ports (``podium.agents.sandbox``):

- **The model API** (a reverse proxy, aiohttp): the Messages API's requests (and the
  CLI's ``HEAD /`` probe; nothing else) go to the configured ``ANTHROPIC_BASE_URL`` (or
  Anthropic's API), with the credentials of the worker's own environment put in on the
  way. The agent holds a placeholder, never the key.
- **HTTPS for allowed hosts** (``PODIUM_WORKER_SANDBOX_ALLOW_HOSTS``): a ``CONNECT``
  proxy. A tunnel is opened only to a host on the list (port 443 unless the entry
  names one), and never to a loopback, link-local or private address that the entry
  did not name as such (a public name resolving to 127.0.0.1 must not reach NATS).
  Plain-HTTP proxying is refused: only TLS leaves.

Every refusal is counted (``podium_worker_egress_total{outcome="refused"}``) and
logged with the host asked for. At most :data:`MAX_TUNNELS` tunnels are open at once,
and one idle for :data:`TUNNEL_IDLE_S` is closed. The request's head is parsed with h11, a sans-IO
HTTP/1.1 library; aiohttp's server cannot hand over a connection for a tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import h11
from aiohttp import web
from prometheus_client import Counter

log = logging.getLogger(__name__)

#: Anthropic's API, when ``ANTHROPIC_BASE_URL`` is not set.
DEFAULT_API = "https://api.anthropic.com"
#: Request headers not passed on to the model API: hop-by-hop ones, and whatever
#: credential the agent sent (the platform's replaces it).
_DROP_REQUEST = frozenset(
    {
        "host", "connection", "keep-alive", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "content-length",
        "x-api-key", "authorization",
    }
)  # fmt: skip
# Content-Encoding stays: the body is passed on as it came (no decompressing here).
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "trailer", "upgrade"}
)
#: What the model API proxy forwards: the CLI's probe and the Messages API. Anything else
#: an agent might try with the platform's key is refused.
_API_ROUTES = (("HEAD", "/"), ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"))
#: Tunnels open at once, and how long one may carry nothing before it is closed.
MAX_TUNNELS = 64
TUNNEL_IDLE_S = 300.0
#: Longest request head a CONNECT may send, and how long it may take to send it.
_HEAD_LIMIT = 16 * 1024
_HEAD_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 10.0


def credentials(environ: Mapping[str, str]) -> dict[str, str]:
    """The headers that authenticate the model API calls, from the worker's environment
    (``ANTHROPIC_API_KEY``, ``ANTHROPIC_AUTH_TOKEN``, ``ANTHROPIC_CUSTOM_HEADERS``)."""
    headers: dict[str, str] = {}
    for line in environ.get("ANTHROPIC_CUSTOM_HEADERS", "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    if environ.get("ANTHROPIC_API_KEY"):
        headers["x-api-key"] = environ["ANTHROPIC_API_KEY"]
    if environ.get("ANTHROPIC_AUTH_TOKEN"):
        headers["authorization"] = f"Bearer {environ['ANTHROPIC_AUTH_TOKEN']}"
    return headers


class Allowlist:
    """Hosts a sandboxed agent may open a tunnel to: ``host``, ``host:port``,
    ``*.domain`` or ``*.domain:port`` (port 443 when none is named)."""

    def __init__(self, entries: list[str]) -> None:
        self.entries: list[tuple[str, int]] = []
        for entry in entries:
            host, port = split_host_port(entry.strip().lower(), default=443)
            if host:
                self.entries.append((host, port))

    def allows(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is on the list."""
        host = host.lower().rstrip(".")
        for pattern, allowed_port in self.entries:
            if port != allowed_port:
                continue
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and host != pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def split_host_port(target: str, *, default: int) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); ("", 0) if it is not one."""
    host, sep, port_text = target.rpartition(":")
    if not sep or "]" in port_text:
        host, port_text = target, str(default)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return "", 0
    if not host or not 0 < port < 65536:
        return "", 0
    return host, port


def _named_internal(host: str) -> bool:
    """Whether ``host`` itself is a loopback or private address, or localhost."""
    if host == "localhost":
        return True
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return False


class Egress:
    """The two sockets of one worker replica's egress proxy (see the module docstring)."""

    def __init__(
        self,
        *,
        directory: Path,
        upstream: str,
        credentials: Mapping[str, str],
        allow: list[str],
        counter: Counter,
    ) -> None:
        self.upstream = upstream.rstrip("/") or DEFAULT_API
        self.credentials = dict(credentials)
        self.allowlist = Allowlist(allow)
        self.counter = counter
        # A short, private folder (a Unix socket's path must stay under 108 bytes).
        self.directory = directory
        self.api_socket = self.directory / "api.sock"
        self.proxy_socket = self.directory / "proxy.sock"
        self._runner: web.AppRunner | None = None
        self._tunnels: asyncio.Server | None = None
        self._http: aiohttp.ClientSession | None = None
        self._open: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on both sockets."""
        # The sockets' own timeouts stay off: a streamed answer may take minutes. Bodies
        # pass as they are: no Accept-Encoding of aiohttp's own, nothing decompressed.
        self._http = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._api)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.api_socket)).start()
        self._tunnels = await asyncio.start_unix_server(
            self._tunnel, path=str(self.proxy_socket), limit=_HEAD_LIMIT
        )
        # Only this user: the sandboxed agent's user namespace maps it to this one.
        for path in (self.api_socket, self.proxy_socket):
            os.chmod(path, 0o600)
        self.directory.chmod(0o700)

    async def close(self) -> None:
        """Stop listening, end open tunnels, remove the sockets."""
        if self._tunnels is not None:
            self._tunnels.close()
        for task in list(self._open):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- the model API ---------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        assert self._http is not None  # noqa: S101 - set by start()
        if (request.method, request.path) not in _API_ROUTES:
            self.counter.labels("api", "refused").inc()
            log.warning(
                "egress refused",
                extra={"host": "model API", "reason": f"{request.method} {request.path[:200]}"},
            )
            return web.json_response(
                {"type": "error", "error": {"type": "permission_error", "message": "refused"}},
                status=403,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        headers.update(self.credentials)
        try:
            upstream = await self._http.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError) as err:
            self.counter.labels("api", "failed").inc()
            log.warning("model API unreachable", extra={"error": repr(err)})
            return web.json_response(
                {"type": "error", "error": {"type": "api_error", "message": "upstream failed"}},
                status=502,
            )
        self.counter.labels("api", "allowed").inc()
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
                },
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        return response

    # --- tunnels to allowed hosts ----------------------------------------------

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._open.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            if len(self._open) > MAX_TUNNELS:
                await self._refuse(conn, writer, 503, "too many tunnels open", "")
                return
            try:
                async with asyncio.timeout(_HEAD_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                conn.receive_data(head)
                event = conn.next_event()
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            except h11.RemoteProtocolError:
                await self._refuse(conn, writer, 400, "not an HTTP request", "")
                return
            if not isinstance(event, h11.Request):
                await self._refuse(conn, writer, 400, "not an HTTP request", "")
                return
            target = event.target.decode("ascii", "replace")
            if event.method != b"CONNECT":
                await self._refuse(conn, writer, 403, "only HTTPS (CONNECT) leaves here", target)
                return
            host, port = split_host_port(target, default=0)
            if not host or not self.allowlist.allows(host, port):
                await self._refuse(conn, writer, 403, "host not allowed", target)
                return
            try:
                upstream_reader, upstream_writer = await self._connect(host, port)
            except (OSError, TimeoutError, PermissionError) as err:
                self.counter.labels("connect", "failed").inc()
                log.warning("tunnel failed", extra={"host": target, "error": repr(err)})
                await self._answer(conn, writer, 502, b"could not connect")
                return
            self.counter.labels("connect", "allowed").inc()
            log.info("tunnel opened", extra={"host": target})
            established = h11.Response(status_code=200, headers=[], reason=b"Established")
            writer.write(conn.send(established) or b"")
            early = conn.trailing_data[0]
            if early:
                upstream_writer.write(early)
            try:
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                upstream_writer.close()
        finally:
            writer.close()
            if task is not None:
                self._open.discard(task)

    async def _connect(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection to an allowed host, to none of its addresses that are internal
        unless the list named the host as an internal address itself."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            internal_ok = _named_internal(host)
            for family, _, proto, _, address in infos:
                ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
                if not ip.is_global and not internal_ok:
                    continue
                return await asyncio.open_connection(
                    host=str(ip), port=port, family=family, proto=proto
                )
        raise PermissionError(f"{host} resolves only to internal addresses")

    async def _refuse(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, why: str, host: str
    ) -> None:
        self.counter.labels("connect", "refused").inc()
        log.warning("egress refused", extra={"host": host[:300], "reason": why})
        await self._answer(conn, writer, status, why.encode())

    @staticmethod
    async def _answer(
        conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes
    ) -> None:
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
            for event in (
                h11.Response(
                    status_code=status,
                    headers=[("content-length", str(len(body))), ("connection", "close")],
                ),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                writer.write(conn.send(event) or b"")
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file (or :data:`TUNNEL_IDLE_S` without data), then close the
    other side for writing."""
    try:
        while True:
            async with asyncio.timeout(TUNNEL_IDLE_S):
                data = await reader.read(64 * 1024)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, TimeoutError):
        writer.close()
