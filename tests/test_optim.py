"""Muon, the AdamW groups and the schedules against plainly re-derived float64 math."""

import math

import pytest
import torch

from onecard.model import GPTConfig, build_model
from onecard.optim import Muon, build_optimizer
from onecard.schedule import lr_multiplier, muon_momentum


def newton_schulz_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315  # docs/architecture.md#muon
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (32, 32)])
def test_muon_step_against_float64_derivation(shape):
    torch.manual_seed(0)
    rows, cols = shape
    p0 = torch.randn(shape)
    grads = [torch.randn(shape), torch.randn(shape)]
    param = torch.nn.Parameter(p0.clone())
    opt = Muon([param], lr=0.05, momentum=0.9)

    expected = p0.double()
    buf = torch.zeros(shape, dtype=torch.float64)
    for g in grads:
        param.grad = g.clone()
        opt.step()
        g = g.double()
        buf = buf + (1 - 0.9) * (g - buf)  # exponential average of gradients
        nesterov = g + 0.9 * (buf - g)
        update = newton_schulz_float64(nesterov)
        expected = expected - 0.05 * math.sqrt(max(1.0, rows / cols)) * update
        # the momentum buffer is plain fp32 arithmetic: tight tolerance
        torch.testing.assert_close(opt.state[param]["momentum_buffer"].double(), buf, rtol=1e-6, atol=1e-6)

    # Newton-Schulz runs in bf16 (8 bits of mantissa): the step agrees to about 1 %.
    step_taken = param.detach().double() - p0.double()
    step_expected = expected - p0.double()
    rel = (step_taken - step_expected).norm() / step_expected.norm()
    assert rel < 0.03, rel


def test_newton_schulz_reference_orthogonalizes():
    # Sanity of the reference itself: singular values pushed into the quintic's band around 1.
    torch.manual_seed(1)
    s = torch.linalg.svdvals(newton_schulz_float64(torch.randn(40, 20)))
    assert s.min() > 0.6 and s.max() < 1.25


def test_adamw_groups_and_rates():
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=192))
    opt = build_optimizer(model)
    adam, muon = opt.optimizers
    scale = (192 / 768) ** -0.5  # = 2
    lm_head, embedding = adam.param_groups
    assert lm_head["params"][0] is model.lm_head.weight and lm_head["lr"] == pytest.approx(0.004 * scale)
    assert embedding["params"][0] is model.transformer.wte.weight and embedding["lr"] == pytest.approx(0.2 * scale)
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    assert adam.defaults["weight_decay"] == 0.0
    matrices = {id(p) for p in model.transformer.h.parameters()}
    assert {id(p) for p in muon.param_groups[0]["params"]} == matrices
    assert muon.param_groups[0]["lr"] == 0.02
    opt.set_lr_multiplier(0.5)
    assert lm_head["lr"] == pytest.approx(0.002 * scale) and muon.param_groups[0]["lr"] == 0.01


def test_schedules_by_hand():
    # 100 steps, last 20 % decay linearly to 0: steps 0..80 at 1, then (100 - s)/20.
    assert [lr_multiplier(s, 100) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(81, 100) == pytest.approx(19 / 20)
    assert lr_multiplier(90, 100) == pytest.approx(0.5)
    assert lr_multiplier(99, 100) == pytest.approx(1 / 20)
    assert lr_multiplier(0, 10, warmup_ratio=0.2) == pytest.approx(0.5)
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(1000) == pytest.approx(0.95)
