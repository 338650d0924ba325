"""Atomic file writes: a temp file in the same folder, fsync, then rename.

Killing the process at any moment leaves either the old file or the new one,
never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename into it survives a power cut (best effort: some file systems
    cannot open a folder for it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def usual_file_mode(path: Path) -> None:
    """The mode a plain open() gives under the user's umask: temp files are created 0600, and an
    output must stay readable by a ComfyUI or A1111 service running as another user."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        usual_file_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(
    path: Path | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """safetensors' ``save_file``, with a write failure as the OSError it is (safetensors reports
    a full disk as a ``SafetensorError`` whose text holds the errno, and no file name)."""
    import errno
    import re

    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)
    except Exception as exc:
        match = re.search(r"code: (\d+)", str(exc))
        if type(exc).__name__ != "SafetensorError" or not match:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code) or errno.errorcode.get(code, ""), str(path)) from exc


def torch_save(obj: object, path: Path | str) -> None:
    """``torch.save`` through a plain file write, so a full disk is an OSError naming the file
    (torch's own writer reports it as a RuntimeError without the errno)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def atomic_save_safetensors(
    path: Path | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_safetensors(tmp, tensors, metadata)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before it is renamed into place: a power
    cut must not leave a "complete" folder of empty files)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(Path(folder))


def chmod_tree(folder: Path) -> None:
    """Give a folder built under a temp name (mkdtemp: 0700) and its contents the modes the
    user's umask gives ordinary folders and files."""
    mask = _umask()
    for path in Path(folder).rglob("*"):
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        elif path.is_file():
            os.chmod(path, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files and folders (``.NAME.*.tmp``) that atomic writes killed before
    their rename left in ``folder``, and the replaced folders (``.NAME.old-PID``) a kill left
    before their removal; only call this while holding the folder's lock."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in [*folder.glob(".*.tmp"), *folder.glob(".*.old-[0-9]*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Build a folder under a temp name, then swap it into place (old one removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        chmod_tree(tmp)  # mkdtemp creates 0700
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
