"""A task's files: what people sent goes in ``inputs/``, what the agent makes comes
out of ``outputs/``.

The platform moves them, not the agent: the worker service reads the
``attachments`` object store (email attachments, MMS media the ingress kept) and
writes the files into the task's directory before its first turn; after every
turn it stores each regular file under ``outputs/`` in the ``artifacts`` object
store, with its size, media type and sha256, for the conductor to attach. Names
coming from outside (an attachment's file name) or from the agent (a file under
``outputs/``) are made safe here: one path component each for inputs, no ``..``,
no absolute paths, no symlinks followed, no clashes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import mimetypes
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from podium.contracts.events import Artifact, Media

log = logging.getLogger(__name__)

INPUTS = "inputs"
OUTPUTS = "outputs"

_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_name(name: str, taken: set[str], fallback: str = "file") -> str:
    """One safe path component for ``name``, not in ``taken`` (which it joins).

    Keeps letters, digits, dot, dash, underscore and space; drops directories,
    control characters and leading dots (no hidden files, no ``..``); a clash gets
    ``-2``, ``-3``… before the extension.
    """
    base = PurePosixPath(name.replace("\\", "/")).name
    cleaned = _UNSAFE.sub("_", base).strip(" .")[:120] or fallback
    stem, dot, ext = cleaned.rpartition(".")
    if not dot or not stem:
        stem, ext = cleaned, ""
    candidate, n = cleaned, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem}-{n}.{ext}" if ext else f"{stem}-{n}"
    taken.add(candidate.lower())
    return candidate


@dataclass
class Staged:
    """What a task was given: lines for its prompt (placed files, files left out)."""

    placed: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def prompt_lines(self) -> list[str]:
        """The task prompt's list of its input files."""
        lines = []
        if self.placed:
            lines.append(f"Input files (in {INPUTS}/ in your working directory):")
            lines += [f"- {line}" for line in self.placed]
        if self.left_out:
            lines.append("Files sent with the request that you do NOT have:")
            lines += [f"- {line}" for line in self.left_out]
        return lines


async def stage_inputs(
    store: ObjectStore | None, media: list[Media], workdir: Path, limit_bytes: int
) -> Staged:
    """Place the conversation's stored files under ``workdir/inputs``, within
    ``limit_bytes`` in all; say which were left out and why."""
    staged = Staged()
    taken: set[str] = set()
    used = 0
    directory = workdir / INPUTS
    for item in media:
        label = item.filename or item.url or "a file"
        if not item.object:
            staged.left_out.append(f"{label}: {item.note or 'it was not stored'}")
            continue
        if store is None:
            staged.left_out.append(f"{label}: this worker cannot read the attachment store")
            continue
        if used + item.size > limit_bytes:
            staged.left_out.append(
                f"{label} ({item.size} bytes): over this task's {limit_bytes} byte limit "
                "for input files (PODIUM_TASK_INPUTS_MAX_BYTES)"
            )
            continue
        try:
            data = (await store.get(item.object)).data or b""
        except NotFoundError:
            staged.left_out.append(f"{label}: no longer in the attachment store (expired)")
            continue
        name = safe_name(item.filename or _name_from(item), taken)
        await asyncio.to_thread(_write, directory / name, data)
        used += len(data)
        kind = item.content_type or "application/octet-stream"
        staged.placed.append(f"{INPUTS}/{name} ({kind}, {len(data)} bytes)")
    return staged


def _name_from(item: Media) -> str:
    extension = mimetypes.guess_extension(item.content_type or "") or ""
    return f"file{extension}"


def _write(path: Path, data: bytes) -> None:
    """A new file, never through a link the agent may have left at its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _read(path: Path) -> bytes:
    """A regular file's bytes, refusing a symlink swapped in since the scan (or a hard link
    to a file elsewhere): only a file that is this path's own."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise OSError(0, "not a regular file of its own (a link)")
        return src.read()


@dataclass
class Collected:
    """A turn's artifacts, as stored, and what was not kept."""

    artifacts: list[Artifact] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Found:
    name: str
    path: Path
    size: int


