"""`onecard plan --target gpt2`: how fast this card can train a model that beats GPT-2's CORE,
by replaying nanochat's published "time to GPT-2" runs (model, tokens:params ratio) on it.

The CORE a run reaches is nanochat's published result on 8xH100, not an onecard measurement: the
planner only predicts the memory, time, energy and cost of training the same model on the same
number of tokens here. Sources (karpathy/nanochat):
- README.md leaderboard table: run 6, commit a825e63 (Mar 14 2026), 1.65 h on 8xH100, CORE 0.2626,
  val bpb 0.71800 ("autoresearch round 2"); GPT-2's CORE 0.256525 (dev/LEADERBOARD.md).
  That run 6 is d24 at ratio 8 is what onecard was told of it; the run's command line could not
  be read in a public source (not verified), and the output says so.
- dev/LEADERBOARD.md (at commit 00932d1): d26 ratio 8.25, batch 1,048,576, fp8, CORE 0.26024
  (commit 2c062aa); d26 ratio 8.5, batch 524,288, fp8, CORE 0.2578 (commit a67eba3). These two
  predate the 92d63d4 architecture and the ClimbMix data (README table, run 4): their CORE may
  differ with today's code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from onecard.model_config import ARCH_2026, VOCAB_2026, GPTConfig, scaling_params
from onecard.plan.search import Candidate, Settings, candidates, fastest_fit, whole_steps
from onecard.schedule_2026 import auto_total_batch
from onecard.units import format_duration

GPT2_CORE = 0.256525  # GPT-2 (1.6B) CORE, nanochat dev/LEADERBOARD.md


@dataclass(frozen=True)
class Run:
    depth: int
    ratio: float  # training tokens per scaling parameter (transformer matrices + lm_head)
    core: float
    commit: str
    note: str
    total_batch: int | None = None  # None: nanochat's automatic batch for the depth


RUNS = (
    Run(24, 8.0, 0.2626, "a825e63",
        "leaderboard run 6, 1.65 h on 8xH100 (its depth and ratio not verified in a public source)"),
    Run(26, 8.25, 0.26024, "2c062aa", "dev/LEADERBOARD.md, fp8, 2.76 h on 8xH100", 1_048_576),
    Run(26, 8.5, 0.2578, "a67eba3", "dev/LEADERBOARD.md, fp8, 2.91 h on 8xH100", 524_288),
)


@dataclass(frozen=True)
class Option:
    run: Run
    config: GPTConfig
    settings: Settings
    tokens: int
    candidates: list[Candidate]
    best: Candidate | None


def options(s: Settings, names: list[str] | None = None) -> list[Option]:
    """Each published run on this card: every recipe (or just `names`), and the fastest that fits (or None)."""
    out = []
    for run in RUNS:
        config = GPTConfig.from_depth(run.depth, VOCAB_2026, 2048, arch=ARCH_2026)
        batch = run.total_batch or auto_total_batch(config)
        rs = replace(s, seq_len=2048, vocab_size=VOCAB_2026, arch=ARCH_2026, total_batch=batch)
        tokens = whole_steps(run.ratio * scaling_params(config), batch)  # whole steps, as `onecard train` runs
        cands = candidates(config, rs, tokens, names=names)
        out.append(Option(run, config, rs, tokens, cands, fastest_fit(cands)))
    return out


def fastest(opts: list[Option]) -> Option | None:
    fitting = [o for o in opts if o.best is not None]
    return min(fitting, key=lambda o: o.best.time_s) if fitting else None


def summary_lines(opts: list[Option], where: str = "this card") -> list[str]:
    lines = [f"Beat GPT-2 (CORE {GPT2_CORE}) with nanochat-2026 (nanochat 92d63d4), replaying nanochat's "
             "published runs. The CORE is nanochat's published result on 8xH100, not an onecard measurement;",
             f"onecard predicts only the time, energy and cost of the same model and tokens on {where}.", ""]
    for o in opts:
        head = (f"  d{o.run.depth} ratio {o.run.ratio:g}: {o.tokens:,} tokens, batch {o.settings.total_batch:,}; "
                f"CORE {o.run.core} (nanochat {o.run.commit}, {o.run.note})")
        if o.best is None:
            lines += [head, f"      no recipe fits {where}"]
        else:
            b = o.best
            lines += [head, f"      {b.recipe.name}, micro-batch {b.recipe.micro_batch}: "
                            f"{b.memory.total / 2**30:.2f} GiB, {format_duration(b.time_s)}, "
                            f"{b.energy_kwh:,.0f} kWh, {b.cost:,.2f} {o.settings.currency}"]
    return lines
