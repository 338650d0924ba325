"""The cache index (manifest), item fingerprints, model identities and the build lock.

A cache folder holds ``index.json`` (written atomically), ``shards/*.safetensors`` and
``skipped.jsonl``, and the marker ``.nlora-cache`` that says the folder is ours. The index is the
single source of truth: a shard with our naming not named in it is an orphan from a killed run
and is removed; an entry is reused only when its fingerprint (a hash of everything that
determines its tensors) equals the one the current profile computes. A folder without the marker
that holds anything but an index of ours is not adopted, and files we did not name are never
deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from naruto_lora.util.errors import UserError
from naruto_lora.util.io import atomic_write_text

FORMAT = "nlora-cache"
VERSION = 1
INDEX = "index.json"
SHARDS = "shards"
SKIPPED = "skipped.jsonl"
LOCK = ".lock"
MARKER = ".nlora-cache"


def fingerprint(fields: dict[str, Any]) -> str:
    """A stable hash of plain data (sorted keys, so dict order never matters)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class Entry:
    """One cached item: where its tensors live and what they were computed from."""

    shard: str
    slot: int
    fingerprint: str
    meta: dict[str, Any]


@dataclass
class Index:
    kind: str
    common: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)
    # Items whose source could not be decoded, by key: (fingerprint, reason). Remembered so
    # that a validation pass (auto=False) does not ask for them again until the file changes.
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    state: str = "partial"
    updated: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "kind": self.kind,
                "state": self.state,
                "updated": self.updated,
                "common": self.common,
                "shards": self.shards,
                "entries": {
                    key: {"shard": e.shard, "slot": e.slot, "fingerprint": e.fingerprint, **e.meta}
                    for key, e in self.entries.items()
                },
                "failed": self.failed,
                "order": self.order,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Index:
        raw = json.loads(text)
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} {FORMAT} index")
        entries = {}
        for key, value in raw["entries"].items():
            value = dict(value)
            shard, slot, fp = value.pop("shard"), value.pop("slot"), value.pop("fingerprint")
            entries[key] = Entry(shard, int(slot), fp, value)
        return cls(
            kind=raw["kind"],
            common=raw.get("common", {}),
            shards=raw.get("shards", {}),
            entries=entries,
            failed=raw.get("failed", {}),
            order=list(raw.get("order", [])),
            state=raw.get("state", "partial"),
            updated=float(raw.get("updated", 0.0)),
        )


def read_index(folder: Path, kind: str | None = None) -> Index | None:
    """The folder's index, or None if there is none or it is unreadable / of another kind."""
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        index = Index.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if kind is not None and index.kind != kind:
        return None
    return index


def write_index(folder: Path, index: Index) -> None:
    index.updated = time.time()
    atomic_write_text(folder / INDEX, index.to_json())


def shard_pattern(kind: str) -> re.Pattern[str]:
    """Names our builder gives shards (``KIND-HEX.safetensors``) and their temp files."""
    return re.compile(rf"^(\.)?{re.escape(kind)}-[0-9a-f]+\.safetensors(\.[A-Za-z0-9_]+\.tmp)?$")


def _our_temp(name: str) -> bool:
    return any(
        name.startswith(f".{ours}.") and name.endswith(".tmp") for ours in (INDEX, SKIPPED, MARKER)
    )


def check_ours(folder: Path, kind: str, locked: bool = True) -> bool:
    """Whether ``folder`` may be used as the ``kind`` cache: it is missing or empty, carries our
    marker, or (a cache from before the marker) holds a readable index of ours. A UserError
    otherwise: its files are not ours to overwrite or delete. True when the marker is missing.

    Before the build lock is taken (``locked=False``) a folder with our lock file in it is left
    to the check under the lock: another process may be building it right now."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        raise UserError(f"The {kind} cache path '{folder}' is a file, not a folder.")
    if (folder / MARKER).is_file() or (not locked and (folder / LOCK).is_file()):
        return False
    entries = [
        p.name for p in folder.iterdir() if p.name not in (LOCK, MARKER) and not _our_temp(p.name)
    ]
    if not entries or read_index(folder, kind) is not None:
        return True
    shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
    raise UserError(
        f"'{folder}' holds files that are not a naruto-lora {kind} cache ({shown}); using it as "
        "one could overwrite or delete them, so it is left alone.",
        hint="Choose another --cache-dir (or cache.dir): the cache goes in its "
        f"'{folder.name}/' subfolder.",
    )


def mark_ours(folder: Path, kind: str) -> None:
    atomic_write_text(folder / MARKER, json.dumps({"format": FORMAT, "kind": kind}) + "\n")


def write_skipped(folder: Path, lines: list[str]) -> None:
    atomic_write_text(folder / SKIPPED, "".join(line + "\n" for line in lines))


def read_skipped(folder: Path) -> list[dict[str, Any]]:
    path = folder / SKIPPED
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """One builder per cache folder at a time; others wait (e.g. every DDP rank calling ensure).

    flock is released by the kernel when the holder dies, so a killed build never leaves a
    stale lock behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    with open(folder / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from naruto_lora.util.console import err_console

            err_console.print(f"Waiting for another nlora process building the cache '{folder}'...")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- model identity


def _local_signature(folder: Path) -> str:
    """Names, sizes and modification times of a local model folder's files: a change to any
    weight or config file changes the signature (cheap: no file is read)."""
    rows = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            rows.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return fingerprint({"files": rows})


def _hub_commit(model_id: str, subfolder: str, revision: str) -> str | None:
    """The commit of the hub cache snapshot that holds ``subfolder/config.json`` (offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        filename = f"{subfolder}/config.json" if subfolder else "config.json"
        found = try_to_load_from_cache(model_id, filename, revision=revision or None)
    except Exception:
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def component_revision(resolved: str, model_id: str, subfolders: list[str], revision: str) -> str:
    """What identifies the exact weights of a model part: a hub commit, or a local signature."""
    path = Path(resolved)
    if path.is_dir():
        parts = [path / sub if sub else path for sub in subfolders]
        signatures = {sub: _local_signature(p) for sub, p in zip(subfolders, parts, strict=True)}
        return "local:" + fingerprint(signatures)
    commits = {_hub_commit(model_id, sub, revision) for sub in subfolders}
    if len(commits) == 1 and None not in commits:
        return f"hub:{commits.pop()}"
    return f"hub:{revision or 'main'} (commit unresolved)"


def missing_cache_error(kind: str, folder: Path, problems: list[str], command: str) -> UserError:
    shown = "; ".join(problems[:4]) + (
        f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
    )
    return UserError(
        f"The {kind} cache '{folder}' is not ready for this profile: {shown}.",
        hint=f"Build it with `{command}` using the same profile options "
        "(or let training build it automatically).",
    )


def pid_tag() -> str:
    return f"{os.getpid():x}{time.time_ns() & 0xFFFFFF:06x}"
