"""Cross-entropy over the head without full logits: chunked (any device) or fused (Liger, CUDA).

The plain loss makes (B·T, V) fp32 logits and, in backward, their gradient of the same size: at
d32 and 2048 tokens that is 0.54 GB each. The chunked loss runs head + soft-cap + fp32
cross-entropy over `rows` rows at a time and recomputes each chunk in backward, so only one
chunk's logits (and their gradient) exist at once. It returns what F.cross_entropy returns on
the full logits with ignore_index=-1: the mean over non-ignored targets, their sum, or one loss
per row (0 where ignored).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from onecard.errors import UsageError

IGNORE_INDEX = -1


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                targets: torch.Tensor, per_row: bool) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none" if per_row else "sum")


def chunked_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                          targets: torch.Tensor, reduction: str = "mean", rows: int = 1024) -> torch.Tensor:
    """Cross-entropy of head(hidden) against targets, `rows` rows of (B·T) at a time.

    head maps (rows, n_embd) to soft-capped logits (rows, V); each chunk is checkpointed, so its
    logits are freed after forward and recomputed in backward.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss reduction must be mean, sum or none, got {reduction!r}")
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    flat_targets = targets.reshape(-1)
    per_row = reduction == "none"
    recompute = torch.is_grad_enabled() and flat_hidden.requires_grad
    parts = []
    for h, t in zip(flat_hidden.split(rows), flat_targets.split(rows), strict=True):
        if recompute:
            # preserve_rng_state off: the head has no randomness, and saving RNG state costs a sync
            parts.append(checkpoint(_chunk_loss, head, h, t, per_row, use_reentrant=False,
                                    preserve_rng_state=False))
        else:
            parts.append(_chunk_loss(head, h, t, per_row))
    if per_row:
        return torch.cat(parts)
    total = torch.stack(parts).sum()
    if reduction == "sum":
        return total
    return total / (flat_targets != IGNORE_INDEX).sum()  # 0/0 = nan when all are ignored, as F.cross_entropy


def fused_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        softcap: float, reduction: str = "mean") -> torch.Tensor:
    """Liger-Kernel's fused linear + cross-entropy, with the soft-cap applied inside the kernel.

    Liger's `softcap` computes softcap·tanh(logits/softcap), the same cap as GPT.logits, so the
    loss is the model's loss. Versions without `softcap` are refused rather than run uncapped.
    """
    fused = fused_loss_function(hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    # Liger wants input and weight in one dtype; under autocast that is the autocast dtype.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else flat_hidden.dtype
    with torch.autocast("cuda", enabled=False):
        return fused(flat_hidden.to(dtype), weight.to(dtype), targets.reshape(-1),
                     ignore_index=IGNORE_INDEX, reduction=reduction, softcap=softcap)


def fused_loss_function(device: torch.device) -> Callable:
    """Liger's fused linear cross-entropy, or a UsageError saying why it cannot run here."""
    if torch.device(device).type != "cuda":
        raise UsageError("loss=fused runs Liger-Kernel's Triton kernel, which needs a CUDA GPU: "
                         "use loss=chunked, which saves the same logits memory on any device")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise UsageError("loss=fused needs Liger-Kernel (pip install liger-kernel); "
                         "loss=chunked saves the same memory without it") from exc
    if "softcap" not in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        raise UsageError("this Liger-Kernel version cannot soft-cap logits inside the fused loss, so it "
                         "would train a different model: upgrade liger-kernel or use loss=chunked")
    return liger_fused_linear_cross_entropy
