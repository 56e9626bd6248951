"""Running a trained model: the KV-cache engine (prefill once, decode several samples, the
calculator tool, text streamed at whole characters), and scoring text in bits per byte.

Tool use as nanochat's: when a sample writes <|python_start|> … <|python_end|>, the engine hands
the expression to the calculator (onecard/calculator.py) and forces
<|output_start|>result<|output_end|> into that sample's stream; the model goes on from there.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from onecard.calculator import calculate
from onecard.device import autocast_for
from onecard.errors import UsageError
from onecard.model import GPT, KVCache
from onecard.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_bpb(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                 device: str) -> float:
    """Bits per byte: summed cross-entropy (nats) over the bytes the targets stand for.

    Special tokens (0 bytes) and ignored targets (-1) count neither loss nor bytes, so the figure
    does not depend on the vocabulary size.
    """
    was_training = model.training
    model.eval()
    try:
        return _bpb(model, batches, token_bytes, device)
    finally:
        model.train(was_training)


def first_rows(source, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `rows` rows of a batch source (a loader), in its batches, the last one cut: the
    same rows whatever the source's batch size, where its rows do not depend on it."""
    while rows > 0:
        inputs, targets = source.next_batch()
        yield inputs[:rows], targets[:rows]
        rows -= inputs.size(0)


def _bpb(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
         device: str) -> float:
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




def cache_bytes(model: GPT, prompt_tokens: int, new_tokens: int, samples: int) -> int:
    """About the most memory one generate() call holds beyond the weights: while prefilling, the
    prompt's cache and one block's working set (residual, norm, q/k/v, attention output, the MLP's
    4x-wide hidden and its activation: 14 x n_embd values a token, counted at 4 bytes); then the
    prompt's cache beside the samples' caches, and their logits and probabilities (3 x vocabulary)."""
    c = model.config
    position = 2 * c.n_layer * c.n_kv_head * c.head_dim * model.lm_head.weight.element_size()  # K and V
    prefill = prompt_tokens * (position + 14 * c.n_embd * 4)
    decode = position * (prompt_tokens + samples * (prompt_tokens + new_tokens)) + samples * 3 * c.vocab_size * 4
    return max(prefill, decode)


@dataclass
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 50
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 256
    seed: int = 0


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> list[int]:
    """(B, vocab) float logits -> B token ids, read to the host in one transfer (one sync per token)."""
    finite = torch.isfinite(logits).all(dim=-1)
    # a damaged row is drawn from zeros instead (nan would be noise, and on CUDA a device-side assert),
    # then reported with the tokens: checking first would cost a second sync per token
    tokens = _draw(logits.masked_fill(~finite[:, None], 0.0), sampling, generator)
    tokens = tokens.masked_fill(~finite, -1).tolist()
    if -1 in tokens:
        raise UsageError("the model's logits are not finite numbers: its weights are damaged")
    return tokens


def _draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.temperature < torch.finfo(torch.float32).tiny:  # 0, or too small for fp32: its limit
        return logits.argmax(dim=-1)
    # the best token at 0 before dividing: a tiny temperature sends the others to -inf, never to nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
        cut = before >= sampling.top_p
        cut[:, 0] = False  # the most likely token always stays (a top_p that rounds to 0 in fp32)
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Row:
    """One sample's state: the tokens of a python block being written, tokens to force next."""
    python: list[int] | None = None
    forced: list[int] = field(default_factory=list)
    done: bool = False


