"""Which card a plan is for, which recipe a run executes, and the forecast it carries.

Plain values in, plain values out: the command line converts its flags into a `RecipeRequest`,
and the runtime hands in what it probed (the local card, free host RAM, why a recipe cannot run
here), so the planner stays analytic. `onecard train --gpu NAME` / `--vram GB` (or a CUDA card,
detected) asks for the fastest recipe that fits; `--recipe NAME` and the per-field flags
(--activations, --loss, ...) override it. Without a card (a CPU run) the recipe is the named
one or baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

from onecard import defaults
from onecard.errors import UsageError
from onecard.model_config import GPTConfig
from onecard.plan import calibrate
from onecard.plan.assumptions import DEFAULT, Assumptions
from onecard.plan.catalog import CATALOG, GPU, GPUS, GiB, find_gpu, with_vram
from onecard.plan.search import Candidate, Settings, check_batch, evaluate, pick_recipe
from onecard.recipe import Recipe, default_micro_batch, named_recipe
from onecard.units import finite_number

WhyNot = Callable[[Recipe], "str | None"]


@dataclass
class RecipeRequest:
    """What the user asked of the recipe: a named one, per-field overrides, a card to fit."""
    recipe: str | None = None
    overrides: dict = field(default_factory=dict)
    gpu: str | None = None
    vram_gib: float | None = None
    dry_run: bool = False
    power_watts: float | None = None
    price: float | None = None  # per kWh, and its currency: the plan's cost (defaults where not given)
    currency: str | None = None
    compile_by_default: bool = False  # CUDA runs compile unless --no-compile (not counted as a request)
    assume: list[str] | None = None  # --assume NAME=VALUE pairs, as `onecard plan` takes them

    @property
    def asked(self) -> bool:
        return bool(self.recipe or self.overrides or self.gpu or self.vram_gib is not None)


@dataclass
class Prediction:
    """The planner's forecast a run stores (config.json, summary.json) and sets beside what it measures."""
    gpu: str
    recipe: str
    peak_bytes: int
    peak_allocated_bytes: int
    memory: dict
    host_bytes: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    source: str = "onecard plan (predict_memory, predict_time)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Prediction | None:
        """None for no forecast or one this version cannot read (the run goes on without it)."""
        if not isinstance(data, dict):
            return None
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None


@dataclass
class Choice:
    recipe: Recipe
    candidate: Candidate | None = None  # the planner's view, where there is a card to plan for
    settings: Settings | None = None
    notes: list[str] = field(default_factory=list)

    def prediction(self, device: str) -> Prediction | None:
        """Only for a CUDA run: the measurement must be of the card predicted for."""
        c = self.candidate
        if c is None or device != "cuda":
            return None
        return Prediction(gpu=self.settings.gpu.name, recipe=c.recipe.name, peak_bytes=c.memory.total,
                          peak_allocated_bytes=c.memory.allocated, memory=c.memory.components(),
                          host_bytes=c.memory.host, step_time_s=c.timing.step_s,
                          tokens_per_s=c.timing.tokens_per_s, mfu=c.timing.mfu)


def choose_gpu(name: str | None, vram_gib: float | None, local: tuple | None) -> tuple[GPU, list[str]]:
    """The card named (--gpu), else the local one (name, bytes[, bytes other processes hold]) as the
    catalog knows it, less what others hold; --vram resizes it."""
    if name:
        gpu, note = find_gpu(name)
    elif local is not None:
        local_name, total, *others = local
        held = others[0] if others else 0
        try:
            gpu, _ = find_gpu(local_name)
        except UsageError:
            raise UsageError(f"this machine's GPU ({local_name}) is not in the catalog: name the closest one "
                             f"with --gpu and give --vram {total / GiB:.0f}"
                             + _same_architecture(local_name, others[1] if len(others) > 1 else None, total)) from None
        gpu = replace(gpu, vram_gib=round((total - held) / GiB, 2))
        note = f"detected {local_name} ({total / GiB:.1f} GiB) on this machine"
        if held >= GiB / 20:  # a desktop's display takes a few hundred MB: a fit to the last 0.1 GiB would fail
            note += (f"; other processes hold {held / GiB:.2f} GiB of it (a display, another program): planned for "
                     f"the {gpu.vram_gib:.2f} GiB left")
    else:
        raise UsageError(f"no CUDA GPU on this machine: name one with --gpu (known: {', '.join(sorted(CATALOG))})")
    if vram_gib is not None:
        gpu = with_vram(gpu, vram_gib)
    return gpu, [note] if note else []


