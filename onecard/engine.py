"""Running a trained model: continuing a prompt, and scoring text in bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from onecard.device import autocast_for
from onecard.model import GPT
from onecard.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_bpb(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                 device: str) -> float:
    """Bits per byte: summed cross-entropy (nats) over the bytes the targets stand for.

    Special tokens (0 bytes) and ignored targets (-1) count neither loss nor bytes, so the figure
    does not depend on the vocabulary size.
    """
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    token_bytes = token_bytes.to(device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_for(device):
            loss = model(inputs, targets, loss_reduction="none").view(-1)
        flat = targets.reshape(-1)
        nbytes = torch.where(flat >= 0, token_bytes[flat.clamp(min=0)], 0)
        total_nats += (loss.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if total_bytes.item() == 0:
        raise ValueError("validation set has no bytes to score")
    return (total_nats / (math.log(2) * total_bytes)).item()


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    """The prompt and its continuation, stopping at max_tokens or a beginning-of-sequence token."""
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt, prepend_bos=True)
    out = []
    # under the same autocast as training: on CUDA the embedding is bf16 and the other weights may be fp32
    with autocast_for(model.lm_head.weight.device.type):
        for token in model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, seed=seed):
            if token == tokenizer.bos_id:
                break
            out.append(token)
    model.train(was_training)
    return prompt + tokenizer.decode(out)
