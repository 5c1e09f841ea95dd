"""The one error type the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class CMGError(RuntimeError):
    """Bad input or a missing prerequisite; the message says what and where.

    `details` (optional, several lines, e.g. the server log lines naming a failing model)
    are printed before the one-line message, which stays the last line.
    """

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details
