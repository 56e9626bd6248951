"""Every named recipe trains a tiny GPT on the CPU, as well as the plain recipe does."""

import math

import pytest
import torch

from onecard.errors import UsageError
from onecard.fp8 import convert_to_fp8, fp8_unavailable_reason
from onecard.model import GPTConfig, build_model
from onecard.optim import build_optimizer
from onecard.recipe import NAMED
from onecard.schedule import muon_momentum

CONFIG = GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
STEPS = 12
CPU_RECIPES = [name for name, r in NAMED.items() if r.matmul != "fp8" and r.loss != "fused"]


def train(name: str) -> list[float]:
    """STEPS optimizer steps of 2 micro-batches each, on one fixed batch; returns the losses."""
    recipe = NAMED[name]
    torch.manual_seed(0)
    model = build_model(CONFIG)
    model.set_policies(recipe.activations, recipe.loss, loss_chunk_rows=40)  # several chunks per batch
    opt = build_optimizer(model, recipe)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.sequence_len + 1), generator=g)
    micro = [(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])]
    losses = []
    for step in range(STEPS):
        opt.set_muon_momentum(muon_momentum(step))
        total = 0.0
        for x, y in micro:
            loss = model(x, y)
            (loss / len(micro)).backward()
            opt.accumulate()
            total += loss.item() / len(micro)
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def baseline_losses():
    return train("baseline")


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_named_recipe_trains_like_the_baseline(name, baseline_losses):
    losses = baseline_losses if name == "baseline" else train(name)
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(CONFIG.vocab_size), rel=0.02)  # zero head: uniform
    assert losses[-1] < 0.5 * losses[0]  # memorizing a fixed batch
    # Same loss as the plain recipe, to within what bf16 weights and 8-bit states change on a
    # 12-step run (measured: within 1 % of the baseline's final loss).
    assert losses[-1] == pytest.approx(baseline_losses[-1], rel=0.05)


def test_fp8_is_refused_with_its_reason_on_this_machine():
    model = build_model(CONFIG)
    reason = fp8_unavailable_reason("cpu")
    assert reason is not None and "sm_89" in reason
    with pytest.raises(UsageError, match="FP8"):
        convert_to_fp8(model)
    with pytest.raises(UsageError, match="FP8"):  # the recipe is executed or refused, never ignored
        build_optimizer(model, NAMED["lean-fp8"])


def test_fp8_conversion_pads_the_inner_dimension(monkeypatch):
    """The weight gradient's product has the micro-batch's tokens as its inner dimension, which
    torch._scaled_mm wants a multiple of 16 (an SFT batch of 8 rows of 2,047 tokens is not): the
    block linears are converted with torchao's pad_inner_dim (checked here with torchao stubbed)."""
    import sys
    import types

    import onecard.fp8 as fp8

    calls = []
    stub = types.ModuleType("torchao.float8")
    stub.Float8LinearConfig = lambda **kw: kw
    stub.convert_to_float8_training = lambda module, **kw: calls.append((module, kw))
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", stub)
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda device: None)
    model = build_model(CONFIG)
    convert_to_fp8(model)
    [(module, kw)] = calls
    assert module is model.transformer.h and kw["config"] == {"pad_inner_dim": True}


def test_fused_loss_is_refused_with_its_reason_on_this_machine():
    model = build_model(CONFIG)
    with pytest.raises(UsageError, match="CUDA"):
        model.set_policies("full", "fused")
