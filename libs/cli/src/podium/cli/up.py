"""``podium up``: the whole platform on one machine, each service its own process.

It uses the NATS server at ``NATS_URL`` (default ``nats://127.0.0.1:4222``) only
if that server is one Podium can work with (nats-server
:data:`~podium.common.bus.MIN_SERVER_VERSION` or newer, JetStream on). A local
address where nothing listens gets an embedded nats-server; a local one held by
an older server (Debian's 2.9.10 on this kind of machine) or by something else
gets an embedded server on a free port instead, and says so. A remote server it
cannot use is refused with one line.

Then it provisions the streams, runs ingress, conductor, worker and notifier
through their real entry points (``python -m podium.<service>``), prints
"Podium is up" once every one reports ready (or names the one that is not, and
why), restarts one that crashes, stops the platform when one exits with a
start-up fault that a restart cannot fix, and on Ctrl-C stops them in order
with SIGTERM so in-flight work drains. Where it runs is written to
``<home>/platform.json`` so that ``podium demo``, ``send`` and ``status`` find it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import aiohttp

from podium.cli.natsserver import NatsServer, free_port
from podium.common.backoff import backoff
from podium.common.bus import MIN_SERVER_VERSION, shown_url, version_text
from podium.common.config import claude_credentials_present
from podium.common.errors import EXIT_STARTUP, PodiumError
from podium.common.runtime import wait_set
from podium.contracts import access

SERVICES = ("ingress", "conductor", "worker", "notifier", "console")
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_INGRESS_PORT = 8080
DEFAULT_CONSOLE_PORT = 8090
#: The operator ``podium up`` makes for its console (its token kept in the home folder).
LOCAL_OPERATOR_NAME = "local"
DEFAULT_HEALTH_BASE = 9090
#: Where escalations go under ``podium up`` unless PODIUM_OPERATOR_EMAIL says otherwise:
#: they land in the outbox beside every other message, where a local user sees them.
LOCAL_OPERATOR = "operator@localhost"
#: How long the services may take to become ready before ``podium up`` gives up.
READY_TIMEOUT_S = 120.0


class UpError(PodiumError):
    """``podium up`` cannot run as asked (a port taken, a server it cannot use)."""


@dataclass
class Layout:
    """Where ``podium up`` keeps its files, and the ports it uses.

    ``ingress_port`` / ``health_base`` None: the defaults (8080, 9090…9094), or
    free ports if those are taken. A number: exactly that, or an error if taken.
    0: free ports (tests run several platforms at once).
    """

    home: Path
    ingress_port: int | None = None
    health_base: int | None = None
    #: The console's port: 8090, or a free one (never an asked-for one: no flag for it).
    console_port: int = 0
    health_ports: dict[str, int] = field(default_factory=dict)
    #: What was chosen instead of a default, and why (printed at start).
    notes: list[str] = field(default_factory=list)
    #: Where an asked-for ingress port came from, for the message if it is taken.
    port_source: str = "--port"

    def allocate_ports(self, taken: set[int]) -> None:
        """Choose the ingress and health ports: the asked-for ones, else free ones."""
        self.ingress_port = self._choose(
            "ingress", self.ingress_port, DEFAULT_INGRESS_PORT, self.port_source, taken
        )
        taken.add(self.ingress_port)
        asked_console = 0 if self.health_base == 0 else None
        self.console_port = self._choose(
            "console", asked_console, DEFAULT_CONSOLE_PORT, "PODIUM_CONSOLE_PORT", taken
        )
        taken.add(self.console_port)
        base = self.health_base
        if base == 0:
            for service in SERVICES:
                self.health_ports[service] = _free_port(taken)
                taken.add(self.health_ports[service])
            return
        wanted = [(base or DEFAULT_HEALTH_BASE) + i for i in range(len(SERVICES))]
        busy = [p for p in wanted if p in taken or not port_free(p)]
        if busy and base is not None:
            raise UpError(
                f"health ports {wanted[0]}-{wanted[-1]} (--health-base {base}): "
                f"{', '.join(map(str, busy))} already in use; choose another --health-base"
            )
        if busy:
            self.notes.append(
                f"health ports {wanted[0]}-{wanted[-1]} are in use ({', '.join(map(str, busy))}): "
                "using free ports instead"
            )
            wanted = []
            for _ in SERVICES:
                port = _free_port(taken)
                taken.add(port)
                wanted.append(port)
        self.health_ports = dict(zip(SERVICES, wanted, strict=True))
        taken.update(wanted)

    def _choose(
        self, what: str, asked: int | None, default: int, flag: str, taken: set[int]
    ) -> int:
        if asked == 0:
            return _free_port(taken)
        port = default if asked is None else asked
        if port not in taken and port_free(port):
            return port
        if asked is not None:
            raise UpError(f"{what} port {port} ({flag}) is already in use; choose another {flag}")
        chosen = _free_port(taken)
        self.notes.append(f"{what} port {port} is in use: using {chosen} instead")
        return chosen

    @property
    def token_file(self) -> Path:
        """The generated API token."""
        return self.home / "api-token"

    @property
    def link_secret_file(self) -> Path:
        """The generated key of download links, shared by the ingress and the notifier."""
        return self.home / "link-secret"

    @property
    def outbox(self) -> Path:
        """The outbox file the notifier writes."""
        return self.home / "outbox.jsonl"

    @property
    def nats_users_file(self) -> Path:
        """The embedded nats-server's users and their passwords (0600)."""
        return self.home / "nats-users.json"

    @property
    def platform_file(self) -> Path:
        """Where a running ``podium up`` says where it runs (for the client verbs)."""
        return self.home / "platform.json"

    def health_port(self, service: str) -> int:
        """The health/metrics port of ``service``."""
        return self.health_ports[service]

    @property
    def ingress_url(self) -> str:
        """The ingress's base URL."""
        return f"http://127.0.0.1:{self.ingress_port}"

    @property
    def console_url(self) -> str:
        """The console's base URL."""
        return f"http://127.0.0.1:{self.console_port}"

    @property
    def console_token_file(self) -> Path:
        """The token of the console's local operator (0600)."""
        return self.home / "console-token"


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a service could listen on ``host:port`` now (as aiohttp binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    port = free_port()
    while port in taken:
        port = free_port()
    return port


# --- which NATS ----------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What answers at a NATS URL: nothing, a NATS server (its INFO), or something else."""

    url: str
    listening: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_nats(self) -> bool:
        """Whether a NATS server greeted with INFO."""
        return bool(self.info)

    @property
    def version(self) -> str:
        """The server's version as it reports it."""
        return str(self.info.get("version", "unknown"))

    def problem(self) -> str | None:
        """Why Podium cannot use this server, or None if it can (or nothing listens)."""
        if not self.listening:
            return None
        if not self.is_nats:
            return f"something that is not a NATS server listens at {shown_url(self.url)}"
        needed = version_text(MIN_SERVER_VERSION)
        if parse_version(self.version) < MIN_SERVER_VERSION:
            return (
                f"the NATS server at {shown_url(self.url)} is nats-server {self.version}; "
                f"Podium needs {needed} or newer"
            )
        if not self.info.get("jetstream"):
            return (
                f"the NATS server at {shown_url(self.url)} runs without JetStream "
                "(start it with -js)"
            )
        return None


def parse_version(text: str) -> tuple[int, int, int]:
    """``2.9.10`` (or ``v2.15.1-beta``) as a tuple; (0, 0, 0) if unreadable."""
    core = text.lstrip("v").split("-", 1)[0].split("+", 1)[0]
    try:
        major, minor, patch = (int(part) for part in core.split(".")[:3])
    except ValueError:
        return (0, 0, 0)
    return (major, minor, patch)


def probe_nats(url: str, timeout_s: float = 2.0) -> Probe:
    """Read the INFO line of the first server of ``url`` that accepts a connection."""
    servers = [server.strip() for server in url.split(",") if server.strip()] or [url]
    probe = Probe(url, listening=False)
    for server in servers:
        probe = _probe_one(server, timeout_s)
        if probe.listening:
            return probe
    return probe


def _probe_one(url: str, timeout_s: float) -> Probe:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return Probe(url, listening=True)
    except OSError:
        return Probe(url, listening=False)
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return Probe(url, listening=True)
    try:
        info = json.loads(line[5:])
    except ValueError:
        return Probe(url, listening=True)
    return Probe(url, listening=True, info=info if isinstance(info, dict) else {})


def nats_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a NATS server answers at ``url`` (it greets with an INFO line)."""
    return probe_nats(url, timeout_s).is_nats


def _local(url: str) -> bool:
    host = urlparse(url.split(",", maxsplit=1)[0].strip()).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Nats:
    """The NATS server the platform uses, and why."""

    url: str
    embedded: NatsServer | None = None
    why: str = ""
    #: The embedded server's users (``podium.contracts.access``) and their passwords:
    #: each service connects as its own, ``podium`` verbs as ``admin``, and a process
    #: with none of them (an agent's shell) is refused. Empty for a server of the user's.
    users: dict[str, str] = field(default_factory=dict)


def choose_nats(layout: Layout, url: str) -> Nats:
    """The server to use for ``url``: that one if Podium can use it, else an embedded one.

    Raises :class:`UpError` for a remote server that is down or unusable.
    """
    probe = probe_nats(url)
    problem = probe.problem()
    if probe.is_nats and problem is None:
        return Nats(url, why=f"nats-server {probe.version}")
    if not _local(url):
        if problem is not None:
            raise UpError(f"{problem}: upgrade it, or unset NATS_URL to run an embedded server")
        raise UpError(f"NATS_URL={shown_url(url)} does not answer")
    port = urlparse(url.split(",", maxsplit=1)[0].strip()).port or 4222
    why = ""
    if probe.listening:
        port = free_port()
        why = f"{problem}: using an embedded nats-server on a free port instead"
    users = nats_users(layout)
    folder = layout.home / "nats"
    folder.mkdir(parents=True, exist_ok=True)
    # The same users and permissions as compose and Kubernetes (deploy/nats/accounts.conf).
    # Their passwords are variables of the configuration file, readable by its owner only,
    # not of the server's environment (which any process of the same user can read).
    config = folder / "nats.conf"
    with contextlib.suppress(FileNotFoundError):
        config.unlink()
    passwords = "".join(f'{role.password_env}: "{users[role.user]}"\n' for role in access.ROLES)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(passwords + access.render_accounts())
    embedded = NatsServer(folder, port=port, config_file=config)
    try:
        embedded.start()
    except (OSError, TimeoutError) as err:
        raise UpError(
            f"cannot start the embedded nats-server on port {port}: {err} "
            f"(its log: {embedded.log_file})"
        ) from err
    return Nats(embedded.url, embedded=embedded, why=why, users=users)


def nats_users(layout: Layout) -> dict[str, str]:
    """A password for every NATS user, made once and kept (0600) beside the API token, so
    a restarted ``podium up`` keeps its server's users."""
    path = layout.nats_users_file
    kept: dict[str, str] = {}
    if path.exists():
        found = json.loads(path.read_text() or "{}")
        kept = {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
    # Letters and digits, a letter first: nats-server reads a variable's value as a config
    # token, and one that starts with a digit as a number.
    users = {role.user: kept.get(role.user) or f"p{secrets.token_hex(24)}" for role in access.ROLES}
    if users != kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(users, indent=2) + "\n")
    return users


# --- the services --------------------------------------------------------------


def api_token(layout: Layout) -> str:
    """The local API token: from PODIUM_API_TOKEN, else generated once and kept (0600)."""
    if env := os.environ.get("PODIUM_API_TOKEN"):
        return env
    return _kept_secret(layout.token_file)


def link_secret(layout: Layout) -> str:
    """The key of download links: from PODIUM_LINK_SECRET, else generated once and kept
    (0600), so links sent before a restart still work after it."""
    if env := os.environ.get("PODIUM_LINK_SECRET"):
        return env
    return _kept_secret(layout.link_secret_file)


def console_operators(layout: Layout) -> str:
    """``PODIUM_CONSOLE_OPERATORS`` for ``podium up``: its local operator, made once (the
    token in ``console-token``, only its hash in ``console-operators``, both 0600)."""
    from podium.common.operators import new_operator  # noqa: PLC0415

    entry_file = layout.home / "console-operators"
    if entry_file.exists() and layout.console_token_file.exists():
        return entry_file.read_text().strip()
    token, entry = new_operator(LOCAL_OPERATOR_NAME)
    for path, value in ((layout.console_token_file, token), (entry_file, entry)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
    return entry


def _kept_secret(path: Path) -> str:
    """The random value in ``path``, made (readable by its owner only) if missing."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def service_env(
    layout: Layout, service: str, nats_url: str, token: str, users: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment ``podium up`` gives a service: the user's settings, with the NATS
    server and the ports it chose (``PODIUM_PORT`` already chose the ingress's port), and,
    on the embedded server, the service's own NATS user."""
    env = dict(os.environ)
    defaults = {
        "NATS_URL": nats_url,
        "PODIUM_STATE_DIR": str(layout.home / "state"),
        "PODIUM_WORKSPACE_ROOT": str(layout.home / "workspaces"),
        "PODIUM_OUTBOX_PATH": str(layout.outbox),
        "PODIUM_HEALTH_PORT": str(layout.health_port(service)),
        "PODIUM_HEALTH_HOST": "127.0.0.1",
        # Provisioning happened once before the services started.
        "PODIUM_PROVISION": "false",
        # Download links: the notifier makes them under this URL, the ingress serves them.
        "PODIUM_PUBLIC_URL": layout.ingress_url,
        "PODIUM_LINK_SECRET": link_secret(layout),
    }
    if service == "ingress":
        defaults["PODIUM_PORT"] = str(layout.ingress_port)
        defaults["PODIUM_HOST"] = "127.0.0.1"
        defaults["PODIUM_API_TOKENS"] = f"local:{token}"
    if service == "conductor":
        defaults["PODIUM_OPERATOR_EMAIL"] = LOCAL_OPERATOR
    if service == "console":
        defaults["PODIUM_CONSOLE_HOST"] = "127.0.0.1"
        defaults["PODIUM_CONSOLE_OPERATORS"] = console_operators(layout)
        defaults["PODIUM_CONSOLE_SESSION_SECRET"] = _kept_secret(layout.home / "console-secret")
    for key, value in defaults.items():
        env.setdefault(key, value)
    # The ports and the server were chosen above (free ones where the defaults were taken).
    env["NATS_URL"] = nats_url
    if users:
        env.pop("PODIUM_NATS_CREDS", None)
        env["PODIUM_NATS_USER"] = service
        env["PODIUM_NATS_PASSWORD"] = users[service]
    env["PODIUM_HEALTH_PORT"] = str(layout.health_port(service))
    if service == "ingress":
        env["PODIUM_PORT"] = str(layout.ingress_port)
    if service == "console":
        env["PODIUM_CONSOLE_PORT"] = str(layout.console_port)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Child:
    """One supervised service process."""

    service: str
    env: dict[str, str]
    log_file: IO[str]
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    pump: asyncio.Task[None] | None = None
    #: The last lines it wrote, to show why it stopped.
    last_lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))

    async def start(self) -> None:
        """Start the process through its real entry point."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"podium.{self.service}",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        if self.proc is None or self.proc.stdout is None:
            return
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.last_lines.append(line)
            self.log_file.write(line + "\n")
            self.log_file.flush()
            print(render_log_line(self.service, line), flush=True)  # noqa: T201

    async def wait_output(self) -> None:
        """Wait until everything it wrote was read (after it exited)."""
        if self.pump is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await asyncio.wait({self.pump})

    def startup_error(self) -> str:
        """What it printed after ``cannot start:`` (continuation lines joined), or its
        last line."""
        prefix = f"podium-{self.service}: cannot start: "
        lines = list(self.last_lines)
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].startswith(prefix):
                parts = [lines[index][len(prefix) :]]
                for more in lines[index + 1 :]:
                    if not more.startswith(" "):
                        break
                    parts.append(more.strip())
                return " ".join(parts)
        return lines[-1] if lines else "no output"


def render_log_line(service: str, line: str) -> str:
    """A JSON log line as one short human line: ``service | level message key=value``."""
    try:
        entry = json.loads(line)
    except ValueError:
        return f"{service:>9} | {line}"
    if not isinstance(entry, dict):
        return f"{service:>9} | {line}"
    level = str(entry.pop("level", "")).upper()
    msg = str(entry.pop("msg", ""))
    for key in ("ts", "service", "logger", "exc"):
        entry.pop(key, None)
    extras = " ".join(f"{k}={v}" for k, v in entry.items())
    return f"{service:>9} | {level:<7} {msg} {extras}".rstrip()


async def readiness(layout: Layout, http: aiohttp.ClientSession) -> dict[str, tuple[bool, str]]:
    """Each service's (ready, reason) from its /readyz."""
    found: dict[str, tuple[bool, str]] = {}
    for service in SERVICES:
        url = f"http://127.0.0.1:{layout.health_port(service)}/readyz"
        try:
            async with http.get(url) as resp:
                body = await resp.json(content_type=None)
                found[service] = (resp.status == 200, str(body.get("reason", "")))
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            found[service] = (False, "not answering yet")
    return found


