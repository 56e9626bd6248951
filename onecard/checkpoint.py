"""Crash-safe checkpoints: atomic save, verified load, fallback, retention.

A run directory holds

  checkpoints/step_000100/    one complete checkpoint per kept step
      model.safetensors       the weights in their real dtypes (bf16 stays bf16)
      optimizer.pt            Optimizers.state_dict() in the recipe's state format
                              (plain tensors, numbers and strings: read with weights_only=True)
      rng.safetensors         torch's CPU and CUDA generator states
      state.json              step, schedules, data-loader position, Python and NumPy RNG
                              states, the meters' totals
      config.json             the run's description (model, recipe, settings, corpus)
      manifest.json           size and sha256 of every file above, written last
  latest                      the name of the newest complete checkpoint

A checkpoint is written into checkpoints/.tmp-step_…, every file fsynced, and renamed into
place only when complete, so a crash, a full disk or a second Ctrl-C at any moment leaves the
previous checkpoints as they were. `latest` is replaced the same way (write, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 1
STEP_DIR = re.compile(r"step_(\d+)$")
HEADROOM = 1.05  # free space wanted: the checkpoint's size times this, plus SLACK bytes
SLACK = 64 << 20


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says why and what was kept."""


@dataclass
class Found:
    """A verified checkpoint, ready to load."""

    path: Path
    step: int
    state: dict  # state.json
    config: dict  # config.json


# ---------------------------------------------------------------- random number generators

def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python and NumPy states, torch generator states as tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories (renamed into place), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def _remove_stale_temporaries(root: Path) -> None:
    """Left by a crash or a second Ctrl-C in the middle of a save."""
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer_state: object, state: dict,
         config: dict, keep: int = 3) -> Path:
    """Write a checkpoint of `step` atomically and keep the newest `keep`; returns its directory.

    Raises CheckpointError (the previous checkpoints untouched) when the disk lacks the room or a
    write fails.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    plain_rng, torch_rng = rng_state()
    needed = int((tensor_bytes(weights) + tensor_bytes(optimizer_state)) * HEADROOM) + SLACK
    free = shutil.disk_usage(root).free
    if free < needed:
        # The oldest ones this save would prune anyway may go first (never the newest).
        existing = step_dirs(run_dir)
        for _, old in existing[:max(0, min(len(existing) - 1, len(existing) - keep + 1))]:
            shutil.rmtree(old, ignore_errors=True)
        free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(f"not enough disk space for the checkpoint of step {step}: it needs about "
                              f"{needed / 2**30:.2f} GiB, {root} has {free / 2**30:.2f} GiB free")

    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        save_file(torch_rng, str(tmp / "rng.safetensors"))
        for path in (tmp / "model.safetensors", tmp / "optimizer.pt", tmp / "rng.safetensors"):
            _fsync_file(path)
        _write_bytes(tmp / "state.json", (json.dumps({**state, "step": step, "rng": plain_rng}) + "\n").encode())
        _write_bytes(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "files": files}
        _write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # a run that fell back from a bad checkpoint comes by the same step again
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing the checkpoint of step {step} failed ({error})") from error
    except BaseException:  # a second Ctrl-C: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _point_latest(Path(run_dir), name)
    for _, old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _point_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".{LATEST}.tmp"
    try:
        _write_bytes(tmp, f"{CHECKPOINTS}/{name}\n".encode())
        tmp.replace(run_dir / LATEST)
        _fsync_dir(run_dir)
    except OSError as error:  # the checkpoint itself is complete; find_latest does not need `latest`
        raise CheckpointError(f"the checkpoint {name} is complete but {run_dir / LATEST} could not be "
                              f"updated ({error})") from error


# ---------------------------------------------------------------- reading

def verify(path: Path) -> dict:
    """The manifest, once every file's size and checksum match it; CheckpointError otherwise."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path} is missing or unreadable ({error})") from error
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} has {size:,} bytes, the manifest says {expected['bytes']:,} (truncated?)")
        if sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its checksum")
    return manifest


def has_checkpoint(run_dir: Path) -> bool:
    return bool(step_dirs(run_dir))


def find_latest(run_dir: Path, warn: Callable[[str], None] = print) -> Found | None:
    """The newest checkpoint that verifies, falling back past damaged ones (which are renamed
    to step_….damaged and kept for inspection). None when the run has no checkpoint."""
    candidates = step_dirs(run_dir)
    latest = Path(run_dir) / LATEST
    if latest.exists():  # normally the newest; if a crash came before `latest` moved, a newer one wins
        named = (Path(run_dir) / latest.read_text().strip()).resolve()
        if named not in [p.resolve() for _, p in candidates]:
            warn(f"warning: {latest} names {named.name}, which does not exist")
    for step, path in reversed(candidates):
        try:
            verify(path)
            state = json.loads((path / "state.json").read_text())
            config = json.loads((path / "config.json").read_text())
        except (CheckpointError, OSError, ValueError) as error:
            damaged = path.with_name(f"{path.name}.damaged")
            shutil.rmtree(damaged, ignore_errors=True)
            path.rename(damaged)
            warn(f"warning: checkpoint {path.name} is damaged ({error}); kept as {damaged.name}, "
                 "falling back to the one before")
            continue
        if latest.exists() and latest.read_text().strip() != f"{CHECKPOINTS}/{path.name}":
            _point_latest(Path(run_dir), path.name)
        return Found(path, step, state, config)
    if candidates:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / CHECKPOINTS} is intact: start again with "
                              "--force-new")
    return None


def load_weights(found: Found, model: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into `model` (into the dtypes it holds: exact when they match)."""
    model.load_state_dict(load_file(str(found.path / "model.safetensors"), device="cpu"))


def read_optimizer(found: Found) -> object:
    """The state to hand to Optimizers.load_state_dict (on the CPU; loading copies it into place)."""
    return torch.load(found.path / "optimizer.pt", map_location="cpu", weights_only=True)


def read_rng(found: Found) -> tuple[dict, dict[str, torch.Tensor]]:
    """The RNG states for set_rng_state."""
    return found.state["rng"], load_file(str(found.path / "rng.safetensors"))