def _scan(outputs: Path, max_count: int, max_bytes: int) -> tuple[list[_Found], list[str]]:
    """Regular files under ``outputs`` (symlinks neither followed nor kept), by name."""
    found: list[_Found] = []
    left_out: list[str] = []
    if not outputs.is_dir() or outputs.is_symlink():
        return found, left_out
    paths: list[Path] = []
    for root, dirs, files in os.walk(outputs, followlinks=False):
        hidden = sorted(d for d in dirs if d.startswith("."))
        left_out += [f"{Path(root, d).relative_to(outputs).as_posix()}/: hidden" for d in hidden]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [Path(root, file) for file in files]
        # A symlink to a directory is listed as a directory, and not walked into.
        paths += [Path(root, d) for d in dirs if Path(root, d).is_symlink()]
    for path in sorted(paths, key=lambda p: p.relative_to(outputs).as_posix()):
        rel = path.relative_to(outputs).as_posix()
        try:
            info = path.lstat()
        except OSError:
            continue  # gone since the walk
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            left_out.append(f"{rel}: not a regular file (links are not followed)")
        elif path.name.startswith(".") or _UNSAFE.search(rel.replace("/", "")):
            left_out.append(f"{rel}: unsafe name (letters, digits, . - _ and spaces only)")
        elif info.st_size > max_bytes:
            left_out.append(
                f"{rel}: {info.st_size} bytes, over the {max_bytes} byte limit "
                "(PODIUM_ARTIFACT_MAX_BYTES)"
            )
        elif len(found) >= max_count:
            left_out.append(f"{rel}: more than {max_count} files (PODIUM_ARTIFACTS_MAX_COUNT)")
        else:
            found.append(_Found(rel, path, info.st_size))
    return found, left_out


async def collect_artifacts(
    store: ObjectStore | None, task_id: str, workdir: Path, *, max_count: int, max_bytes: int
) -> Collected:
    """Store every file under ``workdir/outputs`` in the artifacts store (unchanged ones
    are not uploaded again); what the conductor may attach."""
    collected = Collected()
    # One stat of a local directory, cheaper than the thread hop it saves on most turns.
    if not os.path.isdir(workdir / OUTPUTS):  # noqa: ASYNC240
        return collected
    found, collected.left_out = await asyncio.to_thread(
        _scan, workdir / OUTPUTS, max_count, max_bytes
    )
    if store is None:
        collected.left_out += [f"{f.name}: no artifact store" for f in found]
        return collected
    for item in found:
        try:
            data = await asyncio.to_thread(_read, item.path)
        except OSError as err:
            collected.left_out.append(f"{item.name}: could not be read ({err.strerror or err})")
            continue
        digest = hashlib.sha256(data).digest()
        kind = mimetypes.guess_type(item.name)[0] or "application/octet-stream"
        # Named by content too: a message that attached this version still sends this
        # version, byte for byte, when a later turn has changed the file.
        name = f"{task_id}/{digest.hex()[:16]}/{item.name}"
        try:
            if not await _same(store, name, digest):
                await store.put(name, data, meta=ObjectMeta(name=name, description=kind))
        except Exception as err:  # noqa: BLE001 - a file not kept is reported, not fatal
            log.warning("artifact not stored", extra={"object": name, "error": repr(err)})
            collected.left_out.append(f"{item.name}: could not be stored ({type(err).__name__})")
            continue
        collected.artifacts.append(
            Artifact(
                task_id=task_id,
                name=item.name,
                size=len(data),
                content_type=kind,
                sha256=digest.hex(),
                object=name,
            )
        )
    if collected.left_out:
        log.warning("outputs left out", extra={"task_id": task_id, "files": collected.left_out})
    return collected


async def _same(store: ObjectStore, name: str, digest: bytes) -> bool:
    """Whether the store holds ``name`` with these contents already."""
    try:
        info = await store.get_info(name)
    except NotFoundError:
        return False
    stored = (info.digest or "").split("=", 1)[-1]
    try:
        return base64.urlsafe_b64decode(stored + "=" * (-len(stored) % 4)) == digest
    except ValueError:
        return False
