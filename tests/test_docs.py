"""Generated documentation stays in step with the code."""

from __future__ import annotations

from podium.docgen.docs import write_config_docs
from tests.conftest import ROOT


def test_configuration_reference_is_current() -> None:
    assert write_config_docs(ROOT / "docs" / "configuration.md", check=True) == 0, (
        "docs/configuration.md is out of date: run `make docs`"
    )
