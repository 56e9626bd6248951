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

A checkpoint is written into checkpoints/.tmp-<pid>-step_…, every file fsynced, and renamed into
place only when complete, so a crash, a full disk or a second Ctrl-C at any moment leaves the
previous checkpoints as they were. `latest` is replaced the same way (write, fsync, rename).

Reading treats anything malformed (a garbled `latest`, a manifest of the wrong shape, a file that
fails its checksum or does not load) as damage: a one-line warning and the checkpoint before. A
file that cannot be read for want of permission is not damage: an error, and nothing is renamed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from onecard import durable
from onecard.errors import one_line
from onecard.hashing import sha256
from onecard.rng import rng_state
from onecard.units import quantity

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 1
STEP_DIR = re.compile(r"step_(\d+)$")
POINTER = re.compile(rf"{CHECKPOINTS}/step_\d+")  # what `latest` holds
TEMPORARY = re.compile(r"\.tmp-(\d+)-")  # .tmp-<pid of the writer>-step_…
REQUIRED = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "config.json")
SLACK = 4 << 20  # free space wanted: the checkpoint's bytes, 5 % more, and this for file-system overhead
STALE_AFTER = 6 * 3600  # a temporary untouched this long is left over, whoever wrote it
DENIED = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system"}


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says why and what was kept.
    no_space: the disk lacked the room (the caller may free some and try again)."""

    def __init__(self, message: str, *, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class Found:
    """A verified checkpoint, ready to load."""

    path: Path
    step: int
    state: dict  # state.json
    config: dict  # config.json


# ---------------------------------------------------------------- writing

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
    try:
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    except PermissionError as error:
        raise CheckpointError(f"cannot read {root}: permission denied ({error.filename or root})") from error
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _stale(tmp: Path) -> bool:
    """Whether a temporary is left over rather than being written right now by another process."""
    m = TEMPORARY.match(tmp.name)
    pid = int(m.group(1)) if m else 0
    # Our own pid: this process saves one checkpoint at a time, so it is an earlier process's
    # (pids recur, in containers especially).
    if pid == os.getpid() or (pid > 0 and not _alive(pid)):
        return True
    try:  # no pid (an older name) or a live one that may be a stranger: judge by the last write
        newest = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
    except OSError:
        return False
    return time.time() - newest > STALE_AFTER


def _remove_stale_temporaries(root: Path) -> None:
    """Left by a crash or a second Ctrl-C in the middle of a save; not another live writer's."""
    for p in root.glob(".tmp-*"):
        if _stale(p):
            shutil.rmtree(p, ignore_errors=True)


def _make_room(run_dir: Path, step: int, needed: int, keep: int, warn: Callable[[str], None] = print) -> None:
    root = run_dir / CHECKPOINTS
    free = shutil.disk_usage(root).free
    if free < needed:
        # The oldest ones this save would prune anyway may go first (never the newest).
        existing = step_dirs(run_dir)
        for _, old in existing[:max(0, min(len(existing) - 1, len(existing) - keep + 1))]:
            shutil.rmtree(old, ignore_errors=True)
        free = shutil.disk_usage(root).free
    damaged = sorted(root.glob("step_*.damaged")) if free < needed else []
    if damaged:  # kept for inspection, of no use to the run: the run's next save comes first
        for path in damaged:
            shutil.rmtree(path, ignore_errors=True)
        warn(f"warning: removed {quantity(len(damaged), 'damaged checkpoint')} ({', '.join(p.name for p in damaged)}) "
             f"to make room for the checkpoint of step {step}")
        free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(f"not enough disk space for the checkpoint of step {step}: it needs about "
                              f"{_size(needed)}, {root} has {_size(free)} free", no_space=True)


def as_os_error(error: Exception, folder: Path, needed: int) -> OSError:
    """A write error that safetensors (SafetensorError) or torch.save (RuntimeError) raised, as the
    OSError it stands for: the disk full, the quota reached or the folder not writable where it says so, or
    the disk full where the space is gone."""
    text = str(error)
    for code in (errno.ENOSPC, errno.EDQUOT, *DENIED):
        if f"os error {code})" in text or os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    try:
        if shutil.disk_usage(folder).free < needed:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    return OSError(errno.EIO, one_line(error))


