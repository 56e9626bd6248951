"""The one error type that the command line turns into a one-line message and exit code 2, and
how any error's text is fit on that line."""


class UsageError(Exception):
    """Bad input from the user: the message says what to do instead."""


def one_line(error: object, limit: int = 300) -> str:
    """An error's text on one line, cut at `limit` (torch's messages run over many lines, and
    load_state_dict says what is wrong on its second); its kind where it has no text."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
