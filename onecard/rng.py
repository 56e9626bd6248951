"""Every random number generator a run draws from (Python's, NumPy's, torch's CPU and CUDA), captured
and restored together: a checkpoint keeps them, and a step that is redone (step.py) starts from the
same draws."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python and NumPy states, torch generator states as tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's card alone: each rank draws on its own, and the ranks' draws are the same
        # (one seed, the same work), so rank 0's state, written, is every rank's to restore
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = tensors.get("cuda", tensors.get("cuda_0"))  # cuda_0: how earlier versions kept rank 0's card
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # onto this process's card, whichever it is
