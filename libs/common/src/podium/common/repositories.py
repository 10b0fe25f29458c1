"""The repositories workers may change (``PODIUM_REPOSITORIES_FILE``, YAML or JSON).

The conductor reads it to list the repositories in its role prompt and to refuse a
task naming one that is not there; the worker reads it to fetch, check, push and open
pull requests. Tokens are never in the file: an entry names the setting (environment
variable or mounted secret) that holds its token, and only the worker service reads it.

Either a list of entries or ``{"repositories": [...]}``::

    repositories:
      - name: site
        description: The marketing site (landing page, pricing)
        url: https://github.com/acme/site.git
        default_branch: main
        provider: github
        repo: acme/site
        token_setting: PODIUM_GITHUB_TOKEN
        check: make test
        check_timeout_s: 600
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from podium.common.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_OWNER_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:\S+$")


class Repository(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One repository a task may run in."""

    name: str
    description: str
    #: ssh (``git@host:owner/repo.git`` or ``ssh://``), https or file URL.
    url: str
    default_branch: str = "main"
    provider: Literal["", "github"] = ""
    api_url: str = "https://api.github.com"
    #: ``owner/repo`` on the provider.
    repo: str = ""
    #: The setting that holds the token for fetch, push and the provider's API.
    token_setting: str = ""
    #: Run in the worktree after the agent's work, before the push (``make test``).
    check: str = ""
    check_timeout_s: float = 600.0

    @property
    def is_https(self) -> bool:
        """Whether git reaches it over https (where a token goes in a header)."""
        return self.url.startswith("https://")


class _File(msgspec.Struct, forbid_unknown_fields=True):
    repositories: list[Repository]


def load(path: str) -> dict[str, Repository]:
    """The repositories of ``path`` by name ({} for an empty path); ConfigError naming the
    file and the fault otherwise."""
    if not path:
        return {}
    where = f"PODIUM_REPOSITORIES_FILE ({path})"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError([f"{where}: cannot be read: {err.strerror}"]) from err
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        raw: Any = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError([f"{where}: not valid {kind}: {err}"]) from err
    if isinstance(raw, list):
        raw = {"repositories": raw}
    try:
        entries = msgspec.convert(raw, _File).repositories
    except msgspec.ValidationError as err:
        raise ConfigError([f"{where}: {err}"]) from err
    found: dict[str, Repository] = {}
    for entry in entries:
        problem = _problem(entry)
        if entry.name in found:
            problem = "the name is used twice"
        if problem:
            raise ConfigError([f"{where}: repository {entry.name!r}: {problem}"])
        found[entry.name] = entry
    return found


def _problem(entry: Repository) -> str:
    if not _NAME.match(entry.name):
        return "the name must be letters, digits, '.', '_' or '-' (at most 64)"
    if not entry.description.strip() or "\n" in entry.description:
        return "the description must be one line"
    if not (entry.url.startswith(("https://", "ssh://", "file://")) or _SCP_LIKE.match(entry.url)):
        return "the url must be https://, ssh://, file:// or user@host:path"
    if not re.match(r"^[A-Za-z0-9._/-]+$", entry.default_branch) or ".." in entry.default_branch:
        return "default_branch is not a branch name"
    if entry.token_setting and not _ENV_NAME.match(entry.token_setting):
        return "token_setting must name an environment variable (UPPER_CASE)"
    if entry.provider == "github":
        if not _OWNER_REPO.match(entry.repo):
            return "provider github needs repo: <owner>/<repo>"
        if not entry.token_setting:
            return "provider github needs token_setting: the setting that holds its token"
        if not entry.api_url.startswith(("https://", "http://")):
            return "api_url must be an http(s) URL"
    if entry.check_timeout_s <= 0:
        return "check_timeout_s must be positive"
    return ""


def prompt_lines(repositories: dict[str, Repository]) -> str:
    """What the conductor's role prompt says of them ("" when there are none)."""
    if not repositories:
        return ""
    lines = [
        "",
        "Repositories a worker can change: put a line `Repository: <name>` in the "
        "SPAWN_WORKER task. The worker then runs in a checkout of it on its own branch; "
        "the platform commits, runs the repository's check, pushes, opens the pull request "
        "and reports Branch, Diff, Check and Pull request lines with the result.",
    ]
    lines += [f"- {r.name}: {r.description}" for r in repositories.values()]
    return "\n".join(lines) + "\n"


_REPOSITORY_LINE = re.compile(r"^\s*Repository:\s*(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


def named_in(task: str) -> str:
    """The repository a task's text names in a ``Repository: <name>`` line ("" = none)."""
    match = _REPOSITORY_LINE.search(task)
    return match.group(1).strip("`'\"") if match else ""
