"""One training run per output folder at a time.

``OUTPUT/.nlora-train.lock`` is held with ``flock`` for the whole run; it records who holds it
(process id, host, start time, command) so a second run can name the first. The kernel drops
the lock when its holder dies, so a run killed with ``kill -9`` leaves no stale lock: the next
run takes it and overwrites the record.
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

from naruto_lora.errors import UserError

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

    A folder this creates only to hold the lock is removed again when the run fails before it
    wrote anything there (a failed setup does not claim the folder)."""
    try:
        import fcntl
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
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise UserError(
                f"Output folder '{output_dir}' is in use by {_holder_text(fh.read())}.",
                hint="Wait for that run to end (or stop it: Ctrl-C writes a checkpoint), or "
                "train into another --output. Nothing was changed.",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(_record())
        fh.flush()
        try:
            yield
        finally:
            _release(fh, path, output_dir, created)


def _release(fh: Any, path: Path, output_dir: Path, created: bool) -> None:
    import fcntl

    if created and [p.name for p in output_dir.iterdir()] == [LOCK_NAME]:
        # Nothing but the lock: the run failed before it claimed the folder.
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            output_dir.rmdir()
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def output_lock_for(profile: Any) -> contextlib.AbstractContextManager[None]:
    """The lock of the profile's output folder, held by the main process of the run (before
    accelerate starts, the launcher's ``RANK`` says which one that is)."""
    main = os.environ.get("RANK", "0") in ("", "0")
    return output_lock(Path(profile.train.output_dir).expanduser(), enabled=main)
