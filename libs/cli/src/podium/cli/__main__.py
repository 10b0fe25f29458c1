"""``podium``: run the platform locally and talk to it.

podium up            run everything (embedded NATS unless NATS_URL answers)
podium demo          send a sample email through a running platform, print the reply
podium send TEXT     send an API message (--wait prints the reply)
podium status        streams, consumers, pending work
podium watch         print events as they are stored
podium provision     create/update streams, consumers and buckets
podium replay        re-publish stored events or dead letters, rewind consumers
podium generate      write every generated file (docs, NATS permissions, monitoring)
podium config-docs   write docs/configuration.md from the settings classes

The operators' console, from a terminal (its JSON API; --json prints it as it came):
podium conversations [--state S]   podium show CONVERSATION   podium tasks
podium kill TASK   podium escalations   podium answer CONVERSATION "TEXT"
podium close CONVERSATION   podium console-operator NAME [--viewer]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from podium.cli import client
from podium.cli.up import Layout, UpError, api_token, up
from podium.common.errors import PodiumError

ENVIRONMENT = """\
environment:
  NATS_URL                       the NATS server (default: the one a running `podium up`
                                 uses, from PODIUM_HOME/platform.json; else 127.0.0.1:4222)
  PODIUM_NATS_USER, PODIUM_NATS_PASSWORD, PODIUM_NATS_CREDS
                                 NATS credentials (the admin user, where the server has users)
  PODIUM_NATS_CONNECT_TIMEOUT_S  give up connecting to NATS after this long (default 5)
  PODIUM_HOME                    podium up's folder: state, logs, outbox, token (.podium)
  PODIUM_URL                     the ingress demo and send talk to (default: podium up's)
  PODIUM_API_TOKEN               the API token send uses (default: PODIUM_HOME/api-token,
                                 which podium up generates; the ingress reads PODIUM_API_TOKENS)
  PODIUM_CONSOLE_URL             the console the operator verbs call (default: podium up's)
  PODIUM_CONSOLE_TOKEN           an operator's token (default: PODIUM_HOME/console-token)
Every service setting is described in docs/configuration.md.
"""


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="podium",
        description=__doc__,
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"podium {_version()}")
    sub = p.add_subparsers(dest="verb", required=True)
    url_help = "the ingress (default: PODIUM_URL, else the running `podium up`'s)"
    # Where `podium up` keeps its files; the other verbs find the platform there.
    homed = argparse.ArgumentParser(add_help=False)
    homed.add_argument(
        "--home",
        default=os.environ.get("PODIUM_HOME", ".podium"),
        help="podium up's folder: state, logs, outbox, token (default: PODIUM_HOME or .podium)",
    )

    p_up = sub.add_parser("up", help="run the whole platform on this machine", parents=[homed])
    p_up.add_argument(
        "--port", type=int, default=None, help="ingress port (default 8080, or a free one)"
    )
    p_up.add_argument(
        "--health-base",
        type=int,
        default=None,
        help="first of the four health/metrics ports (default 9090, or free ones; 0 = free)",
    )

    p_demo = sub.add_parser(
        "demo", help="send a sample email and wait for the reply", parents=[homed]
    )
    p_demo.add_argument("--url", default=None, help=url_help)
    p_demo.add_argument("--timeout", type=float, default=90.0)

    p_send = sub.add_parser("send", help="send a message through the API", parents=[homed])
    p_send.add_argument("text")
    p_send.add_argument("--url", default=None, help=url_help)
    p_send.add_argument("--thread", default="", help="continue this thread")
    p_send.add_argument("--wait", action="store_true", help="wait for the reply and print it")
    p_send.add_argument("--timeout", type=float, default=90.0)

    sub.add_parser("status", help="streams, consumers and pending work", parents=[homed])
    p_watch = sub.add_parser("watch", help="print events as they are stored", parents=[homed])
    p_watch.add_argument("streams", nargs="*", help="stream names (default: all)")
    p_watch.add_argument("--all", action="store_true", help="start from the first stored event")
    p_prov = sub.add_parser("provision", help="create/update streams, consumers and buckets")
    p_prov.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for NATS"
    )
    _replay_parser(sub)
    _operator_parsers(sub, homed)
    p_gen = sub.add_parser("generate", help="write every file generated from the code")
    p_gen.add_argument("--root", default=".", help="the repository's root")
    p_gen.add_argument("--check", action="store_true", help="fail if a file is out of date")
    p_docs = sub.add_parser("config-docs", help="write the configuration reference")
    p_docs.add_argument("--output", default="docs/configuration.md")
    p_docs.add_argument("--check", action="store_true", help="fail if the file is out of date")
    return p


def _operator_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], homed: argparse.ArgumentParser
) -> None:
    """The console's verbs."""
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON as it came")
    parents = [homed, as_json]
    p_conv = sub.add_parser("conversations", help="list conversations", parents=parents)
    p_conv.add_argument("--state", choices=["open", "escalated", "closed"], default="")
    p_conv.add_argument("--channel", choices=["email", "sms", "api"], default="")
    p_conv.add_argument("--search", default="", help="text in a participant, subject or request")
    p_show = sub.add_parser("show", help="a conversation and its timeline", parents=parents)
    p_show.add_argument("conversation")
    sub.add_parser("tasks", help="every task", parents=parents)
    p_kill = sub.add_parser("kill", help="kill a running task", parents=parents)
    p_kill.add_argument("task")
    p_kill.add_argument("--reason", default="")
    sub.add_parser("escalations", help="conversations waiting for you", parents=parents)
    p_answer = sub.add_parser("answer", help="answer a conversation", parents=parents)
    p_answer.add_argument("conversation")
    p_answer.add_argument("text")
    p_close = sub.add_parser("close", help="close a conversation", parents=parents)
    p_close.add_argument("conversation")
    p_close.add_argument("--reason", default="")
    p_op = sub.add_parser(
        "console-operator",
        help="make an operator's token and its PODIUM_CONSOLE_OPERATORS entry",
    )
    p_op.add_argument("name")
    p_op.add_argument("--viewer", action="store_true", help="read-only")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("podium-cli")
    except PackageNotFoundError:
        return "unknown"


def _replay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p_replay = sub.add_parser(
        "replay",
        help="re-publish stored events or dead letters, rewind consumers",
        description="Replays are safe: a replayed event keeps its event, task and command "
        "ids, so what was already handled or sent is not done again (docs/operations.md).",
    )
    how = p_replay.add_subparsers(dest="replay", required=True)
    p_stream = how.add_parser("stream", help="re-publish stored messages of a stream")
    p_stream.add_argument("stream", help="INBOUND, TASKS, RESULTS or COMMANDS")
    p_stream.add_argument("seqs", nargs="*", type=int, help="stream sequences")
    p_stream.add_argument("--from", dest="first", type=int, default=0, help="first sequence")
    p_stream.add_argument("--to", dest="last", type=int, default=0, help="last sequence")
    p_stream.add_argument("--dry-run", action="store_true", help="show, do not publish")
    p_dead = how.add_parser("deadletter", help="re-publish dead letters' original messages")
    p_dead.add_argument("seqs", nargs="*", type=int, help="DEADLETTER sequences")
    p_dead.add_argument("--all", dest="every", action="store_true", help="every dead letter")
    p_dead.add_argument("--list", dest="list_only", action="store_true", help="only list them")
    p_dead.add_argument("--dry-run", action="store_true", help="show, do not publish")
    p_reset = how.add_parser("reset", help="rewind durable consumers (server 2.14+)")
    p_reset.add_argument("stream")
    p_reset.add_argument("consumers", nargs="+", help="names or globs (conductor-inbound-p*)")
    p_reset.add_argument(
        "--seq", dest="first", type=int, default=0, help="deliver again from this sequence"
    )
    p_reset.add_argument("--dry-run", action="store_true", help="show, do not reset")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``podium`` command.

    A fault it cannot get past (NATS unreachable or too old, a bad setting) is one
    line on stderr naming it, and exit status 1.
    """
    args = parser().parse_args(argv)
    try:
        code = asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        code = 130
    except PodiumError as err:
        print(f"podium {args.verb}: {err}", file=sys.stderr)  # noqa: T201
        code = 1
    sys.exit(code)


async def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "home", None):
        # One place for every verb's lookups (platform.json, the token file).
        os.environ["PODIUM_HOME"] = args.home
    match args.verb:
        case "up":
            layout = Layout(Path(args.home), args.port, args.health_base)
            if args.port is None and (env_port := os.environ.get("PODIUM_PORT")):
                if not env_port.isdigit():
                    raise UpError(f"PODIUM_PORT={env_port!r} is not a port number")
                layout.ingress_port, layout.port_source = int(env_port), "PODIUM_PORT"
            return await up(layout)
        case "demo":
            return await client.demo(client.ingress_url(args.url), args.timeout)
        case "send":
            token = api_token(Layout(Path(args.home)))
            return await client.send(
                client.ingress_url(args.url),
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
            return await client.provision_cmd(args.wait)
        case "replay":
            from podium.cli import replay  # noqa: PLC0415

            return await replay.run(
                args.replay,
                stream=getattr(args, "stream", ""),
                seqs=getattr(args, "seqs", None),
                first=getattr(args, "first", 0),
                last=getattr(args, "last", 0),
                consumers=getattr(args, "consumers", None),
                list_only=getattr(args, "list_only", False),
                every=getattr(args, "every", False),
                dry_run=args.dry_run,
            )
        case "generate" | "config-docs":
            return _generate(args)
        case "conversations" | "show" | "tasks" | "kill" | "escalations" | "answer" | "close":
            from podium.cli import operate  # noqa: PLC0415

            return await operate.run(args.verb, args)
        case "console-operator":
            from podium.common.operators import new_operator  # noqa: PLC0415

            token, entry = new_operator(args.name, "viewer" if args.viewer else "operator")
            print(f"token (give it to {args.name}; it is shown once): {token}")  # noqa: T201
            print(f"PODIUM_CONSOLE_OPERATORS entry: {entry}")  # noqa: T201
            return 0
    return 2


def _generate(args: argparse.Namespace) -> int:
    """The development verbs: they need podium-docgen (which documents every service).

    The ``podium`` command does not depend on the services, so an operator's CLI-only
    image has none of them; there these verbs say so instead of failing on an import.
    """
    try:
        from podium.docgen import docs, generate  # noqa: PLC0415
    except ModuleNotFoundError as err:
        print(  # noqa: T201
            f"podium {args.verb}: needs the podium-docgen package and the four services "
            f"({err.name} is not installed); run it in the repository's development "
            "environment (make setup)",
            file=sys.stderr,
        )
        return 2
    if args.verb == "generate":
        return generate.generate(Path(args.root), check=args.check)
    return docs.write_config_docs(Path(args.output), check=args.check)


if __name__ == "__main__":
    main()
