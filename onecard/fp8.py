"""FP8 matrix multiplies for the block linears (recipe matmul=fp8), through torchao's float8 training.

torchao's Float8Linear casts input, weight and output gradient to float8 with dynamic
tensor-wise scales and multiplies them on the FP8 tensor cores of Ada (sm_89) and Hopper
(sm_90) GPUs; weights, gradients and optimizer states keep their own dtypes. Only the linears
inside the blocks are converted: the head stays in bf16 (its logits feed the loss directly).
Float8Linear keeps the `weight` parameter, so state-dict keys are unchanged. build_optimizer
converts for matmul=fp8 before it lays out the parameters; compile the model after that.
"""

from __future__ import annotations

import torch

from onecard.errors import UsageError
from onecard.model import GPT

FP8_MIN_CAPABILITY = (8, 9)  # Ada Lovelace; FP8 tensor cores start there (Hopper is 9.0)


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why matmul=fp8 cannot run on `device`, or None when it can."""
    if torch.device(device).type != "cuda":
        return "matmul=fp8 needs an NVIDIA GPU with FP8 tensor cores (sm_89+: RTX 40xx, L4, H100)"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"matmul=fp8 needs FP8 tensor cores (sm_89+); {name} is sm_{capability[0]}{capability[1]}: "
                "use matmul=bf16")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "matmul=fp8 runs through torchao's float8 training: pip install torchao"
    except Exception as error:  # a torchao built for another torch can fail otherwise on import
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return f"matmul=fp8 runs through torchao's float8 training, which does not import here ({first})"
    return None


def _fp8_friendly(module: torch.nn.Module, fqn: str) -> bool:
    # FP8 GEMMs need both dimensions divisible by 16; nanochat widths (64·depth) always are.
    # Exactly nn.Linear: a Float8Linear (a subclass) is converted already.
    return type(module) is torch.nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: GPT) -> None:
    """Swap the block linears for Float8Linear in place, or raise UsageError saying why not."""
    reason = fp8_unavailable_reason(model.lm_head.weight.device)
    if reason:
        raise UsageError(reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # pad_inner_dim: torch._scaled_mm needs the inner dimension of each product to be a multiple of
    # 16, and the weight gradient's inner dimension is the micro-batch's tokens (B·T), which an SFT
    # batch padded to its longest conversation (or any --seq-len) need not make one; torchao pads
    # only where a dimension is not a multiple already
    convert_to_float8_training(model.transformer.h, module_filter_fn=_fp8_friendly,
                               config=Float8LinearConfig(pad_inner_dim=True))