def _same_architecture(name: str, capability: tuple[int, int] | None, total: int) -> str:
    """The catalog's cards of a compute capability, GeForce cards first for a GeForce card (their
    tensor rate with fp32 accumulation is half the others'), then nearest in memory: for --gpu."""
    if capability is None:
        return ""
    geforce = "geforce" in name.lower()
    same = sorted((g for g in GPUS if g.compute_capability == tuple(capability)),
                  key=lambda g: ((g.kind == "datacenter") == geforce, abs(g.vram_bytes - total)))
    sm = f"sm_{capability[0]}{capability[1]}"
    if not same:
        return f" (the catalog has no card of its architecture, {sm})"
    return f" (the catalog's {sm} cards, nearest in memory first: {', '.join(g.key for g in same[:6])})"


def _positive(value, most: float = 100.0) -> bool:
    """A usable number from a calibration file (which a user may have edited)."""
    number = finite_number(value)
    return number is not None and 0 < number <= most


def build_settings(gpu: GPU, notes: list[str], *, gpus: int = 1, seq_len: int, total_batch: int,
                   micro_batch: int | None, vocab_size: int, mfu: float | None = None, power: float | None = None,
                   price: float = defaults.PRICE, currency: str = defaults.CURRENCY,
                   assume: Assumptions = DEFAULT, compile: bool = True) -> Settings:
    """Planner settings for a card, using its `onecard bench` calibration unless --mfu/--power say
    otherwise (appends what it used to `notes`)."""
    floor = assume.cuda_context_bytes + assume.workspace_bytes
    if gpu.vram_bytes <= floor:
        raise UsageError(f"--vram {gpu.vram_gib:g} GiB is below what the CUDA context and workspace take "
                         f"({floor / GiB:.2f} GiB): nothing can train there")
    utilization, source = mfu, "given with --mfu" if mfu is not None else ""
    factor = 1.0
    cal = calibrate.load(gpu.key)
    if cal and mfu is None:
        train = cal["train"] if isinstance(cal.get("train"), dict) else {}
        recipe = train.get("recipe", cal.get("recipe", "?"))
        measured = (f"measured by `onecard bench` on {str(cal.get('date', '?'))[:10]} (d{train.get('depth', '?')}, "
                    f"recipe {recipe}, micro-batch {train.get('micro_batch', '?')})")
        if _positive(cal.get("speed_factor")):  # the model, scaled to what this card measured
            factor, source = cal["speed_factor"], measured
            notes.append(f"using calibration from {calibrate.calibration_path()}: this card ran "
                         f"{factor:.2f}x the modelled speed")
        elif _positive(cal.get("mfu"), most=1.0):  # a record from before bench measured against the model
            utilization, source = cal["mfu"], measured
            notes.append(f"using calibration from {calibrate.calibration_path()}: MFU {utilization:.1%}")
    if cal and power is None and _positive(cal.get("power_watts"), most=10_000):  # far above any card: a typo
        power = cal["power_watts"]
        notes.append(f"board power {power:.0f} W as measured by `onecard bench`")
    s = Settings(gpu=gpu, gpus=gpus, seq_len=seq_len, total_batch=total_batch, micro_batch=micro_batch,
                 vocab_size=vocab_size, utilization=utilization, utilization_source=source, power_watts=power,
                 price=price, currency=currency, assume=assume, compile=compile, speed_factor=factor)
    check_batch(s)
    return s


