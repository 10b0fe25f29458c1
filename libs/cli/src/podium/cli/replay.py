"""``podium replay``: put stored events through the platform again, safely.

The replay itself (and why it is safe) is :mod:`podium.common.replay`, which the console
uses too; this is the command line's side of it.
"""

from __future__ import annotations

from podium.common.replay import (
    HDR_REPLAY_OF,
    Replay,
    consumers_matching,
    dead_letters,
    from_dead_letter,
    from_stream,
    original_subject,
    publish,
    replay_headers,
    reset,
)
from podium.contracts import subjects

__all__ = ["HDR_REPLAY_OF", "original_subject", "replay_headers", "run"]


def _print(text: str) -> None:
    print(text, flush=True)  # noqa: T201


def _show(replays: list[Replay]) -> None:
    for r in replays:
        _print(f"{r.source} -> {r.subject}  Nats-Msg-Id={r.headers[subjects.HDR_MSG_ID]}")


async def run(
    verb: str,
    *,
    stream: str = "",
    seqs: list[int] | None = None,
    first: int = 0,
    last: int = 0,
    consumers: list[str] | None = None,
    list_only: bool = False,
    every: bool = False,
    dry_run: bool = False,
) -> int:
    """The ``podium replay`` verbs (see the module docstring)."""
    from podium.cli.client import nats_client  # noqa: PLC0415

    nc = await nats_client("podium-replay")
    try:
        js = nc.jetstream()
        match verb:
            case "stream":
                wanted = list(seqs or []) + (list(range(first, last + 1)) if first else [])
                if not wanted:
                    _print("podium replay stream: give sequences, or --from and --to")
                    return 2
                replays = await from_stream(js, stream, wanted)
            case "deadletter":
                letters = await dead_letters(js, None if (every or list_only) else seqs)
                if list_only:
                    for seq, letter in letters:
                        _print(
                            f"{seq}  {letter.service}  {letter.stream}:{letter.stream_seq}  "
                            f"{letter.subject}  deliveries={letter.deliveries}  {letter.reason}"
                        )
                    return 0
                if not every and not seqs:
                    _print("podium replay deadletter: give sequences, --all, or --list")
                    return 2
                replays = [from_dead_letter(seq, letter) for seq, letter in letters]
            case "reset":
                names = consumers_matching(stream, consumers or [])
                if not names:
                    _print(f"podium replay reset: no consumer of {stream} matches {consumers}")
                    return 2
                if dry_run:
                    _print("would reset: " + ", ".join(names))
                    return 0
                for line in await reset(js, stream, names, first):
                    _print(line)
                return 0
            case _:
                return 2
        _show(replays)
        if dry_run:
            _print(f"dry run: {len(replays)} message(s) not published")
            return 0
        stored = await publish(js, replays)
        _print(f"replayed {stored} of {len(replays)} message(s)")
        return 0
    finally:
        await nc.close()
