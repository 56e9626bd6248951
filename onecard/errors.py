"""The one error type that the command line turns into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: the message says what to do instead."""