class TextStream:
    """Token ids in, text out only at whole UTF-8 characters (a token may end mid-character)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class Engine:
    """Decoding with a KV cache: the prompt is run once, then `num_samples` samples go on from it
    in one batch, each stopping at a stop token or max_tokens."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, tools: bool = True) -> None:
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        special = tokenizer.special_id
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.bos_id}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _cache(self, batch: int, length: int) -> KVCache:
        weight = self.model.lm_head.weight
        return KVCache(self.model.config, batch, length, weight.device, weight.dtype)

    def _forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        with autocast_for(self.model.lm_head.weight.device.type):  # the head on the last position alone
            return self.model.logits(self.model.trunk(ids, cache)[:, -1:, :])[:, -1, :].float()

    @torch.inference_mode()
    def generate(self, prompt: list[int], sampling: Sampling, num_samples: int = 1
                 ) -> Iterator[list[tuple[int, bool] | None]]:
        """Yield, each step, one (token, forced) per sample, or None for a sample that has stopped."""
        if not prompt:
            raise ValueError("generate needs at least one prompt token")
        room = self.model.rotary_len - len(prompt)
        steps = min(sampling.max_tokens, room)
        if steps <= 0:
            raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room to generate")
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._decode(prompt, sampling, num_samples, steps)
        finally:
            self.model.train(was_training)

    def _decode(self, prompt: list[int], sampling: Sampling, num_samples: int, steps: int):
        device = self.model.lm_head.weight.device
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
        prefill = self._cache(1, len(prompt))
        logits = self._forward(torch.tensor([prompt], dtype=torch.long, device=device), prefill)
        cache = self._cache(num_samples, len(prompt) + steps)
        cache.k[:, :, :, :len(prompt)] = prefill.k  # one prefill, copied to every sample
        cache.v[:, :, :, :len(prompt)] = prefill.v
        cache.pos = len(prompt)
        if prefill.prev_embedding is not None:  # nanochat-2026's smear reads the last prompt token
            cache.prev_embedding = prefill.prev_embedding.expand(num_samples, -1, -1)
        del prefill  # its memory goes back before decoding
        logits = logits.expand(num_samples, -1)
        rows = [Row() for _ in range(num_samples)]
        for _ in range(steps):
            sampled = sample_next(logits, sampling, generator)
            out = [self._advance(row, token) for row, token in zip(rows, sampled, strict=True)]
            yield out
            if all(row.done for row in rows):
                return
            tokens = [o[0] if o else self.tokenizer.bos_id for o in out]
            logits = self._forward(torch.tensor(tokens, dtype=torch.long, device=device)[:, None], cache)

    def _advance(self, row: Row, sampled: int) -> tuple[int, bool] | None:
        """The token this sample takes: a forced one first, else the sampled one; tool calls run here."""
        if row.done:
            return None
        forced = bool(row.forced)
        token = row.forced.pop(0) if forced else sampled
        if not forced and token in self.stop_ids:
            row.done = True
        elif self.tools and token == self.python_start:
            row.python = []
        elif self.tools and token == self.python_end and row.python is not None:
            result = calculate(self.tokenizer.decode(row.python))
            row.python = None
            if result is not None:
                row.forced = [self.output_start, *self.tokenizer.encode(result), self.output_end]
        elif row.python is not None:
            row.python.append(token)
        return token, forced

    def complete(self, prompt: list[int], sampling: Sampling, num_samples: int = 1,
                 on_text: Callable[[int, str], None] | None = None) -> list[list[int]]:
        """Every sample's tokens (stop token left out); on_text(sample, text) streams them as text."""
        outputs: list[list[int]] = [[] for _ in range(num_samples)]
        streams = [TextStream(self.tokenizer) for _ in range(num_samples)]
        for step in self.generate(prompt, sampling, num_samples):
            for i, item in enumerate(step):
                if item is None or (item[0] in self.stop_ids and not item[1]):
                    continue
                outputs[i].append(item[0])
                if on_text:
                    text = streams[i].push(item[0])
                    if text:
                        on_text(i, text)
        if on_text:
            for i, stream in enumerate(streams):
                tail = stream.flush()
                if tail:
                    on_text(i, tail)
        return outputs


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    """The prompt and its continuation (a base model: no tools), up to max_tokens or a bos token."""
    engine = Engine(model, tokenizer, tools=False)
    sampling = Sampling(temperature=temperature, top_k=top_k, max_tokens=max_tokens, seed=seed)
    ids = tokenizer.encode(prompt, prepend_bos=True)
    ids = ids[-max(1, model.rotary_len - max_tokens):]
    return prompt + tokenizer.decode(engine.complete(ids, sampling)[0])
