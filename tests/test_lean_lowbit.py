"""8-bit block codes, bf16 stochastic rounding and StateTensor against bounds derived by hand."""

import io
import math

import pytest
import torch

from onecard.lowbit import (
    LOG_STEPS,
    StateTensor,
    dequantize_linear,
    dequantize_log,
    quantize_linear,
    quantize_log,
    stochastic_round_bf16,
)
from onecard.recipe import INT8_BLOCK
from onecard.slots import Slot


def per_block(x: torch.Tensor) -> list[torch.Tensor]:
    """Blocks of INT8_BLOCK consecutive elements, the last one short (the layout in recipe.py)."""
    return list(x.reshape(-1).split(INT8_BLOCK))


def sample_tensor(numel: int = 1000) -> torch.Tensor:
    """Blocks of very different scales, one all-zero block and a short last block."""
    torch.manual_seed(0)
    x = torch.randn(numel)
    scales = torch.tensor([1e-6, 1.0, 0.0, 3e4])  # 1000 = 3 full blocks + a short one of 232
    return x * scales.repeat_interleave(INT8_BLOCK)[:numel]


def test_linear_code_error_bound_per_block():
    x = sample_tensor()
    q, absmax = quantize_linear(x)
    assert q.dtype == torch.int8 and q.numel() == x.numel()
    assert absmax.dtype == torch.float32 and absmax.numel() == math.ceil(x.numel() / INT8_BLOCK)
    back = dequantize_linear(q, absmax)
    for block, restored, scale in zip(per_block(x), per_block(back), absmax, strict=True):
        assert scale == block.abs().max()
        # round to nearest on a grid of absmax/127: error at most half a step (plus fp32 slack)
        bound = scale / 127 / 2 + scale * 1e-6
        assert (block - restored).abs().max() <= bound
    assert (back[2 * INT8_BLOCK:3 * INT8_BLOCK] == 0).all()  # the zero block stays exactly zero


@pytest.mark.parametrize("signed", [False, True])
def test_log_code_relative_error_and_floor(signed):
    torch.manual_seed(1)
    exponents = torch.empty(1000).uniform_(-40, 0)  # values across 40 octaves below the block max
    x = torch.exp2(exponents)
    x[::97] = 0.0
    if signed:
        x[1::2] *= -1
    q, absmax = quantize_log(x, signed=signed)
    assert q.dtype == (torch.int8 if signed else torch.uint8)
    back = dequantize_log(q, absmax)
    levels = 126 if signed else 254  # non-zero magnitudes below the top code
    floor_ratio = 2.0 ** (-levels / LOG_STEPS)
    bound = 2 ** (1 / (2 * LOG_STEPS)) - 1  # half a step of the log grid, as a ratio
    for block, restored, scale in zip(per_block(x), per_block(back), absmax, strict=True):
        in_range = block.abs() >= scale * floor_ratio
        rel = (restored[in_range] / block[in_range] - 1).abs()  # the sign is kept: rel < 1
        assert rel.max() <= bound + 1e-5
        tiny = (block != 0) & ~in_range
        assert tiny.any()
        if signed:  # below the range: 0 or, within half a step of the floor, the floor
            assert ((restored[tiny] == 0) | (restored[tiny].abs() == scale * floor_ratio)).all()
        else:  # below the range: the floor, never 0 (Adam divides by its square root)
            torch.testing.assert_close(restored[tiny], (scale * floor_ratio).expand(int(tiny.sum())))
        assert (restored[block == 0] == 0).all()


def test_state_tensor_byte_layout():
    shape = (10, 100)  # 1000 elements: 4 blocks, the last short
    assert StateTensor(shape, "fp32", "cpu").nbytes() == 4000
    assert StateTensor(shape, "bf16", "cpu").nbytes() == 2000
    assert StateTensor(shape, "int8", "cpu").nbytes() == 1000 + 4 * 4
    for code in ("log", "signed_log"):
        assert StateTensor(shape, "int8", "cpu", code=code).nbytes() == 1000 + 4 * 4


