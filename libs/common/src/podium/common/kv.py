"""Typed access to KV buckets, with optimistic concurrency.

Values are msgspec Structs stored as JSON. ``mutate`` is the only way state is
changed in place: read (value, revision), compute the new value, write it only
if the revision has not moved, and retry on a lost race. No blind overwrites.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from podium.common.errors import Conflict

T = TypeVar("T", bound=msgspec.Struct)


class Store(Generic[T]):
    """A KV bucket holding values of one Struct type.

    ``cache``: how many of its own writes this store remembers and reads back without a
    round trip. Only for the bucket's one writer (for a partitioned owner, only for the
    keys it owns; :meth:`forget` the others' when they come back): a value written by
    anyone else meanwhile is found out at the next compare-and-set, whose
    :class:`Conflict` forgets the key, and the retry reads it again. Each read decodes
    its own copy, so a caller may change what it gets.
    """

    def __init__(self, kv: KeyValue, type_: type[T], *, cache: int = 0) -> None:
        self.kv = kv
        self.type = type_
        self._decoder = msgspec.json.Decoder(type_)
        self._encoder = msgspec.json.Encoder()
        self._cache_size = cache
        self._cache: OrderedDict[str, tuple[bytes, int]] = OrderedDict()

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str, type_: type[T], *, cache: int = 0
    ) -> Store[T]:
        """Bind to an existing (provisioned) bucket."""
        return cls(await js.key_value(bucket), type_, cache=cache)

    async def get(self, key: str) -> tuple[T, int] | None:
        """(value, revision), or None when the key does not exist."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return self._decoder.decode(cached[0]), cached[1]
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        revision = entry.revision or 0
        self._remember(key, entry.value, revision)
        return self._decoder.decode(entry.value), revision

    async def create(self, key: str, value: T) -> int:
        """Write ``value`` only if ``key`` does not exist; raises :class:`Conflict`."""
        data = self._encoder.encode(value)
        try:
            revision = int(await self.kv.create(key, data))
        except KeyWrongLastSequenceError as err:
            self._cache.pop(key, None)
            raise Conflict(key) from err
        self._remember(key, data, revision)
        return revision

    async def update(self, key: str, value: T, revision: int) -> int:
        """Write ``value`` only if ``key`` is still at ``revision``; raises :class:`Conflict`."""
        data = self._encoder.encode(value)
        try:
            new_revision = int(await self.kv.update(key, data, last=revision))
        except KeyWrongLastSequenceError as err:
            self._cache.pop(key, None)
            raise Conflict(key) from err
        self._remember(key, data, new_revision)
        return new_revision

    def forget(self, keys: Callable[[str], bool]) -> None:
        """Read the keys ``keys`` picks from the bucket again (they may have moved on)."""
        for key in [k for k in self._cache if keys(k)]:
            del self._cache[key]

    def _remember(self, key: str, data: bytes, revision: int) -> None:
        if not self._cache_size:
            return
        self._cache[key] = (data, revision)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def mutate(
        self,
        key: str,
        change: Callable[[T | None], T | None],
        *,
        attempts: int = 20,
        known: tuple[T, int] | None = None,
    ) -> T | None:
        """Apply ``change`` to the current value with compare-and-set, retrying lost races.

        ``change`` receives the current value (None if absent) and returns the
        new value, or None to leave the key untouched. It may run several
        times, so it must not have side effects. ``known``: the value and revision
        the caller just wrote or read, tried first instead of reading the key again
        (a lost race reads it); revision 0 means the caller knows the key is absent.
        ``change`` gets a shallow copy: it replaces nested values, never mutates them.
        """
        found = await self.mutate_at(key, change, attempts=attempts, known=known)
        return found[0] if found else None

    async def mutate_at(
        self,
        key: str,
        change: Callable[[T | None], T | None],
        *,
        attempts: int = 20,
        known: tuple[T, int] | None = None,
    ) -> tuple[T, int] | None:
        """:meth:`mutate`, with the revision the value is at afterwards."""
        for attempt in range(attempts):
            current = (
                (msgspec.structs.replace(known[0]), known[1])
                if known is not None and attempt == 0
                else await self.get(key)
            )
            # A known revision of 0 says the caller knows the key is absent.
            exists = current is not None and current[1] > 0
            new = change(current[0] if current is not None and exists else None)
            if new is None:
                return current if exists else None
            try:
                if current is None or not exists:
                    revision = await self.create(key, new)
                else:
                    revision = await self.update(key, new, current[1])
            except Conflict:
                await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # noqa: S311
                continue
            return new, revision
        raise Conflict(key)
