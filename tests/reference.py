"""nanochat's own code, for parity tests: found through ONECARD_NANOCHAT_REFERENCE (default
../shared/reference beside the checkout); tests skip, saying why, where it is absent (a user's
clone does not have it). Nothing here is copied into onecard."""

import importlib
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("ONECARD_NANOCHAT_REFERENCE",
                           Path(__file__).resolve().parents[2] / "shared" / "reference"))


def _stand_in(attr: str) -> type:
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})


def _stub_missing(names: list[str]) -> None:
    """Modules nanochat imports at the top for code paths the parity tests never run (the
    HuggingFace `tokenizers` trainer): empty stand-ins, only where the real one is absent."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__getattr__ = _stand_in  # any name it asks for
            sys.modules[name] = module


def nanochat(commit: str, module: str):
    """Import nanochat.<module> from the reference copy at `commit`, or skip the test."""
    folder = ROOT / f"nanochat-{commit}"
    if not (folder / "nanochat" / f"{module}.py").exists():
        pytest.skip(f"nanochat {commit} reference code not found at {folder} (set ONECARD_NANOCHAT_REFERENCE)")
    for name in [n for n in sys.modules if n == "nanochat" or n.startswith("nanochat.")]:
        del sys.modules[name]  # another commit's copy may be loaded
    _stub_missing(["tokenizers", "tokenizers.models", "tokenizers.trainers"])
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(f"nanochat.{module}")
    finally:
        sys.path.remove(str(folder))
