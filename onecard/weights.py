"""Load trained weights: an onecard run directory or a nanochat checkpoint directory.

Nothing here executes code from the files: safetensors holds plain tensors, nanochat's
`model_*.pt` is read with `torch.load(weights_only=True)`, and its `tokenizer.pkl` goes
through the tokenizer's restricted unpickler.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from onecard.errors import UsageError
from onecard.model import GPT, GPTConfig, build_model
from onecard.run import read_config
from onecard.tokenizer import Tokenizer

NANOCHAT_MODEL = re.compile(r"model_(\d+)\.pt$")


def load_weights(path: str | Path, device: str = "cpu", tokenizer_path: str | Path | None = None
                 ) -> tuple[GPT, Tokenizer, dict]:
    """Returns (model, tokenizer, info); info says which layout and step were read."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: give an onecard run directory or a nanochat checkpoint "
                         "directory")
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise UsageError(f"--tokenizer {tokenizer_path}: no such file or directory")
    if (path / "model.safetensors").exists():
        return _load_onecard(path, device, tokenizer_path)
    if any(NANOCHAT_MODEL.match(p.name) for p in path.iterdir()):
        return load_nanochat(path, device, tokenizer_path)
    raise UsageError(f"{path} holds neither model.safetensors (onecard) nor model_*.pt (nanochat)")


def _load_onecard(path: Path, device: str, tokenizer_path: str | Path | None = None
                  ) -> tuple[GPT, Tokenizer, dict]:
    config = read_config(path / "config.json")
    model = build_model(config.model_config, device=device, init=False)
    _load_state(model, lambda: load_file(str(path / "model.safetensors"), device=device), path / "model.safetensors")
    tok = Path(tokenizer_path) if tokenizer_path else path / "tokenizer"
    tokenizer = Tokenizer.load(tok.parent if tok.name in ("tokenizer.pkl", "tokenizer.json") else tok)
    if tokenizer.vocab_size != config.model_config.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                         f"{config.model_config.vocab_size}")
    return model, tokenizer, {"layout": "onecard", "path": str(path), "config": config}


def _load_state(model: GPT, read, path: Path) -> None:
    """Read a state dict and load it, turning a damaged or mismatched file into one line."""
    try:
        state = read()
        model.load_state_dict(state)
    except UsageError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, AttributeError) as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"cannot load the weights in {path}: {first}") from None


def find_nanochat_tokenizer(checkpoint_dir: Path) -> Path:
    """nanochat keeps tokenizer.pkl beside the checkpoints' base directory (…/tokenizer/)."""
    for base in [checkpoint_dir, *list(checkpoint_dir.parents)[:3]]:
        for candidate in (base / "tokenizer.pkl", base / "tokenizer" / "tokenizer.pkl"):
            if candidate.exists():
                return candidate
    raise UsageError(f"no tokenizer.pkl found in {checkpoint_dir} or the three directories above it: "
                     "pass --tokenizer PATH")


def load_nanochat(checkpoint_dir: Path, device: str = "cpu", tokenizer_path: str | Path | None = None,
                  step: int | None = None) -> tuple[GPT, Tokenizer, dict]:
    """Read model_{step:06d}.pt + meta_{step:06d}.json (the newest step unless one is given)."""
    steps = sorted(int(m.group(1)) for p in checkpoint_dir.iterdir() if (m := NANOCHAT_MODEL.match(p.name)))
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UsageError(f"no model_{step:06d}.pt in {checkpoint_dir}; steps there: {steps}")
    meta_path = checkpoint_dir / f"meta_{step:06d}.json"
    if not meta_path.exists():
        raise UsageError(f"{meta_path.name} is missing beside model_{step:06d}.pt: it holds the model config")
    try:
        meta = json.loads(meta_path.read_text())
        config = GPTConfig(**meta["model_config"])
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UsageError(f"cannot read the model config in {meta_path} ({type(error).__name__}: {error})") from None
    model = build_model(config, device=device, init=False)
    model_path = checkpoint_dir / f"model_{step:06d}.pt"

    def read() -> dict:
        try:
            state = torch.load(model_path, map_location=device, weights_only=True)
        except Exception as error:  # weights_only refuses anything that is not plain tensors
            raise UsageError(f"cannot read {model_path.name} as plain weights: {error}") from None
        # A compiled model's state dict carries the "_orig_mod." prefix; the weights are the same.
        return {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    _load_state(model, read, model_path)
    tok_file = Path(tokenizer_path) if tokenizer_path else find_nanochat_tokenizer(checkpoint_dir)
    tokenizer = Tokenizer.load(tok_file.parent if tok_file.name == "tokenizer.pkl" else tok_file)
    if tokenizer.vocab_size != config.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}")
    return model, tokenizer, {"layout": "nanochat", "path": str(checkpoint_dir), "step": step, "meta": meta}
