"""The calibration `onecard bench` stores and `onecard plan` reads: one record per card in
$ONECARD_HOME/calibration.json (default ~/.cache/onecard/calibration.json). Reading and writing
only; the measuring is onecard/bench.py's."""

from __future__ import annotations

import json
import os
from pathlib import Path

from onecard.errors import UsageError


def home() -> Path:
    return Path(os.environ.get("ONECARD_HOME") or Path.home() / ".cache" / "onecard")


def calibration_path() -> Path:
    return home() / "calibration.json"


def check_writable() -> None:
    """Say before a measurement, not after it, that its result could not be stored (ONECARD_HOME a file,
    a folder this user cannot write): bench on a card takes minutes."""
    folder = home()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot store a calibration in {folder}: {e.strerror or e}; set ONECARD_HOME to a "
                         "folder you can write, or measure only with --no-save") from None


def load_all() -> dict:
    path = calibration_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged file is as good as none: bench writes a fresh one
    return data if isinstance(data, dict) else {}


def load(key: str) -> dict | None:
    record = load_all().get(key)
    return record if isinstance(record, dict) else None


def save(key: str, record: dict) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load_all() | {key: record}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path
