"""Checkpoints on their own: atomic writes, manifests, retention, fallback, full and failing disks."""

import random
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from onecard import checkpoint, rng
from onecard.checkpoint import CheckpointError

Usage = namedtuple("Usage", "total used free")


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model[1].to(torch.bfloat16)  # mixed dtypes: each must come back as it was
    return model


def save(run_dir, step, keep=3, model=None):
    model = model or make_model(step)
    optimizer_state = [{"state": [{"exp_avg": torch.full((4,), float(step))}], "param_groups": [{"lr": 0.1}]}]
    return checkpoint.save(run_dir, step, model, optimizer_state, {"loader": {"step": step}}, {"note": "test"},
                           keep=keep)


def test_save_writes_manifest_latest_and_exact_dtypes(tmp_path):
    model = make_model(0)
    path = save(tmp_path, 7, model=model)
    assert path == tmp_path / "checkpoints" / "step_000007"
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000007"
    manifest = checkpoint.verify(path)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng.safetensors", "state.json",
                                      "config.json"}
    found = checkpoint.find_latest(tmp_path)
    assert found.step == 7 and found.state["loader"] == {"step": 7} and found.config == {"note": "test"}
    other = make_model(1)
    checkpoint.load_weights(found, other)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(checkpoint.read_optimizer(found)[0]["state"][0]["exp_avg"], torch.full((4,), 7.0))


def test_keeps_the_newest_k(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep=3)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [3, 4, 5]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_rng_states_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    rng.set_rng_state(*state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])


def test_each_rank_restores_the_written_card_state_onto_its_own_card(monkeypatch):
    """Rank 0 writes the checkpoint. Every rank draws the same numbers on its own card (one seed, the
    same work), so each restores rank 0's card state onto its own card. All cards' states used to be
    written and restored by index: rank r then went on from rank 0's copy of card r, never drawn
    from, and its stochastic rounding left the other replicas'. No CUDA here: torch.cuda is faked."""
    cards = {0: torch.tensor([0], dtype=torch.uint8), 3: torch.tensor([3], dtype=torch.uint8)}
    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cards[current[0]].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: cards.__setitem__(current[0], state.clone()))
    cards[0] = torch.tensor([42], dtype=torch.uint8)  # rank 0 drew
    plain, tensors = rng.rng_state()
    assert set(tensors) == {"torch_cpu", "cuda"}
    current[0] = 3  # rank 3, on card 3, resumes
    rng.set_rng_state(plain, tensors)
    assert cards[3].tolist() == [42]
    old = {"torch_cpu": tensors["torch_cpu"], "cuda_0": torch.tensor([7], dtype=torch.uint8),
           "cuda_3": torch.tensor([9], dtype=torch.uint8)}  # as earlier versions wrote them
    rng.set_rng_state(plain, old)
    assert cards[3].tolist() == [7]


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_latest_falls_back_to_the_previous(tmp_path, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    target = newest / "optimizer.pt"
    if damage == "truncate":  # a power cut while the disk cache was being written
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":  # bit rot: same size, other bytes
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    warnings = []
    found = checkpoint.find_latest(tmp_path, warn=warnings.append)
    assert found.step == 1
    assert len(warnings) == 1 and "step_000002" in warnings[0] and "falling back" in warnings[0]
    assert (tmp_path / "checkpoints" / "step_000002.damaged").is_dir()  # kept for inspection
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000001"
    # the run goes on and reaches step 2 again: the new checkpoint takes the name
    save(tmp_path, 2)
    assert checkpoint.find_latest(tmp_path).step == 2


def test_no_intact_checkpoint_is_an_error(tmp_path):
    path = save(tmp_path, 1)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.find_latest(tmp_path, warn=lambda _: None)


def test_a_crash_before_latest_moved_still_finds_the_newest(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_text("checkpoints/step_000001\n")  # as if the crash came just before
    assert checkpoint.find_latest(tmp_path, warn=lambda _: None).step == 2
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000002"


def test_a_write_failing_half_way_leaves_the_previous_usable(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def half_then_fail(obj, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    with pytest.raises(CheckpointError, match="No space left"):
        save(tmp_path, 2)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_000001"
    assert checkpoint.find_latest(tmp_path).step == 1


def test_an_interrupt_during_the_write_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def interrupted(obj, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert checkpoint.find_latest(tmp_path).step == 1


def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    save(tmp_path, 1)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: Usage(10**9, 10**9, 1000))
    with pytest.raises(CheckpointError, match="not enough disk space.*needs about.*[GM]iB free"):
        save(tmp_path, 2, keep=3)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [1]
    assert checkpoint.find_latest(tmp_path).step == 1


def test_short_disk_first_drops_what_retention_would_drop(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=3)
    calls = []

    def usage(_):  # short until something is deleted
        calls.append(len(checkpoint.step_dirs(tmp_path)))
        return Usage(10**12, 0, 10**12 if calls[-1] < 3 else 1000)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
    save(tmp_path, 4, keep=3)
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2, 3, 4]
    assert calls == [3, 2]


def test_a_short_disk_removes_damaged_checkpoints_before_refusing_the_save(tmp_path, monkeypatch):
    """A damaged checkpoint is set aside for inspection, a whole checkpoint's size of no use to the run:
    when the disk is short the run's next save comes first (it was refused with the damaged one kept)."""
    save(tmp_path, 1, keep=1)
    aside = tmp_path / "checkpoints" / "step_000002.damaged"
    shutil.copytree(tmp_path / "checkpoints" / "step_000001", aside)
    warnings = []
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda _: Usage(10**12, 0, 1000 if aside.exists() else 10**12))
    checkpoint.save(tmp_path, 3, torch.nn.Linear(2, 2), {}, {}, {}, keep=1, warn=warnings.append)
    assert not aside.exists() and [s for s, _ in checkpoint.step_dirs(tmp_path)] == [3]
    assert warnings == ["warning: removed 1 damaged checkpoint (step_000002.damaged) to make room for the "
                        "checkpoint of step 3"]


def test_keep_one_never_deletes_the_only_checkpoint_first(tmp_path, monkeypatch):
    save(tmp_path, 1, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: Usage(10**9, 10**9, 1000))
    with pytest.raises(CheckpointError):
        save(tmp_path, 2, keep=1)
    assert checkpoint.find_latest(tmp_path).step == 1


@pytest.mark.parametrize("name", [n for n, r in __import__("onecard.recipe").recipe.NAMED.items()
                                  if r.matmul != "fp8" and r.loss != "fused"])
def test_the_planners_checkpoint_size_is_what_a_checkpoint_writes(tmp_path, name):
    """plan's disk line against the files a real checkpoint of each recipe holds (one step taken,
    so every optimizer state exists)."""
    from onecard.model import GPTConfig, build_model
    from onecard.optim import build_optimizer
    from onecard.plan.persistent import checkpoint_bytes
    from onecard.recipe import NAMED

    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)
    recipe = NAMED[name]
    torch.manual_seed(0)
    model = build_model(config)
    model.set_policies(recipe.activations, recipe.loss)
    opt = build_optimizer(model, recipe)
    tokens = torch.randint(0, config.vocab_size, (2, config.sequence_len + 1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    opt.accumulate()
    opt.step()
    path = checkpoint.save(tmp_path, 1, model, opt.state_dict(), {}, {}, warn=lambda _: None)
    written = sum((path / f).stat().st_size for f in ("model.safetensors", "optimizer.pt"))
    predicted = checkpoint_bytes(config, recipe, device="cpu")
    assert abs(predicted / written - 1) < 0.05, (predicted, written)
