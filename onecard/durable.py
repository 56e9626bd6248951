"""Writes that survive a power cut: data reaches the disk (fsync) before a rename makes it the
file, and the rename itself reaches the disk (fsync of the folder). Without the first, a cut
shortly after a rename can leave the new name on an empty file. Also safetensors files with the
mode every other file gets."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # run.py imports this module, and `onecard --help` imports no PyTorch
    import torch


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace(tmp: Path, path: Path) -> None:
    """Make the written, not yet synced file `tmp` the file `path`, durably."""
    fsync_file(tmp)
    tmp.replace(path)
    fsync_dir(path.parent)


def write_via_temporary(path: Path, write: Callable[[Path], object]) -> Path:
    """write(PATH.tmp), then make it `path` durably: a failed or interrupted write leaves neither a half
    file under the name nor the temporary."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, then the mode the umask gives new files: safetensors writes 0600,
    which leaves a shared model folder's weights unreadable to everyone else."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
