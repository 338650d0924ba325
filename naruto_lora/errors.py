"""The one exception type for mistakes a user can fix.

The CLI turns a ``UserError`` into a one-paragraph message and a non-zero exit
code; every other exception is a bug and keeps its traceback (``--debug`` shows
the traceback for user errors too).
"""

from __future__ import annotations


class UserError(Exception):
    """A bad input: names the file, key or value and says what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.hint}" if self.hint else text
