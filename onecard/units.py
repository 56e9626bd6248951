"""One grammar for the numbers people type (38e9, 38B, 1.5T, 524_288, 12GB) and one way to
print a duration. Plain Python: the planner and the command line share it without PyTorch."""

from __future__ import annotations

import math
import re

# a comma only as a thousands separator: 524,288 and 1,000,000.5 but not 0,30 or 1,5B (a decimal comma)
_GROUPED = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?([eE][-+]?\d+)?[kmbgt]?")
SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
LARGEST = 1e18  # no count onecard takes (tokens, steps, bytes) comes near this; beyond it is a typo


class NumberError(ValueError):
    """Text that is not a number the grammar accepts; the message says why."""


def parse_number(text: str) -> float:
    """'38e9', '38B', '1.5T', '524_288', '524,288' -> a finite float (NumberError otherwise)."""
    t = str(text).strip().lower()
    if "," in t:
        if not _GROUPED.fullmatch(t):
            raise NumberError(f"{text!r} is not a number: write a decimal point, not a comma (0.5, not 0,5); "
                              "a comma may only group thousands (524,288)")
        t = t.replace(",", "")
    t = t.replace("_", "")
    scale = SUFFIX.get(t[-1:])
    body = t[:-1] if scale else t
    try:
        value = float(body) * (scale or 1)
    except (ValueError, OverflowError):
        raise NumberError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise NumberError(f"{text!r} is not a finite number")
    if abs(value) > LARGEST:
        raise NumberError(f"{text!r} is too large")
    return value


# GB as card makers write GiB; MiB as nvidia-smi prints a card's memory (12282MiB)
GIB_UNITS = {"gib": 1.0, "gb": 1.0, "g": 1.0, "mib": 1 / 1024, "mb": 1 / 1024}


def parse_gib(text: str) -> float:
    """'12', '12GB', '12 GiB', '8g', '12288MiB' -> 12.0: memory in GiB (what card makers call GB)."""
    t = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in GIB_UNITS if t.endswith(u)), "")
    number = t[: len(t) - len(unit)]
    try:
        return parse_number(number) * GIB_UNITS.get(unit, 1.0)
    except NumberError:
        if "," in number:  # a decimal comma: parse_number's reason says what to write
            raise
        raise NumberError(f"{text!r} is not a memory size: write it in GB (GiB), e.g. 12GB or 12 GiB, "
                          "or in MiB as nvidia-smi prints it") from None


def format_duration(seconds: float) -> str:
    """'305 d 10 h', '3 h 05 min', '2 min 05 s': the largest two units that matter."""
    seconds = max(0, int(seconds)) if math.isfinite(seconds) else 0
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days:,} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def finite_number(value: object) -> float | None:
    """A finite number, else None: a damaged log or summary must not break a chart or a table."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return value if math.isfinite(value) else None


def plausible_number(value: object) -> float | None:
    """A finite number of a size a chart or a table can show, else None (matplotlib cannot lay out an
    axis that spans ±1e308; no step, loss, rate or byte count of a real run comes near LARGEST)."""
    value = finite_number(value)
    return value if value is not None and abs(value) <= LARGEST else None


def quantity(n: float, noun: str) -> str:
    """'1 step', '71,680 steps', '2.5 days': the number grouped, the noun in the plural unless it is one."""
    shown = f"{n:,.0f}" if float(n).is_integer() else f"{n:,g}"
    return f"{shown} {noun if n == 1 else noun + 's'}"
