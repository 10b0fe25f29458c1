"""Repository tasks: a worktree on its own branch in, a pushed branch and a pull request out.

The worker service keeps one bare mirror per repository (``<state dir>/repos``),
fetched before each new task, and gives the task a git worktree of it on
``podium/<task id>`` made from the default branch: no task clones the whole
history. When the agent reports COMPLETE, the platform commits what it left,
runs the repository's check, pushes the branch and opens (later: updates) the
pull request, and reports what it found as facts the conductor can trust.

Credentials stay with the platform. The mirror has no remote configured: every
fetch and push names the URL, and a token goes to git in the environment of that
one git process (``GIT_CONFIG_*``: an ``http.extraHeader``), never on a command
line, in a config file, the agent's environment, its working directory or a log.
An agent that runs ``git push`` itself finds no remote and no credentials.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from podium.agents.sandbox import Sandbox
from podium.common.errors import ConfigError
from podium.common.procs import kill_group
from podium.common.repositories import Repository

log = logging.getLogger(__name__)

#: What a repository task's worktree never commits: the platform's own directories.
EXCLUDED = ("/inputs/", "/outputs/")
TAIL = 2000


class GitError(RuntimeError):
    """A git command failed; the message has its stderr (credentials never in it)."""


@dataclass
class Delivered:
    """What the platform did with a finished repository task."""

    facts: list[str] = field(default_factory=list)
    details: str = ""
    pull_request: int = 0
    pull_request_url: str = ""


class Repositories:
    """The mirrors, worktrees, pushes and pull requests of one worker replica."""

    def __init__(
        self,
        repositories: dict[str, Repository],
        state_dir: Path,
        *,
        author: str,
        environ: dict[str, str] | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.repositories = repositories
        self.root = state_dir / "repos"
        self.author = author
        #: Where a repository's check runs (it runs code the agent may have written).
        self.sandbox = sandbox
        env = os.environ if environ is None else environ
        self.tokens: dict[str, str] = {}
        missing = []
        for repo in repositories.values():
            if repo.token_setting:
                token = env.get(repo.token_setting, "")
                if not token:
                    missing.append(
                        f"{repo.token_setting}: the token of repository {repo.name} is not set"
                    )
                self.tokens[repo.name] = token
        if missing:
            raise ConfigError(missing)
        self.locks: dict[str, asyncio.Lock] = {}
        # git's own home: no user config, no credential helper, no prompts.
        self.home = self.root / "home"

    def get(self, name: str) -> Repository | None:
        """The repository called ``name``."""
        return self.repositories.get(name)

    def mirror(self, name: str) -> Path:
        """The bare mirror of repository ``name`` (its worktrees' git metadata)."""
        return self.root / f"{name}.git"

    # --- git ---------------------------------------------------------------

    def _env(self, repo: Repository | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "LC_ALL": "C",
        }
        token = self.tokens.get(repo.name, "") if repo else ""
        if repo is not None and token and repo.is_https:
            basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
            env |= {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
            }
        return env

    async def _git(
        self, *args: str, cwd: Path, repo: Repository | None = None, timeout_s: float = 300.0
    ) -> str:
        proc = await asyncio.create_subprocess_exec(
            "git",
            # Nothing the agent may have written runs here: no hooks, no fsmonitor, no
            # ext:: transport (the worktree and its files are the agent's).
            *("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"),
            *("-c", "protocol.ext.allow=never"),
            *args,
            cwd=cwd,
            env=self._env(repo),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except TimeoutError as exc:
            raise GitError(f"git {args[0]} took longer than {timeout_s:.0f}s") from exc
        finally:
            await kill_group(proc)
        if proc.returncode != 0:
            what = next((a for a in args if not a.startswith("-") and "=" not in a), "")
            raise GitError(f"git {what} failed: {self._redact(err.decode(errors='replace'))}")
        return out.decode(errors="replace")

    def _redact(self, text: str) -> str:
        for token in self.tokens.values():
            if token:
                text = text.replace(token, "***")
        return text.strip()[-TAIL:]

    async def _mirror(self, repo: Repository) -> Path:
        """The repository's bare mirror, fetched now."""
        mirror = self.mirror(repo.name)
        if not (mirror / "HEAD").exists():
            self.home.mkdir(parents=True, exist_ok=True)
            mirror.mkdir(parents=True, exist_ok=True)
            await self._git("init", "--bare", "--quiet", str(mirror), cwd=self.root)
            exclude = mirror / "info" / "exclude"
            exclude.parent.mkdir(exist_ok=True)
            exclude.write_text("\n".join(EXCLUDED) + "\n")
        await self._git(
            "fetch", "--prune", "--quiet", repo.url, "+refs/heads/*:refs/remotes/origin/*",
            cwd=mirror, repo=repo,
        )  # fmt: skip
        return mirror

    async def worktree(self, name: str, task_id: str, workdir: Path) -> str:
        """Give the task a worktree of repository ``name`` on ``podium/<task id>``; the
        branch. Run again for the same task (a redelivery, a fix round), it keeps the
        worktree; one that is gone is made again from what was pushed of the branch."""
        repo = self.repositories[name]
        branch = f"podium/{task_id}"
        async with self.locks.setdefault(name, asyncio.Lock()):
            mirror = await self._mirror(repo)
            if await asyncio.to_thread(_gitdir, mirror, workdir) is not None:
                return branch
            if await asyncio.to_thread(workdir.exists):
                # What a failed earlier attempt left (no worktree of ours): start clean.
                await asyncio.to_thread(shutil.rmtree, workdir)
            await self._git("worktree", "prune", cwd=mirror)
            pushed = f"refs/remotes/origin/{branch}"
            try:
                await self._git("rev-parse", "--verify", "--quiet", pushed, cwd=mirror)
                base = pushed
            except GitError:
                base = f"refs/remotes/origin/{repo.default_branch}"
            await self._git(
                "worktree", "add", "--quiet", "-B", branch, str(workdir), base, cwd=mirror
            )
        return branch

    def _in(self, mirror: Path, workdir: Path) -> list[str]:
        """Arguments that make git use the task's worktree as the platform made it,
        whatever the agent did to its ``.git`` file (never a repository found above it)."""
        gitdir = _gitdir(mirror, workdir)
        if gitdir is None:
            raise GitError(f"the task's worktree is gone ({workdir})")
        return [f"--git-dir={gitdir}", f"--work-tree={workdir}"]

    async def prune(self, name: str, max_age_s: float) -> int:
        """Remove worktrees of repository ``name`` untouched for ``max_age_s`` (a finished
        task the conductor accepted keeps its worktree for fix rounds until then)."""
        mirror = self.mirror(name)
        if not (mirror / "worktrees").is_dir():
            return 0
        stale = await asyncio.to_thread(_stale_worktrees, mirror, max_age_s)
        for workdir in stale:
            await self.remove(name, workdir)
        if stale:
            log.info("stale worktrees removed", extra={"repository": name, "n": len(stale)})
        return len(stale)

    async def remove(self, name: str, workdir: Path) -> None:
        """Remove a task's worktree (its branch stays pushed)."""
        repo = self.repositories.get(name)
        mirror = self.mirror(name)
        if repo is None or not mirror.exists():
            return
        async with self.locks.setdefault(name, asyncio.Lock()):
            try:
                await self._git("worktree", "remove", "--force", str(workdir), cwd=mirror)
            except GitError as err:
                log.warning("worktree not removed", extra={"error": str(err)[:300]})
            await self._git("worktree", "prune", cwd=mirror)

    # --- delivery ------------------------------------------------------------

    async def deliver(
        self,
        name: str,
        task_id: str,
        workdir: Path,
        *,
        title: str,
        summary: str,
        pull_request: int,
        http: aiohttp.ClientSession,
    ) -> Delivered:
        """Commit, check, push and open or update the pull request; what was found."""
        repo = self.repositories[name]
        branch = f"podium/{task_id}"
        done = Delivered(pull_request=pull_request)
        done.facts.append(f"Branch: {branch}")
        mirror = self.mirror(name)
        into = self._in(mirror, workdir)
        # inputs/ and outputs/ are the platform's, whatever a .gitignore says.
        keep_out = [f":(top,exclude){d.strip('/')}" for d in EXCLUDED]
        await self._git(*into, "add", "--all", "--", ".", *keep_out, cwd=workdir)
        if (await self._git(*into, "diff", "--cached", "--name-only", cwd=workdir)).strip():
            message = f"{_one_line(title)}\n\n{summary}\n\nPodium task {task_id}"
            await self._git(
                "-c", f"user.name={_name(self.author)}", "-c", f"user.email={_email(self.author)}",
                *into, "commit", "--quiet", "--no-verify", "-m", message,
                cwd=workdir,
            )  # fmt: skip
        base = f"refs/remotes/origin/{repo.default_branch}"
        stat = await self._git(*into, "diff", "--shortstat", f"{base}...HEAD", cwd=workdir)
        done.facts.append(f"Diff: {stat.strip() or 'no changes'}")
        if not stat.strip():
            done.facts.append("Check: none (nothing changed)")
            return done
        outcome, tail = await self._check(repo, workdir)
        done.facts.append(f"Check: {outcome}")
        if tail:
            done.details = f"Output of `{repo.check}` (last lines):\n{self._redact(tail)}"
        try:
            # From the mirror, not the worktree, with its configuration and hooks reset
            # first: the agent's code (the check ran it) could have written to them.
            await asyncio.to_thread(_harden, mirror)
            await self._git(
                f"--git-dir={mirror}", "push", "--quiet", repo.url,
                f"refs/heads/{branch}:refs/heads/{branch}",
                cwd=mirror, repo=repo,
            )  # fmt: skip
        except GitError as err:
            done.facts.append(f"Push: failed: {_one_line(str(err))[:300]}")
            return done
        done.facts.append(f"Push: {branch} pushed")
        if repo.provider == "github":
            try:
                number, url = await self._pull_request(
                    repo, branch, title=title, body=summary, number=pull_request, http=http
                )
            except (aiohttp.ClientError, TimeoutError, GitHubError, KeyError, ValueError) as err:
                reason = self._redact(_one_line(str(err)))[:300]
                done.facts.append(f"Pull request: not opened: {reason}")
            else:
                done.pull_request, done.pull_request_url = number, url
                done.facts.append(f"Pull request: {url}")
        return done

    async def _check(self, repo: Repository, workdir: Path) -> tuple[str, str]:
        """Run the check in the worktree, without any credential in its environment."""
        if not repo.check:
            return "none", ""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "LC_ALL": "C.UTF-8",
            "CI": "true",
        }
        argv = ["/bin/sh", "-c", repo.check]
        if self.sandbox is not None:
            # The agent's code, run by the platform: in the sandbox too, with no network.
            argv = self.sandbox.command(
                argv, workdir=workdir, read_only=(self.mirror(repo.name),), network=False
            )
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            async with asyncio.timeout(repo.check_timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            return f"failed (stopped after {repo.check_timeout_s:.0f}s)", ""
        finally:
            await kill_group(proc)
        tail = out.decode(errors="replace")[-TAIL:].strip()
        if proc.returncode == 0:
            return "passed", tail
        return f"failed (exit status {proc.returncode})", tail

    async def _pull_request(
        self,
        repo: Repository,
        branch: str,
        *,
        title: str,
        body: str,
        number: int,
        http: aiohttp.ClientSession,
    ) -> tuple[int, str]:
        """Open the branch's pull request, or update the one it has: (number, URL)."""
        owner, _, name = repo.repo.partition("/")
        api = f"{repo.api_url.rstrip('/')}/repos/{owner}/{name}/pulls"
        headers = {
            "Authorization": f"Bearer {self.tokens[repo.name]}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "podium-worker",
        }
        text = f"{body}\n\n---\nOpened by Podium for task `{branch.split('/', 1)[1]}`."
        timeout = aiohttp.ClientTimeout(total=30)
        if not number:
            payload = {"title": _one_line(title)[:250], "head": branch, "base": repo.default_branch,
                       "body": text}  # fmt: skip
            async with http.post(api, json=payload, headers=headers, timeout=timeout) as resp:
                if resp.status == 201:
                    data = await resp.json()
                    return int(data["number"]), str(data["html_url"])
                why = (await resp.text())[:300]
                if resp.status != 422:
                    raise GitHubError(f"POST pulls: HTTP {resp.status}: {why}")
            # 422: one exists already for this head (an earlier attempt opened it)?
            query = {"head": f"{owner}:{branch}", "state": "open"}
            async with http.get(api, params=query, headers=headers, timeout=timeout) as resp:
                found = await resp.json() if resp.status == 200 else []
            if not found:
                raise GitHubError(f"POST pulls: HTTP 422: {why}")
            number = int(found[0]["number"])
        async with http.patch(
            f"{api}/{number}", json={"body": text}, headers=headers, timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise GitHubError(f"PATCH pulls/{number}: HTTP {resp.status}")
            data = await resp.json()
        if data.get("state") != "open":
            # Closed or merged meanwhile: this round's commits get a pull request of their own.
            return await self._pull_request(
                repo, branch, title=title, body=body, number=0, http=http
            )
        return int(data["number"]), str(data["html_url"])


class GitHubError(RuntimeError):
    """GitHub refused or failed a pull-request request."""


def _gitdir(mirror: Path, workdir: Path) -> Path | None:
    """The mirror's record of the worktree at ``workdir`` (``worktrees/<id>``), if any:
    found from the mirror's side, which the agent's ``.git`` file cannot redirect."""
    entries = mirror / "worktrees"
    if not entries.is_dir() or not workdir.is_dir():
        return None
    wanted = str(workdir / ".git")
    for entry in entries.iterdir():
        try:
            if (entry / "gitdir").read_text().strip() == wanted:
                return entry
        except OSError:
            continue
    return None


def _harden(mirror: Path) -> None:
    """Put back the mirror's configuration and hooks as the platform made them."""
    (mirror / "config").write_text(
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"
    )
    shutil.rmtree(mirror / "hooks", ignore_errors=True)
    (mirror / "hooks").mkdir()
    for extra in (mirror / "worktrees").glob("*/config.worktree"):
        extra.unlink()


def _stale_worktrees(mirror: Path, max_age_s: float) -> list[Path]:
    """Worktrees whose git state (index, HEAD) has not changed for ``max_age_s``."""
    now = time.time()
    found = []
    for entry in (mirror / "worktrees").iterdir():
        try:
            gitdir = Path((entry / "gitdir").read_text().strip())
            touched = max(
                (entry / name).stat().st_mtime
                for name in ("index", "HEAD")
                if (entry / name).exists()
            )
        except (OSError, ValueError):
            continue
        if now - touched > max_age_s:
            found.append(gitdir.parent)
    return found


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _name(author: str) -> str:
    return re.sub(r"\s*<.*>\s*$", "", author) or "Podium"


def _email(author: str) -> str:
    match = re.search(r"<([^>]+)>", author)
    return match.group(1) if match else "podium@localhost"
