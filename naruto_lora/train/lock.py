"""One training run per output folder at a time.

``OUTPUT/.nlora-train.lock`` is held with ``flock`` for the whole run; it records who holds it
(process id, host, start time, command) so a second run can name the first. The kernel drops
the lock when its holder dies, so a run killed with ``kill -9`` leaves no stale lock (only its
file): the next run takes it and overwrites the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from naruto_lora.util.errors import UserError

LOCK_NAME = ".nlora-train.lock"


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
    except ValueError:
        return "another nlora train"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    return (
        f"another nlora train (process {info.get('pid')} on {info.get('host')}, started "
        f"{started}: {info.get('command')})"
    )


def _record() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(["nlora", *sys.argv[1:]])[:500],
        }
    )


@contextlib.contextmanager
def output_lock(output_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the output folder's lock while the body runs (``enabled=False``: a process of a
    multi-process run other than the main one, which holds it for all).

    The lock file is removed when the run ends (while still locked; a taker checks that the file
    it locked is still the one in the folder), so a finished run leaves nothing behind; a killed
    run leaves the file, unlocked, for the next run to take. A folder this creates only to hold
    the lock is removed again when the run fails before it wrote anything there."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows: no locking
        enabled = False
    if not enabled:
        yield
        return
    created = not output_dir.exists()
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"Output path '{output_dir}' is a file, not a folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fh = _take(path, output_dir)
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(_record())
        fh.flush()
        yield
    finally:
        _release(fh, path, output_dir, created)


def _take(path: Path, output_dir: Path) -> Any:
    """The open, locked lock file; a UserError naming the holder when another run has it."""
    import fcntl

    while True:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _holder_text(fh.read())
            fh.close()
            raise UserError(
                f"Output folder '{output_dir}' is in use by {holder}.",
                hint="Wait for that run to end (or stop it: Ctrl-C writes a checkpoint), or "
                "train into another --output. Nothing was changed.",
            ) from None
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()  # the run before us removed this file as it ended: take the new one


def _release(fh: Any, path: Path, output_dir: Path, created: bool) -> None:
    import fcntl

    try:
        path.unlink(missing_ok=True)  # still locked: nobody can take the removed file
        if created and not any(output_dir.iterdir()):
            # Nothing else there: the run failed before it claimed the folder.
            with contextlib.suppress(OSError):
                output_dir.rmdir()
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def output_lock_for(profile: Any) -> contextlib.AbstractContextManager[None]:
    """The lock of the profile's output folder, held by the main process of the run (before
    accelerate starts, the launcher's ``RANK`` says which one that is)."""
    main = os.environ.get("RANK", "0") in ("", "0")
    return output_lock(Path(profile.train.output_dir).expanduser(), enabled=main)
