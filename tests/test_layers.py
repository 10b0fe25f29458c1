"""The tree's layers: each package imports only what its pyproject.toml declares.

contracts ← common (service runtime) ← agents ← conductor, worker; ingress,
notifier and console use contracts and common only; the ``podium`` command (cli) no service.
A package that starts importing another without declaring it fails here, before
it fails in an image built from its declared dependencies only.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level ``podium.<name>`` module → the workspace distribution that provides it.
DISTRIBUTIONS = {
    "contracts": "podium-contracts",
    "common": "podium-common",
    "agents": "podium-agents",
    "cli": "podium-cli",
    "testing": "podium-testing",
    "docgen": "podium-docgen",
    "ingress": "podium-ingress",
    "conductor": "podium-conductor",
    "worker": "podium-worker",
    "notifier": "podium-notifier",
    "console": "podium-console",
}
#: Imports made only inside ``try … except ModuleNotFoundError`` that say what is missing:
#: the CLI's development verbs (``podium generate``) need podium-docgen, not declared.
OPTIONAL = {("podium-cli", "podium-docgen")}
MEMBERS = sorted(
    p.parent for p in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]
)


def _imports(member: Path) -> dict[str, list[str]]:
    """The podium packages a member's code imports, with the files that do."""
    found: dict[str, list[str]] = {}
    for path in (member / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "podium":
                    names = [f"podium.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "podium":
                    found.setdefault(parts[1], []).append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("member", MEMBERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_is_a_declared_dependency(member: Path) -> None:
    project = tomllib.loads((member / "pyproject.toml").read_text())["project"]
    declared = {
        d.split(">")[0].split("=")[0].split(";")[0].strip() for d in project["dependencies"]
    }
    own = project["name"]
    for package, files in _imports(member).items():
        distribution = DISTRIBUTIONS[package]
        if distribution == own or (own, distribution) in OPTIONAL:
            continue
        assert distribution in declared, f"{own} imports podium.{package} ({files[0]}) undeclared"


def test_the_layers_point_one_way() -> None:
    below = {
        "podium-contracts": set(),
        "podium-common": {"podium-contracts"},
        "podium-agents": {"podium-contracts", "podium-common"},
    }
    for member in MEMBERS:
        project = tomllib.loads((member / "pyproject.toml").read_text())["project"]
        if project["name"] not in below:
            continue
        used = {DISTRIBUTIONS[p] for p in _imports(member)} - {project["name"]}
        assert used <= below[project["name"]], (project["name"], used)
    # Only the services that run agents depend on them.
    users = {
        tomllib.loads((m / "pyproject.toml").read_text())["project"]["name"]
        for m in MEMBERS
        if "agents" in _imports(m)
    }
    assert users <= {"podium-conductor", "podium-worker", "podium-testing", "podium-agents"}, users
