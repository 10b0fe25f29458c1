"""``podium up`` and ``podium demo``, as a newcomer runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podium.cli.natsserver import free_port
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

        demo = subprocess.run(
            [*PODIUM, "demo", "--url", f"http://127.0.0.1:{ingress_port}", "--timeout", "30"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr + output.read_text()
        assert "← reply to ada@example.com" in demo.stdout
        assert "Subject: Re: Launch checklist" in demo.stdout
        assert (tmp_path / "home" / "outbox.jsonl").exists()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=30)
        log.close()
    assert code == 0, output.read_text()
    assert "conductor | INFO    stopped" in output.read_text()
    assert not nats_answers(env["NATS_URL"])


def test_demo_without_a_platform_fails_clearly(tmp_path: Path) -> None:
    demo = subprocess.run(
        [*PODIUM, "demo", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert demo.returncode == 1
    assert "cannot reach the ingress" in demo.stderr
