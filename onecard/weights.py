"""Load trained weights: an onecard run directory, a nanochat checkpoint directory, or a Hugging
Face transformers `nanochat` model folder (config.json + model.safetensors + tokenizer.json).

Nothing here executes code from the files: safetensors holds plain tensors, nanochat's
`model_*.pt` is read with `torch.load(weights_only=True)`, its `tokenizer.pkl` goes through the
tokenizer's restricted unpickler, and a transformers folder is read as safetensors and JSON only
(its pytorch_model.bin, a pickle, is refused).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import tiktoken
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from onecard import formats
from onecard.checkpoint import step_dirs
from onecard.errors import UsageError, one_line
from onecard.family import build_model
from onecard.model import GPT, GPTConfig
from onecard.model_config import param_counts
from onecard.run import read_config
from onecard.tokenizer import Tokenizer, _check_vocabulary

NANOCHAT_MODEL = re.compile(r"model_(\d+)\.pt$")
# what reading a damaged or mismatched weights file raises
LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, AttributeError, SafetensorError)


def load_weights(path: str | Path, device: str = "cpu", tokenizer_path: str | Path | None = None
                 ) -> tuple[GPT, Tokenizer, dict]:
    """Returns (model, tokenizer, info); info says which layout and step were read."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: give an onecard run directory or a nanochat checkpoint "
                         "directory")
    if tokenizer_path is not None and not Path(tokenizer_path).exists():
        raise UsageError(f"--tokenizer {tokenizer_path}: no such file or directory")
    if _model_type(path / "config.json") is not None:
        return load_transformers(path, device, tokenizer_path)
    if (path / "model.safetensors").exists():
        return _load_onecard(path, device, tokenizer_path)
    if any(NANOCHAT_MODEL.match(p.name) for p in path.iterdir()):
        return load_nanochat(path, device, tokenizer_path)
    inside = sorted(path.glob("*_checkpoints/*/model_*.pt"))
    if inside:  # what `onecard export --to nanochat` wrote: NANOCHAT_BASE_DIR, its checkpoints below
        raise UsageError(f"{path} is a nanochat base directory: give one of its checkpoint folders, "
                         f"{inside[-1].parent}")
    depths = sorted({p.parent for p in path.glob("*/model_*.pt")})
    if depths:  # one phase's folder (chatsft_checkpoints): nanochat keeps a folder per model depth in it
        raise UsageError(f"{path} holds nanochat checkpoint folders: give one of them, "
                         f"{', '.join(str(d) for d in depths)}")
    steps = step_dirs(path)
    if steps:  # a run stopped before its final weights
        raise UsageError(f"{path} has no final weights yet (the run has not finished): give one of its checkpoints, "
                         f"{steps[-1][1]}, or finish the run")
    raise UsageError(f"{path} is not a model: it holds neither model.safetensors (onecard), model_*.pt "
                     "(nanochat) nor config.json with model.safetensors (transformers)")


def _check_weights_fit(config: GPTConfig, path: Path, files: list[Path] | None = None) -> None:
    """Refuse a model folder whose safetensors `files` (default its model.safetensors) do not hold as
    many parameters as its config.json asks for, before that model is built: a damaged config.json
    could ask for one that takes hours or terabytes to build."""
    files = files or [path / "model.safetensors"]
    try:
        held = 0
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                held += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except LOAD_ERRORS:  # a file that does not open: loading it says so, in one line
        return
    expected = sum(param_counts(config).values())
    if held != expected:
        raise UsageError(f"{path / 'config.json'} describes a model of {expected:,} parameters, but "
                         f"{files[0] if len(files) == 1 else path} holds {held:,}: the two do not belong together")


def _load_onecard(path: Path, device: str, tokenizer_path: str | Path | None = None
                  ) -> tuple[GPT, Tokenizer, dict]:
    config = read_config(path / "config.json")
    _check_weights_fit(config.model_config, path)
    model = build_model(config.model_config, device=device, init=False)
    _load_state(model, lambda: load_file(str(path / "model.safetensors"), device=device), path / "model.safetensors")
    tok = Path(tokenizer_path) if tokenizer_path else path / "tokenizer"
    if not tokenizer_path and not tok.exists() and path.parent.name == "checkpoints":
        tok = path.parent.parent / "tokenizer"  # a checkpoint of a run: the run's own tokenizer
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
    except LOAD_ERRORS as error:
        raise UsageError(f"cannot load the weights in {path}: {one_line(error)}") from None


def find_nanochat_tokenizer(checkpoint_dir: Path) -> Path:
    """nanochat keeps tokenizer.pkl beside the checkpoints' base directory (…/tokenizer/)."""
    for base in [checkpoint_dir, *list(checkpoint_dir.parents)[:3]]:
        for candidate in (base / "tokenizer.pkl", base / "tokenizer" / "tokenizer.pkl"):
            if candidate.exists():
                return candidate
    raise UsageError(f"no tokenizer.pkl found in {checkpoint_dir} or the three directories above it: "
                     "pass --tokenizer PATH")


