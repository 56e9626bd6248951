"""The README's import rules cover every module: `lint-imports` checks only the modules its
contracts name, so a module left out of them could import a stage unnoticed."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_is_a_stage_or_below_the_stages():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    stages = {name.strip() for contract in contracts if contract["type"] == "layers"
              for layer in contract["layers"] for name in layer.split("|")}
    below = {name for contract in contracts if contract["name"].startswith("Nothing below")
             for name in contract["source_modules"]}
    modules = {f"onecard.{path.stem}" for path in (ROOT / "onecard").glob("*.py") if not path.stem.startswith("__")}
    modules |= {"onecard.plan"}
    assert sorted(modules - stages - below) == []
