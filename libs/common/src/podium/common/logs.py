"""Structured JSON logs: one line per event, carrying the correlation id.

The consumer loop binds ``correlation_id``, ``event_id`` and
``conversation_id`` into a context variable for the duration of a handler, so
every log line written while handling an event carries them without passing
them around. Message bodies and secrets are logged at DEBUG level only.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "podium_log_context",
    default={},  # noqa: B039 - never mutated, replaced whole
)

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_encoder = msgspec.json.Encoder(enc_hook=str)


@contextlib.contextmanager
def bound(**fields: str) -> Iterator[None]:
    """Attach ``fields`` to every log line written inside the ``with`` block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, str]:
    """The fields currently bound (a copy)."""
    return dict(_context.get())


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._second = -1
        self._prefix = ""

    def _timestamp(self, created: float) -> str:
        """ISO 8601 with milliseconds; the part up to the second is formatted once a second
        (logs are written on hot paths)."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line: time, level, service, logger, message, bound context, extras."""
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context.get())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return _encoder.encode(entry).decode()


def configure(service: str, level: str = "INFO") -> None:
    """Send this process's logs to stderr as JSON lines, replacing other handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs every reconnect attempt at ERROR with a traceback; we log our own.
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
