"""``podium``: run the platform locally and talk to it.

podium up            run everything (embedded NATS unless NATS_URL answers)
podium demo          send a sample email through a running platform, print the reply
podium send TEXT     send an API message (--wait prints the reply)
podium status        streams, consumers, pending work
podium watch         print events as they are stored
podium provision     create/update streams, consumers and buckets
podium config-docs   write docs/configuration.md from the settings classes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from podium.cli import client
from podium.cli.up import Layout, api_token, up


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="podium", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="verb", required=True)
    home = os.environ.get("PODIUM_HOME", ".podium")
    url = os.environ.get("PODIUM_URL", "http://127.0.0.1:8080")

    p_up = sub.add_parser("up", help="run the whole platform on this machine")
    p_up.add_argument("--home", default=home, help="state, logs and outbox folder")
    p_up.add_argument("--port", type=int, default=8080, help="ingress port")
    p_up.add_argument("--health-base", type=int, default=9090, help="first health/metrics port")

    p_demo = sub.add_parser("demo", help="send a sample email and wait for the reply")
    p_demo.add_argument("--url", default=url)
    p_demo.add_argument("--timeout", type=float, default=90.0)

    p_send = sub.add_parser("send", help="send a message through the API")
    p_send.add_argument("text")
    p_send.add_argument("--url", default=url)
    p_send.add_argument("--home", default=home)
    p_send.add_argument("--thread", default="", help="continue this thread")
    p_send.add_argument("--wait", action="store_true", help="wait for the reply and print it")
    p_send.add_argument("--timeout", type=float, default=90.0)

    sub.add_parser("status", help="streams, consumers and pending work")
    p_watch = sub.add_parser("watch", help="print events as they are stored")
    p_watch.add_argument("streams", nargs="*", help="stream names (default: all)")
    p_watch.add_argument("--all", action="store_true", help="start from the first stored event")
    sub.add_parser("provision", help="create/update streams, consumers and buckets")
    p_docs = sub.add_parser("config-docs", help="write the configuration reference")
    p_docs.add_argument("--output", default="docs/configuration.md")
    p_docs.add_argument("--check", action="store_true", help="fail if the file is out of date")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``podium`` command."""
    args = parser().parse_args(argv)
    try:
        code = asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def _dispatch(args: argparse.Namespace) -> int:
    match args.verb:
        case "up":
            return await up(Layout(Path(args.home), args.port, args.health_base))
        case "demo":
            return await client.demo(args.url, args.timeout)
        case "send":
            token = api_token(Layout(Path(args.home)))
            return await client.send(
                args.url,
                token,
                args.text,
                thread=args.thread,
                wait=args.wait,
                timeout_s=args.timeout,
            )
        case "status":
            return await client.status()
        case "watch":
            return await client.watch(args.streams, args.all)
        case "provision":
            return await client.provision_cmd()
        case "config-docs":
            from podium.cli.docs import write_config_docs  # noqa: PLC0415

            return write_config_docs(Path(args.output), check=args.check)
    return 2


if __name__ == "__main__":
    main()
