"""Which faults become messages (``as_user_error``) and which stay bugs with their traceback."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys

from naruto_lora.util.errors import UserError, as_user_error


def test_machine_faults_become_messages_and_bugs_do_not() -> None:
    from safetensors import SafetensorError

    full = as_user_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x.pt"))
    assert (
        isinstance(full, UserError) and "no space left" in str(full) and "/data/x.pt" in str(full)
    )
    read_only = as_user_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/a"))
    assert "read-only" in str(read_only) and "writable disk" in str(read_only)
    written = as_user_error(SafetensorError("IoError(Os { code: 28, kind: StorageFull })"))
    assert written is not None and "no space left" in str(written)
    refused = as_user_error(pickle.UnpicklingError("Weights only load failed ... weights_only"))
    assert refused is not None and "not a safe format" in str(refused)
    assert as_user_error(OSError(errno.ENOENT, "No such file")) is None  # a bug until named
    assert as_user_error(KeyError("x")) is None
    assert as_user_error(SafetensorError("header too large")) is None


def test_a_bug_keeps_its_traceback_and_a_fault_does_not() -> None:
    """Through the real entry point: a ``--debug``-less run of a fault prints one paragraph."""
    code = (
        "import errno, os, sys\n"
        "from naruto_lora.cli.common import run_guarded\n"
        "import click\n"
        "@click.command()\n"
        "def c():\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/full/disk/file')\n"
        "sys.exit(run_guarded(click.Group(commands={'c': c}), ['c']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no space left on the disk" in " ".join(done.stderr.split())
    bug = code.replace(
        "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/full/disk/file')",
        "raise KeyError('a bug')",
    )
    done = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError" in done.stderr
