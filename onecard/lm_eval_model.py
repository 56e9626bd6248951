"""onecard models in EleutherAI's lm-evaluation-harness (`pip install -e '.[eval]'`).

Importing this module registers the model class under the name "onecard", so any harness task runs:

    onecard eval RUN_DIR --lm-eval hellaswag,arc_easy                  # through onecard
    python -m onecard.lm_eval_model run --model onecard --model_args pretrained=RUN_DIR --tasks hellaswag
                                                                        # the harness's own command line

The three requests the harness makes:
  loglikelihood          log P(continuation | context) and whether greedy decoding writes the
                         continuation; the context's trailing spaces move to the continuation (as the
                         harness's Hugging Face model does), every text starts after <|bos|>
  loglikelihood_rolling  log P(text), every token predicted once, with up to the model's context before it
  generate_until         greedy (or sampled, if asked) text up to the first `until` string
Scoring runs in batches of rows (onecard/scoring.py); generation one request at a time.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from onecard.errors import UsageError
from onecard.scoring import BATCH_TOKENS, Row, crop, score_rows

DEFAULT_GEN_TOKENS = 256


def pick_device(name: str | None) -> str:
    """The harness's --device (default cuda:0, on every machine) as a device this machine has; a name
    onecard does not know is a one-line UsageError."""
    import torch

    from onecard.device import resolve_device

    name = (name or "auto").lower()
    if name == "cuda" or name.startswith("cuda:"):  # the harness's names for a card, kept as it gives them
        return name if torch.cuda.is_available() else "cpu"  # as the harness's own Hugging Face model falls back
    if name == "mps":  # Apple GPUs, which `onecard eval --device mps` runs on too: passed on as before
        return name
    return resolve_device(name)


@register_model("onecard")
class OnecardLM(LM):
    """pretrained: an onecard run directory or a nanochat checkpoint directory; or pass model= and
    tokenizer= (already loaded). max_length: context the model sees (default: its training context)."""

    def __init__(self, pretrained: str | None = None, device: str | None = None, batch_tokens: int = BATCH_TOKENS,
                 max_length: int | None = None, tokenizer=None, model=None, **_harness_options) -> None:
        super().__init__()
        if model is None:
            from onecard.weights import load_weights

            if not pretrained:
                raise UsageError("the onecard model needs pretrained=RUN_DIR")
            model, tokenizer, _ = load_weights(pretrained, pick_device(device), tokenizer_path=tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.max_length = int(max_length or model.config.sequence_len)
        self.batch_tokens = int(batch_tokens)
        self._device = model.lm_head.weight.device

    # ---------------------------------------------------------------- requests

    def _pair_row(self, context: str, continuation: str) -> Row:
        spaces = len(context) - len(context.rstrip())
        if spaces:  # " world" scores as one word, not a space token then "world"
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        bos = self.tokenizer.bos_id
        ctx = [bos, *self.tokenizer.encode(context)]
        whole = [bos, *self.tokenizer.encode(context + continuation)]
        if whole[:len(ctx)] != ctx:  # the boundary merged into one token: encode the parts apart
            whole = ctx + self.tokenizer.encode(continuation)
        # the model sees at most max_length tokens before each scored one
        return crop(Row(whole, len(ctx), len(whole)), self.max_length + 1)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = [self._pair_row(*request.args) for request in requests]
        scored = score_rows(self.model, rows, self.tokenizer.bos_id, self.batch_tokens)
        return [(s.logprob, s.greedy) for s in scored]

    def rolling_rows(self, text: str) -> list[Row]:
        """Windows that predict every token of the text once, each with the most context that fits."""
        seq = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
        rows, start = [], 1
        while start < len(seq):
            end = min(start + self.max_length, len(seq))
            begin = max(0, end - self.max_length - 1)
            rows.append(Row(seq[begin:end], start - begin, end - begin))
            start = end
        return rows

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows = [self.rolling_rows(request.args[0]) for request in requests]
        flat = [row for rows in windows for row in rows]
        scored = iter(score_rows(self.model, flat, self.tokenizer.bos_id, self.batch_tokens))
        return [sum(next(scored).logprob for _ in rows) for rows in windows]

    def generate_until(self, requests) -> list[str]:
        return [self._generate(*request.args) for request in requests]

    def _generate(self, context: str, options: dict | None) -> str:
        from onecard.engine import Engine, Sampling, TextStream

        options = dict(options or {})
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(options.get("max_gen_toks", DEFAULT_GEN_TOKENS))
        temperature = float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0
        prompt = [self.tokenizer.bos_id, *self.tokenizer.encode(context)]
        # at most the model's context of prompt, and room in the rotary table for the reply
        prompt = prompt[-max(1, min(self.max_length, self.model.rotary_len - max_tokens)):]
        text, stream = "", TextStream(self.tokenizer)
        engine = Engine(self.model, self.tokenizer, tools=False)
        for step in engine.generate(prompt, Sampling(temperature=temperature, top_k=None, max_tokens=max_tokens)):
            item = step[0]
            if item is None or item[0] in engine.stop_ids:
                break
            text += stream.push(item[0])  # whole characters only: a stop string is text
            if any(stop in text for stop in until):
                break
        text += stream.flush()
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


def run_harness(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_tokens: int = BATCH_TOKENS) -> dict[str, dict]:
    """Run harness tasks on a loaded model: {task: {metric: value}} as the harness reports them."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)  # the harness's own 14,000 tasks: seconds to index
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        where = f" (with --lm-eval-include {include_path})" if include_path else ""
        raise UsageError(f"lm-evaluation-harness has no task {', '.join(map(repr, unknown))}{where}: "
                         "`lm-eval ls tasks` lists them")
    lm = OnecardLM(model=model, tokenizer=tokenizer, batch_tokens=batch_tokens)
    out = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                    bootstrap_iters=0)
    return {name: {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()
                   if isinstance(v, (int, float, str))}
            for name, metrics in (out or {}).get("results", {}).items()}


def main() -> None:
    """The harness's own command line, with the "onecard" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
