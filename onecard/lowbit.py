"""Low-bit storage for optimizer states and weights, in plain PyTorch (CPU and GPU alike).

8-bit block-wise codes. A tensor is flattened and cut into blocks of INT8_BLOCK consecutive
elements (per tensor; the last block may be short). Each block stores one byte per element and
one fp32 scale, the block's largest magnitude (absmax):

  linear       int8.  q = round(127·x/absmax); x ≈ q·absmax/127; |error| ≤ absmax/254.
               For Muon's momentum: its update is orthogonalized, which the largest entries
               dominate, so an error relative to the block's largest value is harmless.
  log          uint8, for x ≥ 0 (AdamW's second moment v). q = 0 means exactly 0, otherwise
               x ≈ absmax·2^((q − 255)/LOG_STEPS). Inside a block v spans many decades (it is a
               squared gradient) and Adam divides by √v: a linear code rounds small v to 0 and
               turns the update m/(√v + eps) into m/1e-10. The log code keeps a relative error of
               at most 2^(1/(2·LOG_STEPS)) − 1 = 4.4 % (2.2 % on √v) down to the floor
               absmax·2^(−254/LOG_STEPS) ≈ 2.9e-10·absmax; smaller non-zero values are stored as
               the floor, never as 0 (rounding v up only shrinks the update).
  signed_log   int8 (AdamW's first moment m). Sign and 7 bits: x ≈ ±absmax·2^((|q| − 127)/LOG_STEPS),
               the same 4.4 % relative error down to absmax·2^(−126/LOG_STEPS) ≈ 1.8e-5·absmax
               (which covers the range of √v above); smaller values become 0. Adam's update is
               m/√v element by element, so each element needs its own relative precision: with
               a linear code, elements 100× below their block's largest lose most of their
               update (tests/test_lean_optim.py measures both).

bf16 stochastic rounding: add 16 uniform random bits below the bf16 mantissa of the fp32 value,
then truncate them. A value rounds up with probability equal to its distance from the lower
neighbour in units of the gap, so E[round(x)] = x: many updates smaller than half a bf16 step
still move the weight, where round-to-nearest discards every one of them.
"""

from __future__ import annotations

import math

import torch

from onecard.recipe import INT8_BLOCK

LOG_STEPS = 8  # code steps per factor of 2 in the log code
STATE_FORMATS = ("fp32", "bf16", "int8")
CODES = ("linear", "log", "signed_log")


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x flattened and zero-padded to whole blocks, shaped (blocks, INT8_BLOCK), in fp32."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % INT8_BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, INT8_BLOCK)


def num_blocks(numel: int) -> int:
    return math.ceil(numel / INT8_BLOCK)


def quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 codes, one per element of x flattened; fp32 absmax per block)."""
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    scale = 127.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    q = (blocks * scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(-1)[:x.numel()], absmax


def dequantize_linear(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Flat fp32 values of the codes q (a block-aligned stretch) with their blocks' absmax."""
    scale = torch.repeat_interleave(absmax / 127.0, INT8_BLOCK)[:q.numel()]
    return q.float() * scale


