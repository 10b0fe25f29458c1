"""The worker agent's sandbox: bubblewrap, no network but the platform's egress proxy.

A sandboxed agent process (the Claude CLI, and every command it runs) sees:

- its task's working directory and its own CLI config directory, read-write;
- ``/usr`` (programs and libraries), the CLI's own files, TLS certificates and a
  passwd file naming one user, read-only;
- an empty ``/tmp``, its own ``/proc`` (its own processes only: a new PID namespace)
  and a minimal ``/dev``.

It runs as an unprivileged user in a new user namespace (no capabilities), with no
network but loopback (a new network namespace). Two local ports lead out, each to a
Unix socket of the worker's egress proxy (``podium.worker.egress``), forwarded by
socat inside the sandbox: :data:`API_PORT`, the model API (the proxy adds the
credentials, so the agent never holds them), and :data:`PROXY_PORT`, an HTTPS proxy
that opens tunnels only to the hosts the operator allows. The service's environment,
files, credentials and other tasks' workspaces are not there to be read; NATS and
every other local port are not there to be reached.

Bubblewrap and socat come from Debian's packages (``bubblewrap``, ``socat``): in the
worker image, installed; on a development machine, ``make setup`` unpacks them into
``.tools`` when they are not on ``PATH``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

#: Inside the sandbox: where the model API is served (the egress proxy's API socket).
API_PORT = 8080
#: Inside the sandbox: the HTTPS proxy (CONNECT, allowed hosts only).
PROXY_PORT = 3128
#: Where the egress sockets appear inside the sandbox.
API_SOCKET = "/run/podium/api.sock"
PROXY_SOCKET = "/run/podium/proxy.sock"
#: The unprivileged user the agent runs as, inside its user namespace.
UID = 1000
USER = "podium-agent"
#: The credential the CLI is given inside the sandbox: a placeholder the egress proxy
#: replaces with the real one on the way out.
PLACEHOLDER_KEY = "sandboxed-no-credentials"
#: Read-only paths bound when they exist (TLS roots for the CLI and the agent's tools).
_ETC = (
    "/etc/ssl", "/etc/ca-certificates", "/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime",
)  # fmt: skip
#: Where ``make setup`` unpacks Debian's packages when the tools are not on PATH.
TOOLS_DIR = Path(".tools")


class SandboxUnavailable(Exception):
    """The sandbox cannot run here; the message says why."""


def find_tool(name: str, configured: str, package_dir: str) -> str:
    """The executable ``name``: the setting, else on ``PATH``, else unpacked by
    ``make setup`` into ``.tools/<package_dir>`` above the current directory."""
    if configured:
        return configured
    found = shutil.which(name)
    if found is not None:
        return found
    for base in (Path.cwd(), *Path.cwd().parents):
        candidate = base / TOOLS_DIR / package_dir / "usr" / "bin" / name
        if candidate.is_file():
            return str(candidate)
    raise SandboxUnavailable(
        f"{name} not found (Debian package {package_dir}: install it, or run `make setup`)"
    )


def package_root(executable: Path) -> Path:
    """The folder to make visible for a program: the npm package it is in (for the Claude
    CLI, a native binary or a script inside ``node_modules``), else its own folder. Only a
    package directly under ``node_modules`` counts: a stray ``package.json`` higher up
    must not make a home directory, or ``/``, visible."""
    for folder in executable.parents:
        if folder.name == "node_modules":
            break
        in_modules = folder.parent.name == "node_modules" or (
            folder.parent.name.startswith("@") and folder.parent.parent.name == "node_modules"
        )
        if in_modules and (folder / "package.json").is_file():
            return folder
    return executable.parent


@dataclass(frozen=True)
class Sandbox:
    """How to run an agent command inside bubblewrap (see the module docstring)."""

    bwrap: str
    socat: str
    #: The egress proxy's sockets, outside the sandbox.
    api_socket: Path
    proxy_socket: Path
    #: A passwd and group file naming :data:`USER` (written by :meth:`prepare`).
    etc_dir: Path
    #: More read-only paths (the CLI's package).
    read_only: tuple[Path, ...] = field(default=())

    def prepare(self, *folders: Path) -> None:
        """Write the passwd and group files the sandbox shows; make ``folders``; raise
        :class:`SandboxUnavailable` if a program it needs cannot be run."""
        for tool in (self.bwrap, self.socat):
            if not os.access(tool, os.X_OK):
                raise SandboxUnavailable(f"{tool} cannot be run")
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "passwd").write_text(
            f"{USER}:x:{UID}:{UID}:Podium agent:/nonexistent:/usr/sbin/nologin\n"
        )
        (self.etc_dir / "group").write_text(f"{USER}:x:{UID}:\n")

    def command(
        self,
        argv: list[str],
        *,
        workdir: Path,
        writable: tuple[Path, ...] = (),
        read_only: tuple[Path, ...] = (),
        network: bool = True,
    ) -> list[str]:
        """``argv`` wrapped to run in the sandbox, in ``workdir``.

        ``writable``: more read-write paths (the CLI's config dir); ``read_only``: more
        read-only ones. ``network=False`` leaves out the egress ports too (a
        repository's check needs no model).
        """
        cmd = [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--uid", str(UID), "--gid", str(UID),
            "--cap-drop", "ALL",
            "--die-with-parent",
            "--new-session",
            # First: a tmpfs on /tmp would hide whatever is bound below it afterwards.
            "--tmpfs", "/tmp",  # noqa: S108 - the sandbox's own, empty
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--ro-bind", str(self.etc_dir / "passwd"), "/etc/passwd",
            "--ro-bind", str(self.etc_dir / "group"), "/etc/group",
        ]  # fmt: skip
        for etc in _ETC:
            cmd += ["--ro-bind-try", etc, etc]
        for path in (*self.read_only, *read_only):
            cmd += ["--ro-bind", str(path), str(path)]
        for path in (workdir, *writable):
            cmd += ["--bind", str(path), str(path)]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--chdir", str(workdir)]
        if not network:
            return [*cmd, "--", *argv]
        socat = Path(self.socat)
        if not socat.is_relative_to("/usr"):
            cmd += ["--ro-bind", str(socat), str(socat)]
        cmd += [
            "--ro-bind", str(self.api_socket), API_SOCKET,
            "--ro-bind", str(self.proxy_socket), PROXY_SOCKET,
        ]  # fmt: skip
        # The forwarders listen before the command starts (bash's /dev/tcp probes them):
        # a CLI that raced them would find its API refused at once.
        forward = (
            f"{self.socat} TCP-LISTEN:{API_PORT},bind=127.0.0.1,fork,reuseaddr "
            f"UNIX-CONNECT:{API_SOCKET} & "
            f"{self.socat} TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,fork,reuseaddr "
            f"UNIX-CONNECT:{PROXY_SOCKET} & "
            f"for port in {API_PORT} {PROXY_PORT}; do for _ in $(seq 200); do "
            '(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.01; '
            'done; done; exec "$@"'
        )
        return [*cmd, "--", "/usr/bin/bash", "-c", forward, "podium-sandbox", *argv]

    @staticmethod
    def environment() -> dict[str, str]:
        """What the agent's environment gets inside: the model API and the HTTPS proxy on
        their local ports, and a placeholder credential."""
        proxy = f"http://127.0.0.1:{PROXY_PORT}"
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{API_PORT}",
            "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
            "HTTPS_PROXY": proxy,
            "HTTP_PROXY": proxy,
            "https_proxy": proxy,
            "http_proxy": proxy,
            # The model API is local (the forwarder), never through the HTTPS proxy.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            # As root the CLI refuses bypassPermissions outside a declared sandbox.
            "IS_SANDBOX": "1",
        }

    async def check(self, scratch: Path) -> str:
        """Run a command in the sandbox once; what runs it, or :class:`SandboxUnavailable`
        saying why not (no user namespaces, a missing program)."""
        self.prepare(scratch)
        argv = self.command(
            [self.socat, "-V"], workdir=scratch, network=False, read_only=(Path(self.socat),)
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin"},
            )
        except OSError as err:
            raise SandboxUnavailable(f"{self.bwrap} cannot be run: {err.strerror}") from err
        try:
            async with asyncio.timeout(30):
                out, errors = await proc.communicate()
        except TimeoutError:
            proc.kill()
            raise SandboxUnavailable(f"{self.bwrap} did not answer within 30 s") from None
        if proc.returncode != 0:
            detail = (errors or out).decode(errors="replace").strip()[-300:]
            raise SandboxUnavailable(f"{self.bwrap} could not start a sandbox here: {detail}")
        version = await _version(self.bwrap)
        return f"bubblewrap {version}" if version else "bubblewrap"


async def _version(bwrap: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        bwrap, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace").strip().removeprefix("bubblewrap ").strip()