@pytest.mark.parametrize("fmt,code", [("fp32", "linear"), ("bf16", "linear"), ("int8", "linear"),
                                      ("int8", "log"), ("int8", "signed_log")])
def test_state_tensor_piecewise_write_equals_whole(fmt, code):
    x = sample_tensor().abs() if code == "log" else sample_tensor()
    whole, pieces = StateTensor(x.shape, fmt, "cpu", code), StateTensor(x.shape, fmt, "cpu", code)
    whole.write(x)
    for lo in range(0, x.numel(), 2 * INT8_BLOCK):
        pieces.write(x[lo:lo + 2 * INT8_BLOCK], lo)
        torch.testing.assert_close(pieces.read(lo, lo + 2 * INT8_BLOCK), whole.read(lo, lo + 2 * INT8_BLOCK))
    torch.testing.assert_close(pieces.read(), whole.read(), rtol=0, atol=0)
    if fmt == "int8":
        with pytest.raises(ValueError, match="whole blocks"):
            whole.read(10, 300)


def test_state_tensor_checkpoint_roundtrip_and_format_change():
    x = sample_tensor()
    saved = StateTensor(x.shape, "int8", "cpu")
    saved.write(x)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    same = StateTensor(x.shape, "int8", "cpu")
    same.load_state_dict(loaded)
    assert torch.equal(same.read(), saved.read())
    as_fp32 = StateTensor(x.shape, "fp32", "cpu")  # resuming an 8-bit run with fp32 states
    as_fp32.load_state_dict(loaded)
    assert torch.equal(as_fp32.read(), saved.read())
    with pytest.raises(ValueError, match="does not fit"):
        StateTensor((7,), "int8", "cpu").load_state_dict(loaded)


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above x (toward zero and away from it), as fp32."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)  # truncation: toward zero
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    exact = x == down
    return down, torch.where(exact, down, up)


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(2)
    x = torch.cat([torch.empty(32).uniform_(1, 2), -torch.empty(32).uniform_(1e-3, 2e-3)])
    draws = 4000
    rounded = stochastic_round_bf16(x.repeat(draws, 1)).float()
    down, up = bf16_neighbours(x)
    assert ((rounded == down) | (rounded == up)).all()  # always one of the two neighbours
    gap = (up - down).abs()
    # each draw is a Bernoulli on the gap: the mean of n draws has std <= gap / (2 sqrt(n))
    assert ((rounded.mean(0) - x).abs() <= 5 * gap / (2 * math.sqrt(draws))).all()
    special = torch.tensor([float("inf"), -float("inf"), 0.0, 1.0])
    assert torch.equal(stochastic_round_bf16(special).float(), special)
    assert stochastic_round_bf16(torch.tensor([float("nan")])).isnan().all()


def test_stochastic_rounding_moves_where_round_to_nearest_stalls():
    # 200 updates of +1e-4 to a bf16 weight at 1.0: a bf16 step there is 2^-7, so each update is
    # below half a step. Round-to-nearest drops every one; stochastic rounding adds 0.02 in
    # expectation (std per weight <= sqrt(200)·2^-8 ≈ 0.055, so the mean of 4096 is within 0.004).
    torch.manual_seed(3)
    rtn = torch.ones(4096, dtype=torch.bfloat16)
    sr = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(200):
        rtn = (rtn.float() + 1e-4).bfloat16()
        sr = stochastic_round_bf16(sr.float() + 1e-4)
    assert torch.equal(rtn, torch.ones_like(rtn))
    assert abs(sr.float().mean().item() - 1.02) < 0.004


@pytest.mark.parametrize("stochastic", [False, True])
def test_slot_writes_bf16_weights_with_the_rounding_of_its_recipe(stochastic):
    torch.manual_seed(4)
    param = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    slot = Slot(param, param.device, stochastic=stochastic)
    for _ in range(200):  # a descent step of -1e-4 each time, as an optimizer would apply it
        slot.apply(0, param.numel(), torch.full((4096,), -1e-4), decay=1.0, alpha=1.0)
    moved = param.float().mean().item() - 1.0
    assert moved == pytest.approx(0.02, abs=0.004) if stochastic else moved == 0.0