def quantize_log(x: torch.Tensor, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (log codes: uint8 for x >= 0, int8 with a sign when signed; fp32 absmax per block)."""
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    top = 127 if signed else 255
    ratio = blocks.abs() / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    mag = (top + LOG_STEPS * torch.log2(ratio)).round_()  # -inf for zeros
    if signed:  # below the range: 0 (a smaller first moment only shrinks the update)
        q = torch.where(mag >= 1, mag.clamp_(max=top), 0.0) * blocks.sign()
    else:  # below the range: the floor, never 0 (Adam divides by its square root)
        q = torch.where(blocks > 0, mag.clamp_(1, top), 0.0)
    q = q.to(torch.int8 if signed else torch.uint8)
    return q.view(-1)[:x.numel()], absmax


def dequantize_log(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Flat fp32 values of log codes q (int8: signed code, uint8: unsigned) with their absmax."""
    top = 127 if q.dtype == torch.int8 else 255
    scale = torch.repeat_interleave(absmax, INT8_BLOCK)[:q.numel()]
    codes = q.float()
    values = scale * torch.exp2((codes.abs() - top) / LOG_STEPS)
    return torch.where(codes != 0, values * codes.sign(), 0.0)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 x to bf16, up or down at random so that the expected result is x."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # Adding below the mantissa carries into it with the right probability (sign-magnitude:
    # this rounds the magnitude, so it is unbiased for negative values too); -65536 = 0xFFFF0000.
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


class StateTensor:
    """One optimizer state (a momentum or a moment) stored as fp32, bf16 or 8-bit blocks.

    Read and written as flat fp32 stretches [lo, hi) with lo a multiple of INT8_BLOCK, so a large
    state can be updated a piece at a time. For fp32, read returns a view of the storage itself.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], fmt: str, device: torch.device | str,
                 code: str = "linear") -> None:
        if fmt not in STATE_FORMATS:
            raise ValueError(f"state format {fmt!r} is not one of {', '.join(STATE_FORMATS)}")
        if code not in CODES:
            raise ValueError(f"8-bit code {code!r} is not one of {', '.join(CODES)}")
        self.shape, self.fmt, self.code = torch.Size(shape), fmt, code
        numel = self.shape.numel()
        self.absmax: torch.Tensor | None = None
        if fmt == "fp32":
            self.data = torch.zeros(numel, dtype=torch.float32, device=device)
        elif fmt == "bf16":
            self.data = torch.zeros(numel, dtype=torch.bfloat16, device=device)
        else:
            dtype = torch.uint8 if code == "log" else torch.int8
            self.data = torch.zeros(numel, dtype=dtype, device=device)
            self.absmax = torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)

    @property
    def numel(self) -> int:
        return self.data.numel()

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.absmax is None else [self.data, self.absmax]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def read(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        hi = self.numel if hi is None else hi
        if self.fmt == "fp32":
            return self.data[lo:hi]
        if self.fmt == "bf16":
            return self.data[lo:hi].float()
        b_lo, b_hi = self._block_range(lo, hi)
        decode = dequantize_linear if self.code == "linear" else dequantize_log
        return decode(self.data[lo:hi], self.absmax[b_lo:b_hi])

    def write(self, x: torch.Tensor, lo: int = 0) -> None:
        hi = lo + x.numel()
        target = self.data[lo:hi]
        if self.fmt != "int8":
            if x.data_ptr() != target.data_ptr():  # fp32 read() handed out the storage itself
                target.copy_(x.reshape(-1))
            return
        b_lo, b_hi = self._block_range(lo, hi)
        if self.code == "linear":
            q, absmax = quantize_linear(x)
        else:
            q, absmax = quantize_log(x, signed=self.code == "signed_log")
        target.copy_(q)
        self.absmax[b_lo:b_hi] = absmax

    def _block_range(self, lo: int, hi: int) -> tuple[int, int]:
        if lo % INT8_BLOCK or (hi % INT8_BLOCK and hi != self.numel):
            raise ValueError(f"8-bit states are read and written in whole blocks of {INT8_BLOCK}: "
                             f"[{lo}, {hi}) of {self.numel}")
        return lo // INT8_BLOCK, num_blocks(hi)

    def state_dict(self) -> dict:
        out = {"format": self.fmt, "code": self.code, "shape": list(self.shape), "data": self.data}
        if self.absmax is not None:
            out["absmax"] = self.absmax
        return out

    def load_state_dict(self, saved: dict) -> None:
        """Restore, converting when the checkpoint was written with another state format."""
        if list(saved["shape"]) != list(self.shape):
            raise ValueError(f"optimizer state of shape {saved['shape']} does not fit {list(self.shape)}")
        if saved["format"] == self.fmt and saved["code"] == self.code:
            self.data.copy_(saved["data"])
            if self.absmax is not None:
                self.absmax.copy_(saved["absmax"])
            return
        other = StateTensor(self.shape, saved["format"], "cpu", saved["code"])
        other.load_state_dict(saved)
        self.write(other.read().to(self.data.device))
