"""The one error type the command line turns into a one-line message and a non-zero exit."""


class CMGError(RuntimeError):
    """Bad input or a missing prerequisite; the message says what and where."""
