"""``podium generate``: every file derived from the code, written (or checked) in one go.

Each artifact is rendered from the one place that defines it, so the
documentation, the NATS permissions and the monitoring files cannot drift from
the services; ``tests/test_generated.py`` runs ``--check``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from podium.contracts import access


def artifacts() -> dict[str, Callable[[], str]]:
    """Relative path → renderer, for every generated file."""
    from podium.docgen import asyncapi, busdoc, docs, metricsdoc, monitoring  # noqa: PLC0415

    return {
        "docs/configuration.md": docs.render,
        "docs/metrics.md": metricsdoc.render,
        "docs/asyncapi.yaml": asyncapi.render,
        "docs/bus.md": busdoc.render,
        "docs/openapi.json": _openapi,
        # The same accounts file for docker-compose and for the kustomize base
        # (kustomize reads files only below its own folder).
        "deploy/nats/accounts.conf": access.render_accounts,
        "deploy/k8s/base/nats/accounts.conf": access.render_accounts,
        "deploy/prometheus/alerts.yml": monitoring.render_rules,
        "deploy/k8s/base/monitoring/prometheusrule.yaml": monitoring.render_prometheus_rule,
        "deploy/grafana/dashboards/podium.json": monitoring.render_dashboard,
        "deploy/k8s/base/monitoring/podium-dashboard.json": monitoring.render_dashboard,
    }


def _openapi() -> str:
    """The OpenAPI document both HTTP APIs serve at ``/openapi.json``."""
    from podium.contracts.http import document  # noqa: PLC0415

    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def generate(root: Path, *, check: bool) -> int:
    """Write every artifact under ``root``; with ``check``, report stale ones instead."""
    stale = []
    for relative, render in artifacts().items():
        path = root / relative
        text = render()
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(relative)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {relative}")  # noqa: T201
    if stale:
        print(  # noqa: T201
            "out of date (run `podium generate`): " + ", ".join(stale), file=sys.stderr
        )
        return 1
    return 0


def main() -> None:
    """``podium-generate [--check] [root]``: the same as ``podium generate``."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="podium-generate", description=__doc__)
    parser.add_argument("root", nargs="?", default=".", help="the repository's root")
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    sys.exit(generate(Path(args.root), check=args.check))
