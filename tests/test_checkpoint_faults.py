"""Checkpoints against malformed files, denied permissions, short disks and other writers."""

import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch

from onecard import checkpoint, hashing
from onecard.checkpoint import CheckpointError

Usage = namedtuple("Usage", "total used free")
not_as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes past chmod")


class NotAWeight:  # torch.load(weights_only=True) refuses to rebuild an arbitrary class
    pass


def save(run_dir, step, optimizer_state=None, model=None):
    torch.manual_seed(step)
    model = model or torch.nn.Linear(8, 4)
    optimizer_state = optimizer_state or {"state": {"exp_avg": torch.full((4,), float(step))}}
    return checkpoint.save(run_dir, step, model, optimizer_state, {"loader": {"step": step}}, {"note": "test"})


def find(run_dir):
    """find_latest's result and its warnings, each of which must be one line."""
    warnings = []
    found = checkpoint.find_latest(run_dir, warn=warnings.append)
    assert all("\n" not in w for w in warnings), warnings
    return found, warnings


def rewrite(path, name, data):
    """Replace a file and keep the manifest in step, as other code writing the directory would."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def deny(monkeypatch, method, inside):
    """Path.<method> raises PermissionError for paths under `inside` (chmod does not stop root)."""
    real = getattr(pathlib.Path, method)

    def denied(self, *args, **kwargs):
        if str(self).startswith(str(inside)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, method, denied)


# ---------------------------------------------------------------- 1. malformed inputs are damage

@pytest.mark.parametrize("damage", ["random", "nul", "directory", "unreadable"])
def test_a_malformed_latest_pointer_is_ignored_with_a_warning(tmp_path, monkeypatch, damage):
    save(tmp_path, 1)
    save(tmp_path, 2)
    latest = tmp_path / "latest"
    if damage == "random":
        latest.write_bytes(bytes(range(256)) * 3)
    elif damage == "nul":
        latest.write_bytes(b"checkpoints/step_000002\0\n")
    elif damage == "directory":
        latest.unlink()
        latest.mkdir()
    else:
        for method in ("open", "read_text", "read_bytes"):
            deny(monkeypatch, method, latest)
    found, warnings = find(tmp_path)
    assert found.step == 2
    assert len(warnings) == 1 and "latest" in warnings[0]
    monkeypatch.undo()
    if damage != "directory":  # repaired
        assert latest.read_text().strip() == "checkpoints/step_000002"


@pytest.mark.parametrize("gone", ["directory", "every step"])
def test_checkpoints_gone_from_a_run_are_not_a_new_run(tmp_path, gone):
    """A run whose `latest` names a checkpoint that is gone is not started over: that would
    overwrite its config and final weights. The user is told, and pointed at --force-new."""
    import shutil
    save(tmp_path, 1)
    save(tmp_path, 2)
    if gone == "directory":
        shutil.rmtree(tmp_path / "checkpoints")
    else:
        for step in (tmp_path / "checkpoints").iterdir():
            shutil.rmtree(step)
    with pytest.raises(CheckpointError, match="names step_000002, but .* holds no checkpoint: .*--force-new"):
        find(tmp_path)


@not_as_root
def test_a_latest_pointer_without_read_permission_is_ignored(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "latest").chmod(0)
    found, warnings = find(tmp_path)
    assert found.step == 1 and len(warnings) == 1


@pytest.mark.parametrize("manifest", [
    {"format": 1, "step": 2},  # no files
    [1, 2, 3],
    "files",
    {"files": ["model.safetensors"]},
    {"files": {"model.safetensors": "abc"}},
    {"files": {"model.safetensors": {"bytes": "12", "sha256": 5}}},
    {"files": {}},  # nothing to check is not a checkpoint
    "outside",  # the real manifest, plus a file outside the checkpoint
])
def test_a_malformed_manifest_falls_back(tmp_path, manifest):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    if manifest == "outside":
        manifest = json.loads((newest / "manifest.json").read_text())
        data = (tmp_path / "latest").read_bytes()
        manifest["files"]["../../latest"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    found, warnings = find(tmp_path)
    assert found.step == 1
    assert len(warnings) == 1 and "step_000002" in warnings[0] and "falling back" in warnings[0]
    assert (tmp_path / "checkpoints" / "step_000002.damaged").is_dir()


@pytest.mark.parametrize("damage", ["unsafe optimizer", "garbage optimizer", "garbage rng", "garbage model"])
def test_a_checksummed_file_that_does_not_load_falls_back(tmp_path, damage):
    save(tmp_path, 1)
    if damage == "unsafe optimizer":  # the manifest matches: only loading tells
        newest = save(tmp_path, 2, optimizer_state={"state": NotAWeight()})
    else:
        newest = save(tmp_path, 2)
        name = {"garbage optimizer": "optimizer.pt", "garbage rng": "rng.safetensors",
                "garbage model": "model.safetensors"}[damage]
        rewrite(newest, name, b"not a tensor file\n" * 10)
    found, warnings = find(tmp_path)
    assert found.step == 1
    assert len(warnings) == 1 and "step_000002" in warnings[0] and "falling back" in warnings[0]
    checkpoint.read_optimizer(found)  # the resumed run reads what it was given
    checkpoint.read_rng(found)


def test_a_state_that_is_not_an_object_falls_back(tmp_path):
    save(tmp_path, 1)
    rewrite(save(tmp_path, 2), "state.json", b"[1, 2]\n")
    found, warnings = find(tmp_path)
    assert found.step == 1 and len(warnings) == 1


# ---------------------------------------------------------------- 2. permission denied is not damage

@pytest.mark.parametrize("how", ["manifest", "data file"])
def test_an_unreadable_checkpoint_is_reported_and_left_alone(tmp_path, monkeypatch, how):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    if how == "manifest":
        deny(monkeypatch, "read_text", newest)
    else:
        real_open = open

        def denied(path, *args, **kwargs):
            if str(path).endswith("optimizer.pt") and "step_000002" in str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)
        for module in (checkpoint, hashing):  # hashing reads the file for its checksum
            monkeypatch.setattr(module, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match="permission denied.*step_000002") as error:
        checkpoint.find_latest(tmp_path, warn=lambda _: None)
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    assert newest.is_dir() and not (tmp_path / "checkpoints" / "step_000002.damaged").exists()
    assert checkpoint.find_latest(tmp_path).step == 2


@not_as_root
def test_a_checkpoint_without_read_permission_is_left_alone(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (newest / "manifest.json").chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        checkpoint.find_latest(tmp_path, warn=lambda _: None)
    assert newest.is_dir()


# ---------------------------------------------------------------- 3. disk space

def test_the_space_margin_scales_with_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: Usage(10**12, 0, 32 << 20))
    save(tmp_path, 1)  # a small checkpoint fits in 32 MiB
    big = {"state": {"exp_avg": torch.zeros(1).expand(1 << 28)}}  # counts as 1 GiB, allocates nothing
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: Usage(10**12, 0, (1 << 30) + (32 << 20)))
    with pytest.raises(CheckpointError, match=r"not enough disk space.*needs.*1\.0\d GiB.*1\.03 GiB free") as error:
        save(tmp_path, 2, optimizer_state=big)
    assert error.value.no_space and "\n" not in str(error.value)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [1]


def test_running_out_of_space_while_writing_says_so(tmp_path, monkeypatch):
    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left.*needs.*free") as error:
        save(tmp_path, 1)
    assert error.value.no_space


def test_other_errors_are_not_about_space():
    assert CheckpointError("x").no_space is False


# ---------------------------------------------------------------- 4. another writer's temporaries

def test_only_temporaries_of_finished_writers_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        names = {"alive": f".tmp-{alive.pid}-step_000005", "gone": f".tmp-{gone.pid}-step_000005",
                 "mine": f".tmp-{os.getpid()}-step_000004",  # an earlier process of the same pid
                 "unknown new": ".tmp-step_000003-x", "unknown old": ".tmp-step_000002-y"}
        for name in names.values():
            (root / name).mkdir()
            (root / name / "model.safetensors").write_bytes(b"x")
        day_ago = time.time() - 24 * 3600
        os.utime(root / names["unknown old"] / "model.safetensors", (day_ago, day_ago))
        os.utime(root / names["unknown old"], (day_ago, day_ago))
        save(tmp_path, 1)
        left = {p.name for p in root.glob(".tmp-*")}
        assert left == {names["alive"], names["unknown new"]}
    finally:
        alive.kill()
        alive.wait()


def test_a_save_names_its_temporary_with_its_pid(tmp_path, monkeypatch):
    seen = []
    real = checkpoint.torch.save
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, path: (seen.append(path.parent.name), real(obj, path)))
    save(tmp_path, 1)
    assert seen == [f".tmp-{os.getpid()}-step_000001"]


# ---------------------------------------------------------------- 5. read-only run directories

@pytest.mark.parametrize("existing", [False, True])
def test_saving_into_a_read_only_directory_says_so(tmp_path, monkeypatch, existing):
    if existing:
        save(tmp_path, 1)
    deny(monkeypatch, "mkdir", tmp_path)
    with pytest.raises(CheckpointError, match=f"cannot write.*permission denied.*{tmp_path}") as error:
        save(tmp_path, 2)
    assert "\n" not in str(error.value) and not error.value.no_space


@not_as_root
def test_saving_into_a_chmod_read_only_directory_says_so(tmp_path):
    (tmp_path / "run").mkdir(mode=0o555)
    with pytest.raises(CheckpointError, match="cannot write.*permission denied"):
        save(tmp_path / "run", 1)


def test_reading_a_read_only_directory_with_a_damaged_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (newest / "optimizer.pt").write_bytes(b"bit rot")
    for method in ("rename", "replace", "mkdir", "touch", "write_bytes", "write_text", "unlink"):
        deny(monkeypatch, method, tmp_path)
    monkeypatch.setattr(checkpoint.durable, "write_bytes", lambda path, data: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(path))))
    found, warnings = find(tmp_path)
    assert found.step == 1
    assert any("step_000002" in w and "falling back" in w for w in warnings)
    assert newest.is_dir()  # could not be set aside: left where it was
    checkpoint.read_optimizer(found)


def test_a_latest_pointer_that_cannot_be_updated_does_not_fail_a_complete_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save(tmp_path, step)
    deny(monkeypatch, "replace", tmp_path / ".latest.tmp")  # the pointer's rename fails; the checkpoint's does not
    warnings = []
    newest = checkpoint.save(tmp_path, 4, torch.nn.Linear(8, 4), {"state": {}}, {"loader": {}}, {"note": "test"},
                             keep=3, warn=warnings.append)
    assert newest.name == "step_000004" and checkpoint.verify(newest)
    assert len(warnings) == 1 and "step_000004 is complete" in warnings[0] and "\n" not in warnings[0]
    assert [p.name for _, p in checkpoint.step_dirs(tmp_path)] == ["step_000002", "step_000003", "step_000004"]
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000003"
    assert find(tmp_path)[0].step == 4


def test_a_full_disk_as_safetensors_and_torch_report_it_says_so(tmp_path, monkeypatch):
    """The libraries do not raise OSError for a full disk: safetensors raises its own error naming
    os error 28, torch.save a RuntimeError about the file position. Both are the documented warning."""
    from safetensors import SafetensorError

    from onecard import durable

    def safetensors_full(tensors, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(durable, "save_tensors", safetensors_full)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="No space left") as error:
        save(tmp_path / "a", 1)
    assert error.value.no_space
    monkeypatch.undo()

    def torch_full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3145728 vs 3145664")
    monkeypatch.setattr(checkpoint.torch, "save", torch_full)
    real_usage = checkpoint.shutil.disk_usage
    calls = []

    def filling_up(path):  # room at the check before writing, none once the write failed
        calls.append(path)
        usage = real_usage(path)
        return usage._replace(free=usage.free if len(calls) == 1 else 0)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", filling_up)
    with pytest.raises(CheckpointError, match="No space left") as error:
        save(tmp_path / "b", 1)
    assert error.value.no_space and not list((tmp_path / "b" / "checkpoints").glob(".tmp-*"))
