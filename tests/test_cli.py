"""``podium up`` and ``podium demo``, as a newcomer runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from podium.cli.natsserver import NatsServer, free_port
from podium.cli.up import nats_answers

pytestmark = pytest.mark.e2e

PODIUM = [sys.executable, "-m", "podium.cli"]


def test_up_then_demo_then_ctrl_c(tmp_path: Path) -> None:
    nats_port, ingress_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODIUM_", "ANTHROPIC_"))}
    env["NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [
            *PODIUM,
            "up",
            "--home",
            str(tmp_path / "home"),
            "--port",
            str(ingress_port),
            "--health-base",
            "0",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    output = tmp_path / "up.log"
    try:
        deadline = time.monotonic() + 60
        while "Podium is up." not in output.read_text():
            assert up.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        text = output.read_text()
        assert "(embedded, data in" in text
        assert "offline" in text
        assert text.count("Podium is up.") == 1
        # The embedded server has a user per service: a process with none (an agent's
        # shell, say) cannot publish commands or read anything.
        assert "Authorization Violation" in anonymous_refusal(env["NATS_URL"])

        demo = subprocess.run(
            [*PODIUM, "demo", "--url", f"http://127.0.0.1:{ingress_port}", "--timeout", "30"],
            env={**env, "PODIUM_HOME": str(tmp_path / "home")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr + output.read_text()
        assert "← reply to ada@example.com" in demo.stdout
        assert "Subject: Re: Launch checklist" in demo.stdout
        assert (tmp_path / "home" / "outbox.jsonl").exists()

        # The console runs too, and the operator verbs find it (and its token) through
        # the home folder, with nothing to configure.
        match = re.search(r"Console:\s+(http://127\.0\.0\.1:\d+)", text)
        assert match, text
        listed = subprocess.run(
            [*PODIUM, "conversations", "--json", "--home", str(tmp_path / "home")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (conversation,) = json.loads(listed.stdout)["conversations"]
        assert conversation["channel"] == "email"
        assert conversation["participants"] == ["ada@example.com"]
        assert (tmp_path / "home" / "console-token").stat().st_mode & 0o077 == 0
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=30)
        log.close()
    assert code == 0, output.read_text()
    assert "conductor | INFO    stopped" in output.read_text()
    assert not nats_answers(env["NATS_URL"])


def anonymous_refusal(url: str) -> str:
    """What a client without credentials gets from the server at ``url``."""

    async def attempt() -> str:
        errors: list[str] = []

        async def on_error(err: Exception) -> None:
            errors.append(str(err))

        client = Client()
        try:
            await client.connect(
                url, max_reconnect_attempts=0, allow_reconnect=False, error_cb=on_error
            )
        except Exception as err:  # noqa: BLE001 - what it says is the test's subject
            return f"{err} {' '.join(errors)}"
        finally:
            await client.close()
        return "connected"

    return asyncio.run(attempt())


def test_demo_without_a_platform_fails_clearly(nats_server: NatsServer, tmp_path: Path) -> None:
    env = clean_env(NATS_URL=nats_server.url, PODIUM_HOME=str(tmp_path / "none"))
    demo = subprocess.run(
        [*PODIUM, "demo", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert demo.returncode == 1
    assert "cannot reach the ingress" in demo.stderr
    # Without NATS either, it says so before it sends anything.
    dead = f"nats://127.0.0.1:{free_port()}"
    demo = subprocess.run(
        [*PODIUM, "demo", "--timeout", "2"],
        env={**env, "NATS_URL": dead},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert demo.returncode == 1
    assert demo.stderr.startswith(f"podium demo: cannot connect to NATS at {dead}: ")
    assert demo.stdout == ""


def start_up(args: list[str], env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
    """``podium up`` with ``args``; its output goes to ``output``."""
    with output.open("wb") as log:
        return subprocess.Popen(
            [*PODIUM, "up", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODIUM_", "ANTHROPIC_"))}
    env.pop("NATS_URL", None)
    return {**env, **extra}


def hold(port: int) -> socket.socket | None:
    """Listen on ``port`` (None if something else already does: it is taken either way)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_up_beside_an_old_nats_and_taken_ports_runs_elsewhere_and_says_so(
    old_nats: str, tmp_path: Path
) -> None:
    # This machine's own situation: Debian's nats-server 2.9.10 answers where podium up
    # would look, and the default ports (8080, 9090 is also Prometheus's) are taken.
    held = [hold(8080), hold(9090)]
    home = tmp_path / "home"
    env = clean_env(NATS_URL=old_nats)
    output = tmp_path / "up.log"
    up = start_up(["--home", str(home)], env, output)
    try:
        deadline = time.monotonic() + 90
        while "Podium is up." not in output.read_text():
            assert up.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        text = output.read_text()
        assert (
            f"podium up: the NATS server at {old_nats} is nats-server 2.9.10; Podium needs "
            "2.14.0 or newer: using an embedded nats-server on a free port instead"
        ) in text
        assert "podium up: ingress port 8080 is in use: using " in text
        assert "podium up: health ports 9090-9094 are in use" in text
        assert "conductor: owns 16 of 16 partitions" in text
        platform = json.loads((home / "platform.json").read_text())
        assert platform["nats_url"] != old_nats
        assert not platform["ingress_url"].endswith(":8080")
        # The other verbs find the platform by itself: no NATS_URL, no --url.
        demo = subprocess.run(
            [*PODIUM, "demo", "--timeout", "30"],
            env=clean_env(PODIUM_HOME=str(home)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr + output.read_text()
        assert "← reply to ada@example.com" in demo.stdout
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
        for sock in held:
            if sock is not None:
                sock.close()
    assert code == 0, output.read_text()
    assert not (home / "platform.json").exists()


@pytest.mark.parametrize("flag", ["--port", "--health-base"])
def test_up_on_a_port_that_is_taken_stops_with_one_line(flag: str, tmp_path: Path) -> None:
    port = free_port()
    sock = hold(port)
    try:
        env = clean_env(NATS_URL=f"nats://127.0.0.1:{free_port()}")
        output = tmp_path / "up.log"
        up = start_up(["--home", str(tmp_path / "home"), flag, str(port)], env, output)
        code = up.wait(timeout=60)
    finally:
        if sock is not None:
            sock.close()
    text = output.read_text()
    assert code == 1, text
    what = f"ingress port {port} (--port) is" if flag == "--port" else f"{port} already"
    (line,) = [line for line in text.splitlines() if line.startswith("podium up: ")]
    assert what in line
    assert "restarting" not in text
    assert "Traceback" not in text


def stopped_up(tmp_path: Path, **settings: str) -> tuple[str, str]:
    """Run ``podium up`` (free ports, NATS to be embedded) that must stop at start:
    its one ``podium up:`` line, and all it printed."""
    env = clean_env(NATS_URL=f"nats://127.0.0.1:{free_port()}", **settings)
    output = tmp_path / "up.log"
    up = start_up(
        ["--home", str(tmp_path / "home"), "--port", "0", "--health-base", "0"], env, output
    )
    code = up.wait(timeout=90)
    text = output.read_text()
    assert code == 1, text
    (line,) = [line for line in text.splitlines() if line.startswith("podium up: ")]
    assert "restarting" not in text
    assert "Podium is up." not in text
    return line, text


def test_up_stops_when_a_service_cannot_start_instead_of_restarting_it(tmp_path: Path) -> None:
    line, _ = stopped_up(
        tmp_path, PODIUM_AGENT="claude", PODIUM_CLAUDE_BIN=str(tmp_path / "no" / "claude")
    )
    assert re.fullmatch(
        r"podium up: (conductor|worker) cannot start: the Claude Code CLI cannot be run: "
        r"PODIUM_CLAUDE_BIN \(or PODIUM_(CONDUCTOR|WORKER)_CLAUDE_BIN\)='.*/no/claude': "
        r"No such file or directory",
        line,
    ), line


def test_up_names_every_bad_setting_of_a_service_on_its_one_line(tmp_path: Path) -> None:
    line, _ = stopped_up(tmp_path, PODIUM_WORKER_SLOTS="0", PODIUM_WORKER_AGENT_POOL_SIZE="many")
    assert line.startswith("podium up: worker cannot start: invalid configuration: ")
    assert "PODIUM_WORKER_SLOTS='0' is invalid" in line
    assert "PODIUM_WORKER_AGENT_POOL_SIZE='many' is invalid" in line


SERVICE_PACKAGES = ("podium.ingress", "podium.conductor", "podium.worker", "podium.notifier")


def test_the_podium_command_imports_no_service() -> None:
    # An operator's CLI-only image has podium-cli and podium-common, not the services:
    # every module of the command must load there (podium up runs the services as
    # processes, `python -m podium.<service>`; it never imports them).
    code = (
        "import pkgutil, importlib, sys, podium.cli\n"
        "for m in pkgutil.iter_modules(podium.cli.__path__, 'podium.cli.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({SERVICE_PACKAGES!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    root = Path(__file__).resolve().parents[1]
    for path in (root / "libs" / "cli" / "src").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) podium\.(ingress|conductor|worker|notifier)\b",
                             text, re.M), path  # fmt: skip


def test_generate_without_docgen_says_what_is_missing(tmp_path: Path) -> None:
    # Run the command where podium.docgen cannot be imported, as in the CLI image.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'podium.docgen' or name.startswith('podium.docgen.'):\n"
        "            raise ModuleNotFoundError(name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [*PODIUM, "generate", "--check"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 2, done
    assert "needs the podium-docgen package" in done.stderr
    assert "Traceback" not in done.stderr
