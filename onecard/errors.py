"""The one error type that the command line turns into a one-line message and exit code 2, how
any error's text is fit on that line, and which process says it."""

import os


class UsageError(Exception):
    """Bad input from the user: the message says what to do instead."""


def quiet_rank() -> bool:
    """Under torchrun, a rank other than 0: every rank runs the same command and meets the same
    errors and signals, and rank 0 alone says them."""
    return os.environ.get("RANK", "0") != "0"


def one_line(error: object, limit: int = 300) -> str:
    """An error's text on one line, cut at `limit` (torch's messages run over many lines, and
    load_state_dict says what is wrong on its second); its kind where it has no text."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
