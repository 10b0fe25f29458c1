"""Error types shared by every Podium service.

The type of an error raised by a handler decides what happens to the message
that caused it (see :mod:`podium.common.consumer`): ``Retry`` naks it with a
delay, ``Reject`` terminates it and records a dead letter. Anything else is a
bug: it is retried with backoff until ``max_deliver``, then dead-lettered.
"""

from __future__ import annotations


class PodiumError(Exception):
    """Base of every error Podium raises on purpose."""


#: Exit status of a service that stopped at start on a fault a restart cannot fix
#: (``StartupError``): ``podium up`` stops the platform instead of restarting it.
EXIT_STARTUP = 2


class StartupError(PodiumError):
    """A fault found at start that a restart cannot fix: a setting, the NATS server,
    the agent CLI, a port. The service exits with :data:`EXIT_STARTUP` and this message."""


class ConfigError(StartupError):
    """One or more settings are missing or invalid; the service must not start."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class IncompatibleServer(StartupError):
    """The NATS server answers, but is older than the features Podium uses need."""

    def __init__(self, url: str, found: str, needed: str) -> None:
        self.url = url
        self.found = found
        self.needed = needed
        super().__init__(
            f"the NATS server at {url} is nats-server {found}; Podium needs {needed} or newer "
            "(JetStream consumer reset, subject transforms)"
        )


class NatsUnreachable(PodiumError):
    """No connection to NATS could be made (a restart or a retry may help)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot connect to NATS at {url}: {reason}")


class ProvisionError(StartupError):
    """The server refused to create or update part of Podium's topology."""


class AgentUnavailable(StartupError):
    """The configured agent CLI cannot be run."""


class Retry(PodiumError):
    """A transient failure: deliver the message again after ``delay_s`` seconds."""

    def __init__(self, reason: str, *, delay_s: float = 1.0) -> None:
        self.reason = reason
        self.delay_s = delay_s
        super().__init__(reason)


class Reject(PodiumError):
    """The message can never succeed: terminate it and record a dead letter."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Conflict(PodiumError):
    """An optimistic-concurrency update lost the race (the revision moved)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"concurrent update of {key!r}")


class AgentError(PodiumError):
    """An agent runtime could not produce an answer (crash, timeout, bad output)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {message}")
