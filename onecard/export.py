"""`onecard export RUN_DIR --to hf|nanochat OUT_DIR`: a trained model in Hugging Face transformers'
`nanochat` format or in nanochat's own checkpoint layout, so that it is not locked in onecard.

  --to hf        config.json (model_type nanochat), model.safetensors in transformers' names,
                 generation_config.json, tokenizer.json + tokenizer_config.json with the chat template
  --to nanochat  a nanochat base directory: tokenizer/{tokenizer.pkl,token_bytes.pt} and
                 <phase>_checkpoints/d<depth>/{model,meta}_<step>.* (NANOCHAT_BASE_DIR=OUT_DIR)

The source may be anything `onecard sample` reads: an onecard run, a nanochat checkpoint directory
or a transformers nanochat folder, so the command also converts between the other two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onecard import durable
from onecard.args import text_arg
from onecard.errors import UsageError, one_line
from onecard.run import NANOCHAT_PHASE_DIRS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", type=text_arg,
                   help="an onecard run directory (or a nanochat checkpoint directory, or a transformers nanochat "
                        "folder)")
    p.add_argument("out_dir", metavar="OUT_DIR", type=text_arg,
                   help="the folder to write; it must not exist or be empty")
    p.add_argument("--to", required=True, choices=("hf", "nanochat"),
                   help="hf: Hugging Face transformers' nanochat format; nanochat: nanochat's checkpoint layout")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights as stored (default fp32; bf16 halves the files)")
    p.add_argument("--force", action="store_true", help="write into OUT_DIR although it holds files "
                                                        "(files of the same name are replaced)")
    p.add_argument("--phase", choices=tuple(NANOCHAT_PHASE_DIRS), help="nanochat: which <phase>_checkpoints folder "
                                                              "(default sft for a chat model, else base)")
    p.add_argument("--tokenizer", type=text_arg, help="tokenizer.pkl or directory, for a nanochat checkpoint "
                                                      "kept elsewhere")


def check_out_dir(out: Path, source: Path, force: bool) -> None:
    """Refuse before any work: OUT_DIR a file, the source or a folder above it (--force would replace the
    run's own config.json and weights), or holding files without --force."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder: choose another OUT_DIR")
    if out.resolve() == source.resolve():
        raise UsageError(f"{out} is the model being exported: choose another OUT_DIR")
    if out.resolve() in source.resolve().parents:
        raise UsageError(f"{out} holds the model being exported ({source}): choose another OUT_DIR")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty: choose another OUT_DIR or add --force")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot write {out}: {blocker} is a file, not a folder")


def run(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from onecard.checkpoint import as_os_error
    from onecard.weights import load_weights

    source, out = Path(args.run_dir), Path(args.out_dir)
    if args.phase and args.to != "nanochat":  # said rather than ignored: transformers has no phase folders
        raise UsageError(f"--phase {args.phase} is for --to nanochat (its <phase>_checkpoints folders); "
                         "--to hf writes one folder")
    check_out_dir(out, source, args.force)
    model, tokenizer, info = load_weights(source, "cpu", tokenizer_path=args.tokenizer)
    try:
        if args.to == "hf":
            written = write_hf(out, model, tokenizer, args.dtype, default_phase(info))
        else:
            written = write_nanochat(out, model, tokenizer, args.dtype, args.phase or default_phase(info),
                                     source_step(info), info)
    except (OSError, SafetensorError, RuntimeError) as error:  # safetensors and torch.save: a full disk their way
        error = error if isinstance(error, OSError) else as_os_error(error, out, 1)
        where = error.filename2 or error.filename or out  # the file that failed (a rename's target)
        raise UsageError(f"cannot write {where}: {error.strerror or error}") from None
    print(f"wrote {len(written)} files to {out}:")
    for path in written:
        print(f"  {path.relative_to(out)}")
    print(usage_hint(out, args.to, written))
    return 0


def default_phase(info: dict) -> str:
    from onecard.run import model_phase

    return model_phase(info["path"]) or "base"


def source_step(info: dict) -> int:
    """The step the weights are from: nanochat names its files by it and loads the highest."""
    if info["layout"] == "onecard":
        return weights_step(Path(info["path"]), info["config"].results)
    return int(info.get("step") or 0)


def weights_step(path: Path, results: dict | None) -> int:
    """A checkpoint's step from its state.json; final weights' from their own metadata, or (files written
    before they carried it) from the results of a finished run, which a resume clears until it finishes."""
    import json

    from safetensors import safe_open
    try:
        if (path / "state.json").is_file():
            return int(json.loads((path / "state.json").read_text())["step"])
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            written = (f.metadata() or {}).get("step") or (results or {}).get("steps")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"cannot tell which step the weights in {path} are from ({one_line(error)})") from None
    if written is None:
        raise UsageError(f"cannot tell which step the weights in {path} are from (a resumed run that has not "
                         "finished): export one of its checkpoints, RUN_DIR/checkpoints/step_N")
    return int(written)


def usage_hint(out: Path, target: str, written: list[Path]) -> str:
    if target == "hf":
        return (f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
                f"AutoTokenizer.from_pretrained({str(out)!r})")
    import shlex

    # absolute: nanochat's scripts run from its own checkout
    return (f"use it with nanochat: NANOCHAT_BASE_DIR={shlex.quote(str(out.resolve()))} "
            f"(its loader reads {written[0].parent.relative_to(out)})")


