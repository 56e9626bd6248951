"""nanochat-2026's optimizer against nanochat 92d63d4's MuonAdamW (its torch.compile'd kernels run
eagerly here), and its schedules against the published script's rules."""

import pytest
import torch

from onecard.family import build_model
from onecard.model_config import GPTConfig
from onecard.optim_2026 import build_optimizer_2026
from onecard.recipe import named_recipe
from onecard.schedule_2026 import (
    auto_total_batch,
    lr_multiplier,
    muon_momentum,
    scaled_weight_decay,
    weight_decay_multiplier,
)
from tests.reference import nanochat
from tests.test_model_2026 import SMALL, reference_model, scramble

RATES = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.2)


def random_grads(models, seed):
    g = torch.Generator().manual_seed(seed)
    names = dict(models[0].named_parameters())
    grads = {name: torch.randn(p.shape, generator=g) * 0.1 for name, p in names.items()}
    for model in models:
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()


def eager(monkeypatch):
    """nanochat's optimizer kernels without torch.compile (the same Python, run eagerly)."""
    import sys
    module = sys.modules["nanochat.optim"]
    for name in ("adamw_step_fused", "muon_step_fused"):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, getattr(fn, "_torchdynamo_orig_callable", fn))


def twins(monkeypatch, n_layer: int, seed: int):
    """nanochat 92d63d4's model (its optimizer kernels eager) and onecard's, with the same random weights."""
    gpt = nanochat("92d63d4", "gpt")
    eager(monkeypatch)
    config = GPTConfig(n_layer=n_layer, **SMALL)
    ref = reference_model(gpt, config)
    ref.init_weights()
    scramble(ref, seed)
    ours = build_model(config, init=False)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def steps_agree(ref, ours, theirs_opt, opt, steps: int = 2) -> None:
    """The same random gradients into both; the weights agree after every step."""
    for step in range(steps):
        random_grads([ref, ours], step)
        theirs_opt.step()
        opt.step()
        theirs = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=2e-6, msg=f"{name} after step {step + 1}")


def test_two_optimizer_steps_equal_nanochat(monkeypatch):
    # Tolerance: 2e-6 absolute on weights of size ~0.3 after two steps, fp32 on the CPU; the two
    # differ only in the order of a few float operations (fused kernel vs per-matrix code).
    ref, ours = twins(monkeypatch, 4, 11)
    theirs_opt = ref.setup_optimizer(**RATES)
    opt = build_optimizer_2026(ours, total_batch=2 ** 19, **RATES)
    assert len([g for g in theirs_opt.param_groups if g["kind"] == "muon"]) == len(opt.muon.param_groups)
    steps_agree(ref, ours, theirs_opt, opt)


def test_fine_tuning_takes_a_share_of_every_rate_and_no_weight_decay(monkeypatch):
    """As nanochat's chat_sft.py (00255c1) sets up its optimizer: setup_optimizer with the pre-training
    rates and weight_decay 0, then every group's rate times init_lr_frac. SFT used to get the
    pre-training optimizer, its rates scaled by a conversation count as if it were tokens."""
    from onecard.family import build_optimizer

    ref, ours = twins(monkeypatch, 2, 5)
    fraction = 0.25
    theirs_opt = ref.setup_optimizer(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, weight_decay=0.0)
    for group in theirs_opt.param_groups:
        group["lr"] *= fraction
    opt = build_optimizer(ours, total_batch=32, fine_tune=fraction)  # 32 conversations a step
    names = {id(p): name for name, p in ref.named_parameters()}
    theirs = {names[id(p)]: (g["lr"], g.get("weight_decay", 0.0)) for g in theirs_opt.param_groups for p in g["params"]}
    ours_names = {id(p): name for name, p in ours.named_parameters()}
    mine = {ours_names[id(p)]: (g["lr"], g.get("weight_decay", 0.0)) for o in opt.optimizers for g in o.param_groups
            for p in g["params"]}
    assert mine.keys() == theirs.keys()
    for name, (lr, wd) in mine.items():
        assert lr == pytest.approx(theirs[name][0], rel=1e-12) and wd == pytest.approx(theirs[name][1]), name
    steps_agree(ref, ours, theirs_opt, opt)


def test_lean_recipe_keeps_states_small_and_steps():
    config = GPTConfig(n_layer=2, **SMALL)
    model = build_model(config)
    opt = build_optimizer_2026(model, named_recipe("lean"), total_batch=2 ** 19)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    before = [p.detach().float().clone() for p in model.parameters()]
    idx = torch.randint(0, 100, (2, 64))
    model(idx, idx).backward()
    opt.accumulate()
    opt.step()
    assert any(not torch.equal(b, p.float()) for b, p in zip(before, model.parameters(), strict=True))
    assert opt.state_bytes()["optimizer"]["device"] < sum(4 * p.numel() for p in model.parameters())


