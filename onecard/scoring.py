"""Scoring fixed token sequences with a model, many at a time: the log-probabilities of a span of
each sequence given what comes before it, and whether greedy decoding would have written that span.

Every evaluation that compares likelihoods (CORE's multiple-choice, schema and language-modelling
tasks, the letters of ARC and MMLU, lm-evaluation-harness's loglikelihood) is built on this. Rows
of similar length go into one forward pass, right-padded (padding after a row never changes its
causal logits); the head runs only at the scored positions, so a 65,536-token vocabulary costs
memory for the span, not for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onecard.device import autocast_for
from onecard.model import GPT

BATCH_TOKENS = 16_384  # tokens (rows x padded length) per forward pass


@dataclass(frozen=True)
class Row:
    """Score tokens[start:end], each given every token before it. 1 <= start <= end <= len(tokens)."""
    tokens: list[int]
    start: int
    end: int


@dataclass
class Scored:
    losses: torch.Tensor  # (end - start,) float32 cross-entropy in nats, on the CPU
    greedy: bool  # the argmax at every scored position is the token that follows

    @property
    def logprob(self) -> float:
        return -float(self.losses.double().sum())


def crop(row: Row, max_len: int) -> Row:
    """The row cut from the left to at most max_len tokens (the model cannot see further back);
    at least one token stays before the span."""
    cut = len(row.tokens) - max_len
    if cut <= 0:
        return row
    start = max(row.start - cut, 1)
    return Row(row.tokens[cut:], start, max(row.end - cut, start))


def batches(rows: Sequence[Row], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of rows, grouped so that rows x longest row stays within batch_tokens (one row
    at least); sorted by length, longest first, so that a batch pads little and memory peaks early."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    group: list[int] = []
    for i in order:
        longest = len(rows[group[0]].tokens) if group else len(rows[i].tokens)
        if group and longest * (len(group) + 1) > batch_tokens:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


@torch.inference_mode()
def score_rows(model: GPT, rows: Sequence[Row], pad_id: int, batch_tokens: int = BATCH_TOKENS,
               on_batch: Callable[[int], None] | None = None) -> list[Scored]:
    """Each row's per-token losses over its span and whether greedy decoding reproduces it.

    Rows longer than the model's rotary table are cropped from the left first. on_batch(n) is
    called after each forward pass with the number of rows it scored (for a progress bar).
    """
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    rows = [crop(row, model.rotary_len) for row in rows]
    out: list[Scored | None] = [None] * len(rows)
    try:
        for group in batches(rows, batch_tokens):
            for i, scored in zip(group, _score_batch(model, [rows[i] for i in group], pad_id, device), strict=True):
                out[i] = scored
            if on_batch:
                on_batch(len(group))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _score_batch(model: GPT, rows: list[Row], pad_id: int, device: torch.device) -> list[Scored]:
    width = max(len(row.tokens) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
    ids = ids.to(device)
    with autocast_for(device.type):
        hidden = model.trunk(ids)
        # position t predicts token t + 1: the span [start, end) is predicted at [start - 1, end - 1)
        picked = torch.cat([hidden[b, row.start - 1:row.end - 1] for b, row in enumerate(rows)])
        logits = model.logits(picked).float()
    targets = torch.cat([ids[b, row.start:row.end] for b, row in enumerate(rows)])
    losses = F.cross_entropy(logits, targets, reduction="none").cpu()
    hits = (logits.argmax(dim=-1) == targets).cpu()
    out, at = [], 0
    for row in rows:
        n = row.end - row.start
        out.append(Scored(losses[at:at + n], bool(hits[at:at + n].all())))
        at += n
    return out