# ---------------------------------------------------------------- the writers

def _write_json(path: Path, data: dict, ascii_only: bool = False) -> Path:
    import json

    text = json.dumps(data, indent=2, ensure_ascii=ascii_only) + "\n"
    return durable.write_via_temporary(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _weights(model, dtype: str) -> dict:
    import torch

    wanted = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {name: tensor.detach().to(wanted).contiguous() for name, tensor in model.state_dict().items()
            if name not in ("cos", "sin")}  # the rotary tables are computed, not stored, everywhere


def write_hf(out: Path, model, tokenizer, dtype: str, phase: str = "base") -> list[Path]:
    """config.json goes first and comes back last: it is what makes the folder a model, to transformers
    and to onecard, so an export cut short leaves one that neither takes for whole."""
    from onecard import eval_results, formats

    ranks, specials = formats.tokenizer_ranks(tokenizer.enc)
    config = formats.hf_config(model.config, specials, dtype)  # first: it refuses what transformers lacks
    config["onecard_phase"] = phase  # base or chat: transformers keeps unknown keys; onecard's loaders read it
    state = {formats.hf_name(name): tensor for name, tensor in _weights(model, dtype).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # --force over an older export
    (out / eval_results.FILE).unlink(missing_ok=True)  # its scores: the next eval would merge them with these
    weights = durable.write_via_temporary(out / "model.safetensors",
                                          lambda tmp: durable.save_tensors(state, tmp, metadata={"format": "pt"}))
    seq_len = model.config.sequence_len
    written = [
        _write_json(out / "generation_config.json", formats.generation_config(specials)),
        weights,
        _write_json(out / "tokenizer.json", formats.hf_tokenizer_json(ranks, specials, tokenizer.enc._pat_str)),
        _write_json(out / "tokenizer_config.json", formats.hf_tokenizer_config(seq_len)),
    ]
    return [_write_json(out / "config.json", config), *written]


def write_nanochat(out: Path, model, tokenizer, dtype: str, phase: str, step: int, info: dict) -> list[Path]:
    """The tokenizer first and meta_<step>.json last: both loaders need the meta beside the weights, so
    an export cut short leaves no model that either takes for whole."""
    import torch

    from onecard import eval_results

    folder = out / NANOCHAT_PHASE_DIRS[phase] / f"d{model.config.n_layer}"
    model_path, meta_path = folder / f"model_{step:06d}.pt", folder / f"meta_{step:06d}.json"
    check_nanochat_out(out, model_path, tokenizer)
    tok_dir = out / "tokenizer"
    tokenizer.save(tok_dir)  # tokenizer.pkl is what nanochat reads; tokenizer.json is onecard's
    # token_bytes.pt: UTF-8 bytes per token (0 for specials), nanochat's bits-per-byte evaluation reads it
    durable.write_via_temporary(tok_dir / "token_bytes.pt",
                                lambda tmp: torch.save(tokenizer.token_bytes().to(torch.int32), tmp))
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # --force over an older export of this step
    (folder / eval_results.FILE).unlink(missing_ok=True)  # the scores of the model this one replaces
    durable.write_via_temporary(model_path, lambda tmp: torch.save(_weights(model, dtype), tmp))
    # nanochat's GPTConfig has no `arch`: its code is the architecture (the classic at fae3aca,
    # nanochat-2026 from 92d63d4 on, which reads window_pattern)
    model_config = {k: v for k, v in model.config.to_dict().items() if k != "arch"}
    meta = {"step": step, "model_config": model_config, "user_config": {},
            "onecard": {"exported_from": info["path"], "layout": info["layout"]}}
    _write_json(meta_path, meta, ascii_only=True)  # nanochat opens it in the locale's encoding, not UTF-8
    return [model_path, meta_path, tok_dir / "tokenizer.pkl", tok_dir / "token_bytes.pt", tok_dir / "tokenizer.json"]


def check_nanochat_out(out: Path, model_path: Path, tokenizer) -> None:
    """Refuse what --force would leave wrong: nanochat loads a folder's highest step, so a higher one
    there would hide this one; and every model under OUT_DIR reads OUT_DIR/tokenizer."""
    from onecard import formats
    from onecard.tokenizer import Tokenizer
    from onecard.weights import NANOCHAT_MODEL

    def step(path: Path) -> int:
        found = NANOCHAT_MODEL.match(path.name)
        return int(found.group(1)) if found else -1

    others = sorted(p for p in out.glob("*_checkpoints/*/model_*.pt") if p != model_path)
    beside = [p.name for p in others if p.parent == model_path.parent and step(p) > step(model_path)]
    if beside:
        raise UsageError(f"{model_path.parent} holds {beside[-1]}, which nanochat would load instead of "
                         f"{model_path.name}: choose another OUT_DIR or remove it")
    if not others or not (out / "tokenizer").is_dir():
        return
    try:
        held = Tokenizer.load(out / "tokenizer")
    except UsageError:  # damaged: nothing there reads it
        return
    if formats.tokenizer_ranks(held.enc) != formats.tokenizer_ranks(tokenizer.enc):
        raise UsageError(f"{out / 'tokenizer'} is another tokenizer, which {others[0].relative_to(out)} reads: "
                         "choose another OUT_DIR")
