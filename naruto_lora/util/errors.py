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


# errno values that are the machine's state, not a bug: each gets a message and a remedy.
_OS_FAULTS = {
    "ENOSPC": (
        "there is no space left on the disk",
        "Free space there, or choose a folder on another disk.",
    ),
    "EDQUOT": (
        "your disk quota is used up",
        "Free space within your quota, or choose another folder.",
    ),
    "EACCES": (
        "permission is denied",
        "Make the folder writable for you (or readable, for an input), or choose another one.",
    ),
    "EPERM": (
        "the operation is not permitted",
        "Check the folder's permissions and owner, or choose another one.",
    ),
    "EROFS": ("the file system is read-only", "Choose a folder on a writable disk."),
}


def _free_space(path: str | None) -> str:
    """' (N GiB free there)' for the nearest existing folder of ``path``, or ''."""
    import shutil
    from pathlib import Path

    if not path:
        return ""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**30:.2f} GiB free there)"


def os_fault(exc: OSError, doing: str | None = None) -> UserError | None:
    """A UserError for a full disk, a read-only folder or a missing permission; None for any other
    OSError (those stay bugs). ``doing`` says what was being done, e.g. "writing the checkpoint"."""
    import errno

    name = errno.errorcode.get(exc.errno or -1)
    if name not in _OS_FAULTS:
        return None
    what, remedy = _OS_FAULTS[name]
    path = exc.filename
    where = f" at '{path}'" if path else ""
    action = doing or ("writing" if name in ("ENOSPC", "EDQUOT", "EROFS") else "accessing a file")
    space = _free_space(str(path) if path else None) if name in ("ENOSPC", "EDQUOT") else ""
    return UserError(
        f"Could not finish {action}{where}: {what}{space}. Files already there were not changed.",
        hint=remedy,
    )


def unsafe_pickle(exc: Exception, path: object | None = None) -> UserError | None:
    """torch.load(weights_only=True) refusing a pickle that would run code: say so, and that it
    will not be loaded (torch's own advice, weights_only=False, is the unsafe way)."""
    import pickle

    if not isinstance(exc, pickle.UnpicklingError) or "weights_only" not in str(exc).lower():
        return None
    where = (
        (path if str(path).startswith("The ") else f"'{path}'") if path else "A file being loaded"
    )
    return UserError(
        f"{where} is not a safe format: it is a Python pickle holding more than tensors (it could "
        "run code when loaded), so naruto-lora will not load it.",
        hint="Use files from a source you trust, in the safetensors format (or checkpoints "
        "written by nlora train).",
    )


def as_user_error(exc: BaseException) -> UserError | None:
    """The UserError a fault a user can fix stands for, or None (a bug: keep the traceback)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError):
        return os_fault(exc)
    if isinstance(exc, Exception):
        found = unsafe_pickle(exc)
        if found is not None:
            return found
        return _safetensors_fault(exc)
    return None


def _safetensors_fault(exc: Exception) -> UserError | None:
    """safetensors' writer reports an OS error as text ("IoError(Os { code: 28, ... })")."""
    import re

    if type(exc).__name__ != "SafetensorError":
        return None
    match = re.search(r"code: (\d+)", str(exc))
    if not match:
        return None
    import os

    code = int(match.group(1))
    return os_fault(OSError(code, os.strerror(code)))