def _write_failed(step: int, error: OSError, root: Path, needed: int) -> CheckpointError:
    """One line for a failed write: the disk full, the permission missing, or else the system's words."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = _size(shutil.disk_usage(root).free)
        except OSError:
            free = "unknown"
        return CheckpointError(f"not enough disk space for the checkpoint of step {step} ({error.strerror}): it "
                               f"needs about {_size(needed)}, {root} has {free} free", no_space=True)
    if error.errno in DENIED:
        return CheckpointError(f"cannot write the checkpoint of step {step}: {DENIED[error.errno]} "
                               f"({error.filename or root})")
    return CheckpointError(f"writing the checkpoint of step {step} failed ({one_line(error)})")


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer_state: object, state: dict,
         config: dict, keep: int = 3, warn: Callable[[str], None] = print) -> Path:
    """Write a checkpoint of `step` atomically and keep the newest `keep`; returns its directory.

    Raises CheckpointError (the previous checkpoints untouched) when the disk lacks the room or a
    write fails. A `latest` that cannot be updated only warns: the checkpoint is complete, and
    find_latest finds the newest checkpoint without it.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    plain_rng, torch_rng = rng_state()
    texts = {"state.json": (json.dumps({**state, "step": step, "rng": plain_rng}) + "\n").encode(),
             "config.json": (json.dumps(config, indent=2) + "\n").encode()}
    size = (tensor_bytes(weights) + tensor_bytes(optimizer_state) + tensor_bytes(torch_rng)
            + sum(map(len, texts.values())))
    needed = size + size // 20 + SLACK  # pickle and safetensors headers, the manifest, block rounding
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{os.getpid()}-{name}"  # the pid tells other processes whether it is still written
    try:
        root.mkdir(exist_ok=True)  # not the run directory: gone, it stays gone
        _remove_stale_temporaries(root)
        _make_room(run_dir, step, needed, keep, warn)
        tmp.mkdir()
        durable.save_tensors(weights, tmp / "model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        durable.save_tensors(torch_rng, tmp / "rng.safetensors")
        for path in (tmp / "model.safetensors", tmp / "optimizer.pt", tmp / "rng.safetensors"):
            durable.fsync_file(path)
        for file_name, data in texts.items():
            durable.write_bytes(tmp / file_name, data)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "files": files}
        durable.write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        durable.fsync_dir(tmp)
        final = root / name
        if final.exists():  # a run that fell back from a bad checkpoint comes by the same step again
            shutil.rmtree(final)
        tmp.rename(final)
        durable.fsync_dir(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(step, error, root, needed) from error
    except (SafetensorError, RuntimeError) as error:  # safetensors and torch.save report a failed write so
        failed = as_os_error(error, root, needed)  # before the temporary goes: its bytes count as used
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(step, failed, root, needed) from error
    except BaseException:  # a second Ctrl-C: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    try:
        _point_latest(run_dir, name)
    except CheckpointError as error:
        warn(f"warning: {error}; resuming finds the checkpoint without it")
    for _, old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _point_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".{LATEST}.tmp"
    try:
        durable.write_bytes(tmp, f"{CHECKPOINTS}/{name}\n".encode())
        tmp.replace(run_dir / LATEST)
        durable.fsync_dir(run_dir)
    except OSError as error:  # the checkpoint itself is complete; find_latest does not need `latest`
        raise CheckpointError(f"the checkpoint {name} is complete but {run_dir / LATEST} could not be "
                              f"updated ({one_line(error)})") from error


# ---------------------------------------------------------------- reading

def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except PermissionError:  # not damage: the caller reports it
        raise
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{file} is missing or unreadable ({one_line(error)})") from error


def _manifest_problem(files: object) -> str | None:
    """What is wrong with a manifest's `files`, if anything."""
    if not isinstance(files, dict):
        return "no 'files' object"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"it lists no {', '.join(missing)}"
    for name, entry in files.items():
        if "/" in name or "\0" in name or name in ("", ".", ".."):
            return f"it names {name!r}, not a file of the checkpoint"
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            return f"its entry for {name} is not {{bytes, sha256}}"
    return None


def verify(path: Path) -> dict:
    """The manifest, once every file's size and checksum match it; CheckpointError otherwise.

    PermissionError passes through as it is: an unreadable checkpoint is not a damaged one."""
    path = Path(path)
    manifest = _read_json(path / MANIFEST)
    problem = _manifest_problem(manifest.get("files") if isinstance(manifest, dict) else None)
    if problem:
        raise CheckpointError(f"{path / MANIFEST} is malformed ({problem})")
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


def _check_loadable(path: Path) -> None:
    """The checksums prove the bytes are the ones written, not that they load: an optimizer state
    holding an object that weights_only refuses would otherwise fail after resuming had begun."""
    try:
        _load_optimizer(path / "optimizer.pt")  # mapped: only the structure is read, the data stays on disk
        load_file(str(path / "rng.safetensors"))
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            f.keys()  # the header: the data itself is checksummed
    except (PermissionError, MemoryError):  # not the file's fault
        raise
    except Exception as error:
        raise CheckpointError(f"it does not load ({type(error).__name__}: {one_line(error)})") from error


def _read(path: Path, step: int) -> Found:
    verify(path)
    state, config = _read_json(path / "state.json"), _read_json(path / "config.json")
    if not (isinstance(state, dict) and isinstance(state.get("rng"), dict) and isinstance(config, dict)):
        raise CheckpointError("its state.json or config.json is not the object a checkpoint holds")
    _check_loadable(path)
    return Found(path, step, state, config)


def _read_latest(run_dir: Path, warn: Callable[[str], None]) -> str | None:
    """What `latest` names; None (with a warning if it is malformed) when it names nothing."""
    latest = run_dir / LATEST
    if not (latest.exists() or latest.is_symlink()):
        return None
    try:
        with latest.open("rb") as f:
            text = f.read(4096).decode().strip()
    except (OSError, ValueError) as error:
        warn(f"warning: {latest} cannot be read ({one_line(error)}); ignoring it")
        return None
    if not POINTER.fullmatch(text):
        warn(f"warning: {latest} is malformed (it holds {one_line(repr(text[:80]))}); ignoring it")
        return None
    return text


def _set_aside(path: Path, error: Exception, warn: Callable[[str], None]) -> None:
    damaged = path.with_name(f"{path.name}.damaged")
    try:
        shutil.rmtree(damaged, ignore_errors=True)
        path.rename(damaged)
        kept = f"kept as {damaged.name}"
    except OSError as failed:  # a read-only run directory: leave it; the next reader skips it again
        kept = f"left in place ({one_line(failed.strerror or failed)})"
    warn(f"warning: checkpoint {path.name} is damaged ({one_line(error)}); {kept}, falling back to the one before")


def has_checkpoint(run_dir: Path) -> bool:
    return bool(step_dirs(run_dir))


def find_latest(run_dir: Path, warn: Callable[[str], None] = print) -> Found | None:
    """The newest checkpoint that verifies and loads, falling back past damaged ones (renamed to
    step_….damaged and kept for inspection until a save is short of disk). None when the run has no
    checkpoint. CheckpointError when none is intact, or one cannot be read for want of permission."""
    run_dir = Path(run_dir)
    candidates = step_dirs(run_dir)
    pointer = _read_latest(run_dir, warn)
    # normally the newest; if a crash came before `latest` moved, a newer one wins
    if pointer and candidates and pointer not in {f"{CHECKPOINTS}/{p.name}" for _, p in candidates}:
        warn(f"warning: {run_dir / LATEST} names {Path(pointer).name}, which does not exist")
    for step, path in reversed(candidates):
        try:
            found = _read(path, step)
        except PermissionError as error:  # not damage: renaming it would hide a fixable problem
            raise CheckpointError(f"cannot read the checkpoint {path}: permission denied "
                                  f"({error.filename or path}); it was left as it is") from error
        except (CheckpointError, OSError, ValueError) as error:
            _set_aside(path, error, warn)
            continue
        if (run_dir / LATEST).is_file() and pointer != f"{CHECKPOINTS}/{path.name}":
            try:
                _point_latest(run_dir, path.name)
            except CheckpointError as error:  # a read-only run directory: the checkpoint itself is fine
                warn(f"warning: {run_dir / LATEST} could not be pointed at {path.name} "
                     f"({one_line(error.__cause__ or error)})")
        return found
    if candidates:
        raise CheckpointError(f"no checkpoint in {run_dir / CHECKPOINTS} is intact: start again with "
                              "--force-new")
    if pointer:  # the run had checkpoints and they are gone: starting over would overwrite its files
        raise CheckpointError(f"{run_dir / LATEST} names {Path(pointer).name}, but {run_dir / CHECKPOINTS} holds no "
                              "checkpoint: start again with --force-new (the earlier run's files are set aside)")
    return None


def load_weights(found: Found, model: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into `model` (into the dtypes it holds: exact when they match)."""
    model.load_state_dict(load_file(str(found.path / "model.safetensors"), device="cpu"))


def read_optimizer(found: Found) -> object:
    """The state to hand to Optimizers.load_state_dict (on the CPU; loading copies it into place).
    Memory-mapped where the file system allows: the states are read as they are copied into place,
    never all at once in RAM, and a rank reads only the states of the parameters it updates."""
    return _load_optimizer(found.path / "optimizer.pt")


def _load_optimizer(file: Path) -> object:
    """optimizer.pt memory-mapped where the file system allows (a tensor's data is read when used),
    else read whole; only tensors, numbers and strings (weights_only)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not every file or file system maps: the plain load decides
        return torch.load(file, map_location="cpu", weights_only=True)


def read_rng(found: Found) -> tuple[dict, dict[str, torch.Tensor]]:
    """The RNG states for rng.set_rng_state."""
    return found.state["rng"], load_file(str(found.path / "rng.safetensors"))
