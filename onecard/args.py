"""The command line's edge: argparse types that turn text into checked values with one grammar
(onecard/units.py), so a bad value is a one-line error naming its flag, never a traceback."""

from __future__ import annotations

import argparse
import math

from onecard.errors import quiet_rank
from onecard.units import NumberError, parse_gib, parse_number

LARGEST_INT = 2**53  # exact in a float; far beyond any step, token or batch count


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what was wrong and where to read more."""

    def error(self, message: str):
        self.exit(2, None if quiet_rank() else f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str) -> float:
    try:
        return parse_number(text)
    except NumberError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _whole(text: str, value: float) -> int:
    if value != int(value) or abs(value) > LARGEST_INT:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def positive_int(text: str) -> int:
    value = _whole(text, _number(text))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _whole(text, _number(text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A share strictly between 0 and 1 (or 1 itself), e.g. --mfu 0.4."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def seed(text: str) -> int:
    """A random seed: 0 to 2**63 - 1 (what torch.manual_seed takes without wrapping)."""
    try:
        value = int(str(text).strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**63-1, got {text!r}")
    return value


def temperature(text: str) -> float:
    """Sampling temperature: 0 (greedy) to 2."""
    value = _number(text)
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"expected a temperature from 0 (greedy) to 2, got {text!r}")
    return value


def gigabytes(text: str) -> float:
    """'12', '12GB', '12 GiB', '8g', '12288MiB' -> 12.0 GiB; positive and below a petabyte."""
    try:
        value = parse_gib(text)
    except NumberError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not (value > 0 and math.isfinite(value)) or value > 1e6:
        raise argparse.ArgumentTypeError(f"expected a memory size such as 12GB, got {text!r}")
    return value


def text_arg(text: str) -> str:
    """A name or path: not empty."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


# ---------------------------------------------------------------- flag groups every training stage shares

def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    from onecard.recipe import CHOICES, NAMED

    lean = p.add_argument_group(
        "recipe: how the run spends memory and time (onecard/recipe.py; onecard plan predicts each)")
    lean.add_argument("--recipe", type=text_arg, help=f"a named recipe: {', '.join(NAMED)} (default: the fastest "
                                                      "that fits --gpu/--vram or this machine's CUDA card; on the "
                                                      "CPU baseline)")
    lean.add_argument("--gpu", type=text_arg,
                      help="card to fit the recipe to, e.g. rtx4070 (default: this machine's CUDA card)")
    lean.add_argument("--vram", type=gigabytes, help="memory to fit in, e.g. 12GB or 8GB (default: the card's)")
    for key, allowed in CHOICES.items():
        lean.add_argument("--" + key.replace("_", "-"), choices=allowed, help=f"override the recipe's {key}")
    lean.add_argument("--compile", action=argparse.BooleanOptionalAction,
                      help="torch.compile the model (default: on with CUDA, off on the CPU; --no-compile for eager)")
    lean.add_argument("--dry-run", action="store_true", help="print the chosen recipe with its predicted memory "
                                                             "and step time, and exit")
    lean.add_argument("--assume", action="append", metavar="NAME=VALUE",
                      help="override a planner assumption when fitting the recipe, as `onecard plan --assume` "
                           "(see onecard/plan/assumptions.py); repeatable")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoints, resuming, energy and cost."""
    from onecard import defaults

    saving = p.add_argument_group("checkpoints and resuming")
    saving.add_argument("--save-every-min", type=non_negative_float,
                        help=f"write a checkpoint every M minutes (default {defaults.SAVE_EVERY_MIN:g}; 0: off)")
    saving.add_argument("--save-every-steps", type=non_negative_int,
                        help="write a checkpoint every K steps (default 0: off); always one at the end")
    saving.add_argument("--keep", type=positive_int, help=f"checkpoints kept (default {defaults.KEEP})")
    saving.add_argument("--force-new", action="store_true",
                        help="start a new run although --run-dir holds one (its files move to previous-<time>/)")
    add_threads_argument(p)
    energy = p.add_argument_group("energy and cost")
    energy.add_argument("--price", type=non_negative_float, help="electricity price per kWh, for the cost")
    energy.add_argument("--currency", type=text_arg, help=f"currency of --price (default {defaults.CURRENCY})")
    energy.add_argument("--power", type=positive_float,
                        help="power draw in watts, for an energy estimate where NVML cannot measure it")


# Why a command that writes text one token at a time defaults to one thread: measured, `onecard sample` of 300
# tokens from the demo model on a busy two-core machine took 27-39 s on 1 thread and 130-148 s on 2
ONE_DECODE_STEP = "one decode step is too small to split over cores"
BUSY = "on a machine busy with other work 1 can be many times faster"


def add_threads_argument(p: argparse.ArgumentParser, default: int | None = None, why: str = BUSY) -> None:
    """--threads, one meaning in every command (onecard.device.use_threads); default None is PyTorch's, one
    thread per core. `why` says in the help why the command has its default."""
    told = "PyTorch's, one per core" if default is None else str(default)
    p.add_argument("--threads", type=positive_int, default=default,
                   help=f"PyTorch threads per operation on a CPU (default {told}; {why})")


def recipe_request(args: argparse.Namespace, device: str = "cpu"):
    """The recipe flags as the planner's RecipeRequest."""
    from onecard.plan.choose import RecipeRequest
    from onecard.recipe import CHOICES

    overrides = {key: getattr(args, key) for key in CHOICES if getattr(args, key, None) is not None}
    if args.compile is not None:
        overrides["compile"] = args.compile
    return RecipeRequest(recipe=args.recipe, overrides=overrides, gpu=args.gpu, vram_gib=args.vram,
                         dry_run=args.dry_run, power_watts=args.power, price=getattr(args, "price", None),
                         currency=getattr(args, "currency", None), compile_by_default=device == "cuda",
                         assume=getattr(args, "assume", None))