# top-level parameters of nanochat's later GPT that the classic one lacks (nanochat 92d63d4's gpt.py)
LATER_KEYS = {"resid_lambdas", "x0_lambdas", "value_embeds"}


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
        fields = dict(meta["model_config"])
        if "window_pattern" in fields:  # nanochat 92d63d4 and later: the nanochat-2026 family
            fields.setdefault("arch", "nanochat-2026")
        config = GPTConfig(**fields)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UsageError(f"cannot read the model config in {meta_path} ({type(error).__name__}: {error})") from None
    model = build_model(config, device=device, init=False)
    model_path = checkpoint_dir / f"model_{step:06d}.pt"

    def read() -> dict:
        try:
            state = torch.load(model_path, map_location=device, weights_only=True)
        except Exception as error:  # weights_only refuses anything that is not plain tensors
            # torch's refusal explains its weights_only default at length; the reason comes last
            said = str(error).rpartition("WeightsUnpickler error:")[2] or str(error)
            raise UsageError(f"cannot read {model_path.name} as plain weights: {one_line(said or error)}") from None
        # A compiled model's state dict carries the "_orig_mod." prefix; the weights are the same.
        state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
        if config.arch == "classic" and LATER_KEYS & {k.partition(".")[0] for k in state}:
            raise UsageError(f"{model_path.name} holds a later nanochat's parameters (per-layer scalars, value "
                             f"embeddings) but {meta_path.name} names no window_pattern: onecard reads the classic "
                             "GPT and nanochat 92d63d4's architecture, not the versions between them")
        return state
    _load_state(model, read, model_path)
    tok_file = Path(tokenizer_path) if tokenizer_path else find_nanochat_tokenizer(checkpoint_dir)
    tokenizer = Tokenizer.load(tok_file.parent if tok_file.name == "tokenizer.pkl" else tok_file)
    if tokenizer.vocab_size != config.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}")
    return model, tokenizer, {"layout": "nanochat", "path": str(checkpoint_dir), "step": step, "meta": meta}


# ---------------------------------------------------------------- a transformers `nanochat` folder

def _model_type(config_path: Path) -> str | None:
    """config.json's model_type: transformers writes one, onecard's run config has none."""
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names; never a pickle."""
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UsageError(f"cannot read {index} ({type(error).__name__}: {error})") from None
        return [folder / shard for shard in shards]
    if (folder / "pytorch_model.bin").exists():
        raise UsageError(f"{folder} holds pytorch_model.bin, a pickle onecard does not open: save the model with "
                         "save_pretrained (safetensors, transformers' default) and try again")
    raise UsageError(f"{folder} has a transformers config.json but no model.safetensors")


def _transformers_tokenizer(path: Path, data: dict) -> Tokenizer:
    """transformers' tokenizer.json (byte-level BPE, `data` its parsed JSON) as onecard's tiktoken tokenizer."""
    ranks, specials, pattern = formats.read_hf_tokenizer(path, data)
    try:
        _check_vocabulary(ranks, specials)
        return Tokenizer(tiktoken.Encoding(name=path.parent.name or "transformers", pat_str=pattern,
                                           mergeable_ranks=ranks, special_tokens=specials))
    except ValueError as error:
        raise UsageError(f"{path} is not a tokenizer onecard can run ({error})") from None


def load_transformers(folder: Path, device: str = "cpu", tokenizer_path: str | Path | None = None
                      ) -> tuple[GPT, Tokenizer, dict]:
    """A transformers `nanochat` folder: config.json, model.safetensors (or its shards), tokenizer.json."""
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = formats.gpt_config(meta, str(folder / "config.json"))
    files = _safetensors_files(folder)
    _check_weights_fit(config, folder, files)
    model = build_model(config, device=device, init=False)

    def read() -> dict:
        state = {}
        for file in files:
            state.update({formats.onecard_name(k): v.float() for k, v in load_file(str(file), device=device).items()})
        return state
    _load_state(model, read, files[0])
    tok = Path(tokenizer_path) if tokenizer_path else folder / "tokenizer.json"
    data = _transformers_tokenizer_json(tok) if tok.is_file() and tok.suffix == ".json" else None
    if data is not None:
        tokenizer = _transformers_tokenizer(tok, data)
    elif tokenizer_path:
        tokenizer = Tokenizer.load(tok.parent if tok.name == "tokenizer.pkl" else tok)
    else:
        raise UsageError(f"{folder} has no tokenizer.json: pass --tokenizer PATH")
    if tokenizer.vocab_size != config.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}")
    return model, tokenizer, {"layout": "transformers", "path": str(folder), "meta": meta}


def _transformers_tokenizer_json(path: Path) -> dict | None:
    """The parsed tokenizer.json if it is transformers' (a `tokenizers` file), else None."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "model" in data and "pre_tokenizer" in data else None