def _card_for(request: RecipeRequest, device: str, local: tuple[str, int] | None) -> tuple[GPU | None, list[str]]:
    """The card to fit to, or None where none was asked for and this run has none the catalog knows."""
    asked = request.gpu or request.vram_gib is not None
    if not asked and device != "cuda":
        return None, []
    try:
        return choose_gpu(request.gpu, request.vram_gib, local)
    except UsageError as error:
        if asked:
            raise
        return None, [f"{error}; without it there is no prediction and the recipe is not fitted"]


def choose_recipe(request: RecipeRequest, config: GPTConfig, device: str, **kwargs) -> Choice:
    """The recipe this run executes (see _choose); compiled by default where the request says so."""
    choice = _choose(request, config, device, **kwargs)
    if request.compile_by_default and "compile" not in request.overrides and not choice.recipe.compile:
        choice.recipe = choice.recipe.with_(compile=True)
        choice.notes.append("torch.compile on (the default on CUDA; --no-compile for eager)")
    return choice


def _choose(request: RecipeRequest, config: GPTConfig, device: str, *, seq_len: int,
                  micro_batch: int | None, total_batch: int, tokens: int, resumed: Recipe | None = None,
                  gpus: int = 1, local: tuple[str, int] | None = None, host_bytes: int | None = None,
                  why_not: WhyNot | None = None) -> Choice:
    """The recipe this run executes. micro_batch None lets the planner pick the largest that fits
    (without a card: 8). A resumed run keeps its recipe unless the command line asks otherwise.
    `why_not(recipe)` says why this machine cannot run a recipe; a dry run plans for the card
    named whatever this machine can run."""
    why_not = why_not or (lambda recipe: None)
    gpu, notes = _card_for(request, device, local)
    if gpu is None:
        if resumed and not request.asked:
            return Choice(resumed.with_(seq_len=seq_len, micro_batch=micro_batch or resumed.micro_batch), notes=notes)
        micro_batch = micro_batch or default_micro_batch(total_batch / (seq_len * gpus), 8)
        recipe = named_recipe(request.recipe or "baseline", seq_len=seq_len, micro_batch=micro_batch)
        recipe = recipe.overridden(**request.overrides)
        reason = why_not(recipe)
        if reason:
            raise UsageError(f"recipe {recipe.name} cannot run here: {reason}")
        return Choice(recipe, notes=notes)

    # compiled where this run compiles (CUDA), and for a dry run that plans for a card
    compiled = request.overrides.get("compile", device == "cuda" or request.dry_run)
    s = build_settings(gpu, notes, gpus=gpus, seq_len=seq_len, total_batch=total_batch, micro_batch=micro_batch,
                       vocab_size=config.vocab_size, power=request.power_watts, compile=compiled,
                       price=defaults.PRICE if request.price is None else request.price,
                       currency=request.currency or defaults.CURRENCY,
                       assume=DEFAULT.with_overrides(request.assume))
    if resumed and not request.asked:
        recipe = resumed.with_(seq_len=seq_len, micro_batch=micro_batch or resumed.micro_batch)
        planned = evaluate(config, recipe, replace(s, micro_batch=recipe.micro_batch, compile=recipe.compile), tokens)
        return Choice(recipe, planned, s, notes)
    name = request.recipe.strip().lower() if request.recipe else None
    candidate = pick_recipe(config, s, tokens, name, request.overrides, host_bytes,
                            why_not=None if request.dry_run else why_not)
    how = f"recipe {name}" if name else "the fastest recipe that fits"
    notes.append(f"{how} on {gpu.name} ({gpu.vram_gib:g} GiB): {candidate.recipe.name}, micro-batch "
                 f"{candidate.recipe.micro_batch}")
    reason = why_not(candidate.recipe) if request.dry_run else None
    if reason:
        notes.append(f"this machine cannot run it ({reason}); a real run here would pick another")
    if device != "cuda":
        notes.append(f"this run is on the {device}: it executes the recipe chosen for {gpu.name}, but the "
                     "prediction is for that card and is not compared with this run")
    return Choice(candidate.recipe, candidate, s, notes)