async def wait_ready(
    layout: Layout,
    children: list[Child],
    stop: asyncio.Event,
    timeout_s: float = READY_TIMEOUT_S,
) -> tuple[dict[str, tuple[bool, str]], Child | None]:
    """Wait until every service is ready, one exits, ``stop`` is set or ``timeout_s`` passes.

    Returns the last readiness of each service and the child that exited, if any.
    Says every 15 s which services it is still waiting for, and why.
    """
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + 15
    state: dict[str, tuple[bool, str]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            for child in children:
                if child.proc is not None and child.proc.returncode is not None:
                    return state, child
            state = await readiness(layout, http)
            if all(ready for ready, _ in state.values()):
                return state, None
            if time.monotonic() > deadline or stop.is_set():
                return state, None
            if time.monotonic() > next_note:
                next_note = time.monotonic() + 15
                _say(f"podium up: waiting for {_not_ready(state)}", err=True)
            await wait_set(stop, 0.2)


def _not_ready(state: dict[str, tuple[bool, str]]) -> str:
    return "; ".join(f"{s} ({reason})" for s, (ready, reason) in state.items() if not ready)


def _podium_command() -> str:
    """How the user runs ``podium`` (the virtual environment's, when not on PATH)."""
    here = Path(sys.executable).parent / "podium"
    if here.exists():
        with contextlib.suppress(ValueError):
            return str(here.relative_to(Path.cwd()))
        return str(here)
    return "podium"


def banner(layout: Layout, nats: Nats, state: dict[str, tuple[bool, str]]) -> str:
    """What ``podium up`` prints once everything is ready."""
    conductor, worker = _agent_of("conductor"), _agent_of("worker")
    agent = conductor if conductor == worker else f"conductor {conductor}, worker {worker}"
    base = layout.ingress_url
    if os.environ.get("PODIUM_API_TOKEN"):
        token_where, token = "$PODIUM_API_TOKEN", "$PODIUM_API_TOKEN"
    else:
        token_where, token = f"in {layout.token_file}", f"$(cat {layout.token_file})"
    health = "  ".join(f"{s}: http://127.0.0.1:{layout.health_port(s)}/metrics" for s in SERVICES)
    where = f" (embedded, data in {layout.home / 'nats'})" if nats.embedded else f" ({nats.why})"
    services = "\n".join(f"  {s:>9}: {reason}" for s, (_, reason) in state.items())
    podium = _podium_command()
    return f"""
Podium is up.
  NATS:      {shown_url(nats.url)}{where}
  Agent:     {agent}
  API:       {base}/v1/messages   (token {token_where})
  Console:   {layout.console_url}   (operator token in {layout.console_token_file})
  Webhooks:  {base}/webhooks/twilio/sms   {base}/webhooks/sendgrid/inbound
  Outbox:    {layout.outbox}   (replies, and escalations to {_operator()})
  Metrics:   {health}
{services}

Try it (in another terminal):
  {podium} demo
  {podium} send "Summarise the plan for Monday" --wait
  curl -s {base}/v1/messages -H "Authorization: Bearer {token}" \\
       -H 'Content-Type: application/json' -d '{{"text": "hello"}}'   # reply: the outbox

Ctrl-C stops everything.
"""


def _agent_of(role: str) -> str:
    """The agent a role's service runs, as it reads its settings (PODIUM_<ROLE>_AGENT first)."""
    kind = os.environ.get(f"PODIUM_{role.upper()}_AGENT") or os.environ.get("PODIUM_AGENT", "auto")
    if kind == "auto":
        return "claude" if claude_credentials_present() else "offline (no Claude credentials)"
    return kind


def _operator() -> str:
    return os.environ.get("PODIUM_OPERATOR_EMAIL") or LOCAL_OPERATOR


def _say(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def write_platform_file(layout: Layout, nats: Nats) -> None:
    """Say where the platform runs, for ``podium demo``/``send``/``status``.

    Readable by its owner only (0600), like the API token beside it: a NATS_URL
    may carry credentials.
    """
    data: dict[str, Any] = {
        "pid": os.getpid(),
        "nats_url": nats.url,
        "ingress_url": layout.ingress_url,
        "console_url": layout.console_url,
        "health_ports": layout.health_ports,
    }
    if nats.users:
        # podium verbs connect as the operators' user of the embedded server.
        data |= {"nats_user": access.ADMIN, "nats_password": nats.users[access.ADMIN]}
    path = layout.platform_file
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")


def running_platform(home: Path) -> dict[str, Any] | None:
    """What ``<home>/platform.json`` says, if the ``podium up`` that wrote it still runs."""
    path = home / "platform.json"
    try:
        data = json.loads(path.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


async def up(layout: Layout) -> int:
    """Run the platform until Ctrl-C; returns the exit status."""
    try:
        return await _up(layout)
    except UpError as err:
        _say(f"podium up: {err}", err=True)
        return 1


async def _up(layout: Layout) -> int:
    from podium.common.bus import connect  # noqa: PLC0415
    from podium.common.config import CommonSettings, load  # noqa: PLC0415
    from podium.common.provision import provision  # noqa: PLC0415

    layout.home.mkdir(parents=True, exist_ok=True)
    nats = choose_nats(layout, os.environ.get("NATS_URL", DEFAULT_NATS_URL))
    if nats.why and nats.embedded:
        _say(f"podium up: {nats.why}")
    if nats.embedded:
        _say(f"embedded nats-server started on {nats.url}")
    children: list[Child] = []
    try:
        layout.allocate_ports({urlparse(nats.url).port or 4222})
        for note in layout.notes:
            _say(f"podium up: {note}")
        token = api_token(layout)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        env = {k: v for k, v in os.environ.items() if k.startswith("PODIUM_")}
        if nats.users:
            env |= {
                "PODIUM_NATS_USER": access.ADMIN,
                "PODIUM_NATS_PASSWORD": nats.users[access.ADMIN],
            }
        settings = load(CommonSettings, {**env, "NATS_URL": nats.url})
        nc = await connect(settings, name="podium-up")
        try:
            await provision(
                nc.jetstream(),
                replicas=settings.stream_replicas,
                budget=settings.store_budget_bytes,
            )
        finally:
            await nc.close()
        logs = layout.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            child = Child(
                service,
                service_env(layout, service, nats.url, token, nats.users),
                (logs / f"{service}.log").open("a", encoding="utf-8"),
            )
            await child.start()
            children.append(child)
        write_platform_file(layout, nats)
        state, exited = await wait_ready(layout, children, stop)
        if exited is not None:
            return await _stopped_at_start(exited, logs)
        if stop.is_set():
            return 0
        if not all(ready for ready, _ in state.values()):
            _say(
                f"podium up: not ready after {READY_TIMEOUT_S:g}s: {_not_ready(state)} "
                f"(logs in {logs}); stopping",
                err=True,
            )
            return 1
        _say(banner(layout, nats, state))
        return await supervise(children, stop)
    except PodiumError as err:
        # A server that answered the probe but refused Podium at connect.
        _say(f"podium up: {err}", err=True)
        return 1
    finally:
        await shutdown(children)
        with contextlib.suppress(FileNotFoundError):
            layout.platform_file.unlink()
        if nats.embedded is not None:
            nats.embedded.stop()


async def _stopped_at_start(child: Child, logs: Path) -> int:
    await child.wait_output()
    code = child.proc.returncode if child.proc is not None else None
    if code == EXIT_STARTUP:
        _say(f"podium up: {child.service} cannot start: {child.startup_error()}", err=True)
    else:
        _say(
            f"podium up: {child.service} exited ({code}) before it was ready "
            f"(see {logs / (child.service + '.log')})",
            err=True,
        )
    return 1


async def supervise(children: list[Child], stop: asyncio.Event) -> int:
    """Restart a child that crashes (with backoff); return when ``stop`` is set.

    A child that exits with a start-up fault (status 2: a setting, the server,
    its agent CLI, a port) is not restarted: the platform stops with its message.
    """
    while not stop.is_set():
        waits = {asyncio.create_task(c.proc.wait()): c for c in children if c.proc is not None}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*waits, stopper):
            if task not in done:
                task.cancel()
        if stop.is_set():
            return 0
        for task in done:
            child = waits.get(task)
            if child is None:
                continue
            if task.result() == EXIT_STARTUP:
                await child.wait_output()
                _say(f"podium up: {child.service} cannot start: {child.startup_error()}", err=True)
                return 1
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > 5:
                _say(f"podium up: {child.service} keeps failing; stopping", err=True)
                return 1
            delay = round(backoff(len(child.restarts), base=1.0, cap=16.0), 1)
            _say(
                f"podium up: {child.service} exited ({task.result()}); restarting in {delay}s",
                err=True,
            )
            await wait_set(stop, delay)
            if not stop.is_set():
                await child.start()
    return 0


async def shutdown(children: list[Child], timeout_s: float = 35.0) -> None:
    """SIGTERM every child (ingress first, so no new work comes in), then wait."""
    for child in children:
        if child.proc is not None and child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        if child.proc is None:
            continue
        try:
            async with asyncio.timeout(timeout_s):
                await child.proc.wait()
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()
        await child.wait_output()
        child.log_file.close()