def test_a_resume_loads_normuon_second_moments_into_place():
    """A checkpoint is read onto the CPU; NorMuon's second moments are plain tensors. They used to be
    replaced by the CPU copies, so on CUDA the first step after a resume met tensors on two devices.
    `meta` stands in for the card here: a state that lives there must stay there."""
    import io

    config = GPTConfig(n_layer=2, **SMALL)
    model = build_model(config)
    opt = build_optimizer_2026(model, named_recipe("baseline"), total_batch=2 ** 19)
    idx = torch.randint(0, 100, (2, 64))
    model(idx, idx).backward()
    opt.accumulate()
    opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    stored = opt.muon.stored
    expected = {p: state["second_momentum_buffer"].clone() for p, state in stored.items()}
    assert any(t.abs().sum() > 0 for t in expected.values())
    for state in stored.values():
        state["second_momentum_buffer"].zero_()
    kept = {p: state["second_momentum_buffer"] for p, state in stored.items()}
    saved.seek(0)
    opt.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
    for p, state in stored.items():
        assert state["second_momentum_buffer"] is kept[p] and torch.equal(kept[p], expected[p])
    for state in stored.values():
        state["second_momentum_buffer"] = state["second_momentum_buffer"].to("meta")
    saved.seek(0)
    opt.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
    assert all(state["second_momentum_buffer"].device.type == "meta" for state in stored.values())


def test_schedules_follow_the_published_rules():
    d24 = GPTConfig.from_depth(24, 32768, 2048, arch="nanochat-2026")
    d12 = GPTConfig.from_depth(12, 32768, 2048, arch="nanochat-2026")
    assert auto_total_batch(d12) == 2 ** 19
    assert auto_total_batch(d24) == 2 ** 20  # 2^19 · (D/D_ref)^0.383 = 2^19 · 1.53 -> nearest power of 2
    assert scaled_weight_decay(d12, 2 ** 19) == pytest.approx(0.28)
    assert lr_multiplier(0, 1000) == pytest.approx(1 / 40) and lr_multiplier(300, 1000) == 1.0
    assert lr_multiplier(1000, 1000) == pytest.approx(0.05)
    assert muon_momentum(0, 3000) == 0.85 and muon_momentum(500, 3000) == 0.97
    assert muon_momentum(1000, 1000) == pytest.approx(0.90)
    assert weight_decay_multiplier(0, 10) == 1.0 and weight_decay_multiplier(10, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("recipe", ["baseline", "lean", "offload-states"])
def test_planner_counts_what_the_optimizer_allocates(recipe):
    # value embeddings, scalars and NorMuon's factored second moment included
    from onecard.plan.persistent import persistent_bytes
    config = GPTConfig(n_layer=3, **SMALL)
    model = build_model(config)
    r = named_recipe(recipe)
    opt = build_optimizer_2026(model, r)
    idx = torch.randint(0, 100, (2, 64))
    model(idx, idx).backward()
    opt.accumulate()
    real, p = opt.state_bytes(), persistent_bytes(config, r, device="cpu")
    assert (p.weights, p.host_weights) == (real["weights"]["device"], real["weights"]["cpu"])
    assert (p.grads, p.host_grads) == (real["grads"]["device"], real["grads"]["cpu"])
    assert (p.optimizer, p.host_optimizer) == (real["optimizer"]["device"], real["optimizer"]["cpu"])


def test_plan_target_gpt2_names_its_sources(capsys):
    from onecard.cli import main
    assert main(["plan", "--gpu", "rtx4070", "--target", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "not an onecard measurement" in out and "a825e63" in out and "Fastest to GPT-2" in out


def test_the_fine_tuning_schedule_is_chat_sfts():
    """scripts/chat_sft.py at karpathy/nanochat 00255c1, with its defaults (no warm-up, warm-down over
    the last half to 0): lrm 1 up to half the run, then (1 - decay); momentum 0.85 -> 0.95 over 300 steps."""
    from onecard.schedule_2026 import apply_sft

    class Recorder:
        def set_lr_multiplier(self, m):
            self.lr = m

        def set_muon_momentum(self, m):
            self.momentum = m

    def theirs(step, steps):
        progress = step / steps
        lrm = 1.0 if progress <= 0.5 else 1 - (progress - 0.5) / 0.5
        frac = min(step / 300, 1)
        return lrm, (1 - frac) * 0.85 + frac * 0.95

    for steps in (10, 1000):
        for step in range(steps):
            opt = Recorder()
            assert apply_sft(opt, step, steps) == opt.lr
            assert (opt.lr, opt.momentum) == pytest.approx(theirs(step, steps), abs=1e-12), (step, steps)
