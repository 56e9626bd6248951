"""The training loop: nanochat's base-training recipe on whatever Recipe the run was given.

One optimizer step = `accum` micro-batches of (micro_batch × seq_len) tokens, so that each
step sees `total_batch` tokens. Learning rate constant then linear decay over the last 20 %;
Muon momentum warms from 0.85 to 0.95; gradients clipped at 1.0. Validation bits per byte
every `eval_every` steps.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from onecard.data import Corpus, TokenLoader
from onecard.errors import UsageError
from onecard.meters import Progress
from onecard.model import GPT, GPTConfig, build_model
from onecard.optim import build_optimizer, lr_multiplier, muon_momentum
from onecard.recipe import Recipe
from onecard.tokenizer import Tokenizer


@dataclass
class TrainSettings:
    run_dir: Path
    steps: int
    total_batch: int
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 50
    eval_batches: int = 8
    sample_tokens: int = 48
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    grad_clip: float = 1.0
    sample_prompt: str = ""


def grad_accum_steps(total_batch: int, micro_batch: int, seq_len: int) -> int:
    """Micro-batches per step; total_batch must be a whole number of micro-batches."""
    per_micro = micro_batch * seq_len
    if total_batch <= 0:
        raise UsageError(f"--total-batch must be positive, got {total_batch}")
    if total_batch % per_micro:
        lower = max(per_micro, total_batch // per_micro * per_micro)
        raise UsageError(f"--total-batch {total_batch} is not a multiple of micro-batch × seq-len = "
                         f"{micro_batch} × {seq_len} = {per_micro}: use {lower} or {lower + per_micro}")
    return total_batch // per_micro


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but this PyTorch sees no CUDA GPU: use --device cpu, "
                         "or install the CUDA build of PyTorch (see README)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}: use cpu, cuda or auto")
    return name


def autocast_for(device: str):
    """bf16 autocast on CUDA as nanochat does; plain float32 on the CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate_bpb(model: GPT, batches, token_bytes: torch.Tensor, device: str) -> float:
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
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt, prepend_bos=True)
    out = []
    for token in model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, seed=seed):
        if token == tokenizer.bos_id:
            break
        out.append(token)
    model.train(was_training)
    return prompt + tokenizer.decode(out)


def save_run(run_dir: Path, model: GPT, config: dict) -> None:
    """Weights as model.safetensors and the run's description as config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = run_dir / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(run_dir / "model.safetensors")
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def train(model_config: GPTConfig, tokenizer: Tokenizer, corpus: Corpus, recipe: Recipe,
          settings: TrainSettings, model: GPT | None = None, log=print) -> dict:
    """Train and save; returns a summary with the first and last validation bits per byte."""
    device = settings.device
    torch.manual_seed(settings.seed)
    accum = grad_accum_steps(settings.total_batch, recipe.micro_batch, recipe.seq_len)
    if recipe.seq_len > model_config.sequence_len:
        raise UsageError(f"seq-len {recipe.seq_len} exceeds the model's context {model_config.sequence_len}")
    if model is None:
        model = build_model(model_config, device=device)
    else:
        model.to(device)
    if device == "cuda":
        model.transformer.wte.to(dtype=torch.bfloat16)  # nanochat keeps the embedding in bf16
    model.set_policies(recipe.activations, recipe.loss)
    opt = build_optimizer(model, recipe, matrix_lr=settings.matrix_lr, embedding_lr=settings.embedding_lr,
                          unembedding_lr=settings.unembedding_lr)

    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / "tokenizer")
    config = {
        "model_config": model_config.to_dict(),
        "recipe": recipe.to_dict(),
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "corpus": corpus.describe(),
        "params": model.num_params(),
        "flops_per_token": model.estimate_flops(),
    }

    loader = TokenLoader(corpus, tokenizer, recipe.micro_batch, recipe.seq_len, split="train",
                         seed=settings.seed)
    token_bytes = tokenizer.token_bytes()

    def validation_bpb() -> float:
        val = TokenLoader(corpus, tokenizer, recipe.micro_batch, recipe.seq_len, split="val")
        model.eval()
        bpb = evaluate_bpb(model, (val.next_batch() for _ in range(settings.eval_batches)), token_bytes, device)
        model.train()
        return bpb

    log_path = run_dir / "log.jsonl"
    history: list[dict] = []
    first_bpb = validation_bpb()
    history.append({"step": 0, "val_bpb": first_bpb})
    log(f"step 0: validation {first_bpb:.4f} bits per byte")
    progress = Progress(settings.steps)
    tokens_seen = 0
    with log_path.open("w") as log_file:
        log_file.write(json.dumps(history[0]) + "\n")
        for step in range(settings.steps):
            started = time.perf_counter()
            opt.set_lr_multiplier(lr_multiplier(step, settings.steps))
            opt.set_muon_momentum(muon_momentum(step))
            loss_sum = 0.0
            for _ in range(accum):
                inputs, targets = loader.next_batch()
                inputs, targets = inputs.to(device), targets.to(device)
                with autocast_for(device):
                    loss = model(inputs, targets)
                (loss / accum).backward()
                opt.accumulate()
                loss_sum += loss.item()
            grad_norm = float(opt.clip_grad_norm(settings.grad_clip))
            opt.step()
            opt.zero_grad()
            elapsed = time.perf_counter() - started
            tokens_seen += settings.total_batch
            record = {"step": step + 1, "loss": loss_sum / accum, "grad_norm": grad_norm,
                      "step_time_s": elapsed, "tokens_per_s": settings.total_batch / elapsed,
                      "tokens": tokens_seen}
            last = step + 1 == settings.steps
            if last or (settings.eval_every > 0 and (step + 1) % settings.eval_every == 0):
                record["val_bpb"] = validation_bpb()
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            history.append(record)
            progress.update(step + 1, record)
    progress.close()
    last_bpb = history[-1]["val_bpb"]
    sample = sample_text(model, tokenizer, settings.sample_prompt,
                         settings.sample_tokens, seed=settings.seed)
    config["results"] = {"val_bpb_start": first_bpb, "val_bpb_end": last_bpb, "steps": settings.steps,
                         "tokens": tokens_seen, "sample": sample}
    save_run(run_dir, model, config)
    return {"model": model, "val_bpb_start": first_bpb, "val_bpb_end": last_bpb, "sample": sample,
            "history": history, "run_dir": run_dir}
