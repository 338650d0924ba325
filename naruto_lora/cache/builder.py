"""The incremental, crash-safe cache build shared by the latent and the text cache.

Given the entries the current profile wants (each with a fingerprint) the builder reuses what is
valid, encodes what is missing or stale, moves the live entries out of shards that hold dead
ones, and drops what no longer belongs. Every shard is written atomically and only then named
in the index (also written atomically), so a kill at any moment leaves a cache whose index
describes complete shards only: a re-run resumes from the last shard written.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from naruto_lora.cache import manifest
from naruto_lora.cache.manifest import Entry, Index
from naruto_lora.cache.shards import CorruptShard, ShardReader, verify_shard, write_shard
from naruto_lora.data.sources import Skipped


@dataclass(frozen=True)
class Planned:
    """An entry the profile wants: ``group`` says which entries may share an encode batch
    (same tensor shapes); ``payload`` is what the encoder needs; ``meta`` goes to the index."""

    key: str
    fingerprint: str
    meta: dict[str, Any]
    group: Any
    payload: Any


@dataclass
class BuildReport:
    kind: str
    folder: Path
    planned: int = 0
    reused: int = 0
    encoded: int = 0
    removed: int = 0
    repacked: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Assessment:
    """How the cache on disk compares with what the profile wants (nothing is changed)."""

    index: Index
    corrupt: dict[str, str]
    valid: set[str]
    known_failed: set[str]
    todo: list[Planned]

    def problems(self) -> list[str]:
        out = [f"shard {name} is {problem}" for name, problem in self.corrupt.items()]
        missing = sum(1 for p in self.todo if p.key not in self.index.entries)
        stale = len(self.todo) - missing
        if missing:
            out.append(f"{missing} item(s) not cached")
        if stale:
            out.append(f"{stale} item(s) cached for other settings or changed files (stale)")
        return out


# An encoder: ``prepare`` (CPU work, run one batch ahead in a thread) and ``encode``, which
# returns per entry either its tensors or the reason it failed.
Prepare = Callable[[list[Planned]], Any]
Encode = Callable[[Any], list[dict[str, torch.Tensor] | str]]


def assess(folder: Path, kind: str, planned: list[Planned], verify: bool = True) -> Assessment:
    index = manifest.read_index(folder, kind) or Index(kind=kind)
    corrupt: dict[str, str] = {}
    if verify:
        for name, info in index.shards.items():
            problem = verify_shard(folder / manifest.SHARDS / name, info["bytes"], info["blake2b"])
            if problem:
                corrupt[name] = problem
    valid: set[str] = set()
    known_failed: set[str] = set()
    for p in planned:
        entry = index.entries.get(p.key)
        if entry and entry.fingerprint == p.fingerprint and entry.shard not in corrupt:
            valid.add(p.key)
        elif index.failed.get(p.key, {}).get("fingerprint") == p.fingerprint:
            known_failed.add(p.key)
    todo = [p for p in planned if p.key not in valid and p.key not in known_failed]
    return Assessment(index, corrupt, valid, known_failed, todo)


class _ShardBuffer:
    """Collects encoded entries; every ``shard_items`` of them become one shard + index write."""

    def __init__(self, folder: Path, index: Index, shard_items: int, to_write: int = 0):
        self.folder, self.index, self.shard_items = folder, index, shard_items
        self.pending: list[tuple[Planned, dict[str, torch.Tensor]]] = []
        self.to_write = to_write  # entries still to come, for the free-space check
        self.space_checked = False

    def add(self, planned: Planned, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.append((planned, tensors))
        if len(self.pending) >= self.shard_items:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.index.kind}-{manifest.pid_tag()}.safetensors"
        tensors = {
            f"{slot:06d}.{tname}": t
            for slot, (_, item) in enumerate(self.pending)
            for tname, t in item.items()
        }
        keys = [p.key for p, _ in self.pending]
        meta = {"kind": self.index.kind, "keys": json.dumps(keys)}
        info = write_shard(self.folder / manifest.SHARDS / name, tensors, meta)
        self.index.shards[name] = {**info, "count": len(self.pending)}
        self.to_write -= len(self.pending)
        entry_bytes = int(info["bytes"]) / len(self.pending)
        for slot, (p, _) in enumerate(self.pending):
            self.index.entries[p.key] = Entry(name, slot, p.fingerprint, p.meta)
            self.index.failed.pop(p.key, None)
        self.pending = []
        unused = _drop_unreferenced(self.index)
        manifest.write_index(self.folder, self.index)
        for shard in unused:  # only after the index no longer names them
            (self.folder / manifest.SHARDS / shard).unlink(missing_ok=True)
        if not self.space_checked:  # the first shard, now kept, tells the size of an entry
            self.space_checked = True
            check_free_space(self.folder, entry_bytes, self.to_write)


def check_free_space(folder: Path, entry_bytes: float, entries: int) -> None:
    """Stop a long build early, with nothing lost, when the disk cannot hold the rest of it
    (estimated from the first shard; 5% spare for the index and file system)."""
    import shutil

    from naruto_lora.util.errors import UserError

    needed = entry_bytes * max(entries, 0) * 1.05
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(
            f"The {folder.name} cache in '{folder}' needs about {needed / 2**30:.2f} GiB more for "
            f"its remaining {entries} entries, but only {free / 2**30:.2f} GiB are free there.",
            hint="Free space, or use --cache-dir on a larger disk. What is cached so far is kept "
            "and reused on the next run.",
        )


def _drop_unreferenced(index: Index) -> list[str]:
    referenced = {e.shard for e in index.entries.values()}
    unused = [name for name in index.shards if name not in referenced]
    for name in unused:
        del index.shards[name]
    return unused


def _batches(todo: list[Planned], batch_size: int) -> Iterator[list[Planned]]:
    groups: dict[Any, list[Planned]] = {}
    for p in todo:
        groups.setdefault(p.group, []).append(p)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def _encode_todo(
    state: Assessment,
    buffer: _ShardBuffer,
    encoder: tuple[Prepare, Encode],
    batch_size: int,
    progress: Any,
    task: Any,
) -> tuple[int, list[tuple[Planned, str]]]:
    prepare, encode = encoder
    encoded, failed = 0, []
    batches = list(_batches(state.todo, batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(prepare, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            prepared = upcoming.result()
            upcoming = pool.submit(prepare, batches[i + 1]) if i + 1 < len(batches) else None
            for p, result in zip(batch, encode(prepared), strict=True):
                if isinstance(result, str):
                    failed.append((p, result))
                    buffer.index.failed[p.key] = {"fingerprint": p.fingerprint, "reason": result}
                else:
                    buffer.add(p, result)
                    encoded += 1
            progress.advance(task, len(batch))
    return encoded, failed


def _repack(folder: Path, index: Index, buffer: _ShardBuffer, live: set[str]) -> int:
    """Move live entries out of shards that also hold dead ones, so dead bytes get freed."""
    for key in [k for k in index.entries if k not in live]:
        del index.entries[key]
    counts: dict[str, int] = {}
    for entry in index.entries.values():
        counts[entry.shard] = counts.get(entry.shard, 0) + 1
    moved = 0
    for shard, info in list(index.shards.items()):
        if counts.get(shard, 0) in (0, info["count"]):
            continue
        reader = ShardReader(folder / manifest.SHARDS / shard)
        keys = sorted((e.slot, k) for k, e in index.entries.items() if e.shard == shard)
        for slot, key in keys:
            entry = index.entries[key]
            tensors = {tname: t.clone() for tname, t in reader.slot(slot).items()}
            buffer.add(Planned(key, entry.fingerprint, entry.meta, None, None), tensors)
            moved += 1
    return moved


def _remove_orphans(folder: Path, index: Index) -> None:
    """Shards a killed run wrote but never named in the index, and temp files of writes that
    were killed before their rename (we hold the build lock, so none is in progress). Only
    files with the names our writers give: anything else in the folder is not ours to delete."""
    ours = manifest.shard_pattern(index.kind)
    for path in (folder / manifest.SHARDS).iterdir():
        if path.name not in index.shards and ours.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    for name in (manifest.INDEX, manifest.SKIPPED, manifest.MARKER):
        for path in folder.glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


def sync_cache(
    folder: Path,
    kind: str,
    common: dict[str, Any],
    planned: list[Planned],
    make_encoder: Callable[[], tuple[Prepare, Encode]],
    *,
    batch_size: int,
    shard_items: int,
    auto: bool,
    command: str,
    skipped: list[Skipped],
    skipped_of: Callable[[Planned, str], Skipped],
    unit: str = "item",
) -> tuple[Index, BuildReport]:
    """Bring ``folder`` in line with ``planned``; with ``auto=False`` only check, and raise a
    UserError naming what is missing, stale or corrupt and ``command`` to build it."""
    started = time.perf_counter()
    report = BuildReport(kind=kind, folder=folder, planned=len(planned))
    # A check (auto=False) of a cache that does not exist must not create its folder.
    manifest.check_ours(folder, kind, locked=False)  # before the lock file is created in it
    lock = manifest.build_lock(folder) if auto or folder.is_dir() else contextlib.nullcontext()
    with lock:
        if manifest.check_ours(folder, kind) and auto:
            manifest.mark_ours(folder, kind)
        state = assess(folder, kind, planned)
        report.corrupt, report.reused = state.corrupt, len(state.valid)
        failures = {
            p.key: state.index.failed[p.key]["reason"]
            for p in planned
            if p.key in state.known_failed
        }
        if not auto and state.problems():
            raise manifest.missing_cache_error(kind, folder, state.problems(), command)
        if auto:
            report.removed = sum(
                1 for k in state.index.entries if k not in {p.key for p in planned}
            )
            _build(
                folder,
                common,
                planned,
                state,
                make_encoder,
                batch_size,
                shard_items,
                unit,
                report,
                failures,
            )
        by_key = {p.key: p for p in planned}
        report.skipped = skipped + [skipped_of(by_key[k], reason) for k, reason in failures.items()]
        if auto:
            manifest.write_skipped(folder, [s.to_json() for s in report.skipped])
    report.seconds = time.perf_counter() - started
    return state.index, report


def _build(
    folder: Path,
    common: dict[str, Any],
    planned: list[Planned],
    state: Assessment,
    make_encoder: Callable[[], tuple[Prepare, Encode]],
    batch_size: int,
    shard_items: int,
    unit: str,
    report: BuildReport,
    failures: dict[str, str],
) -> None:
    from naruto_lora.util.console import progress as progress_bar

    index = state.index
    index.common = common
    if state.todo:
        index.state = "partial"  # what a killed run leaves behind says so
    (folder / manifest.SHARDS).mkdir(parents=True, exist_ok=True)
    buffer = _ShardBuffer(folder, index, shard_items, to_write=len(state.todo))
    if state.todo:
        with progress_bar(unit) as bar:
            task = bar.add_task(f"Encoding {index.kind}", total=len(state.todo))
            report.encoded, new_failures = _encode_todo(
                state, buffer, make_encoder(), batch_size, bar, task
            )
        failures.update({p.key: reason for p, reason in new_failures})
    buffer.flush()
    live = set()
    for p in planned:
        entry = index.entries.get(p.key)
        if entry and entry.fingerprint == p.fingerprint and entry.shard not in state.corrupt:
            entry.meta = p.meta  # refresh caption/source of reused entries
            live.add(p.key)
    report.repacked = _repack(folder, index, buffer, live)
    buffer.flush()
    wanted = {p.key for p in planned}
    index.failed = {k: v for k, v in index.failed.items() if k in wanted}
    index.order = [p.key for p in planned if p.key in live]
    index.state = "complete"
    _drop_unreferenced(index)
    manifest.write_index(folder, index)
    _remove_orphans(folder, index)
    state.valid = live


def open_readers(folder: Path, index: Index, names: set[str]) -> dict[str, ShardReader]:
    """Map the shards an index names, checking each one's size first (cheap, catches
    truncation); content checksums are verified by :func:`assess` when a cache is ensured."""
    from naruto_lora.util.errors import UserError

    readers = {}
    for name in sorted(names):
        path = folder / manifest.SHARDS / name
        info = index.shards.get(name, {})
        try:
            if not path.is_file() or path.stat().st_size != info.get("bytes"):
                raise CorruptShard(f"{name} is missing or has the wrong size")
            readers[name] = ShardReader(path)
        except CorruptShard as exc:
            raise UserError(
                f"The cache '{folder}' is damaged: {exc}.",
                hint="Run the cache command again (`nlora cache latents` / `nlora cache text "
                "--to-disk`): it detects the damaged shard and rebuilds its items.",
            ) from exc
    return readers


class ReadyCache:
    """What a ready latent or text cache shares: its folder and index, the entries it serves
    (``keys``), the shard and slot of each, and memory maps of those shards."""

    kind = ""
    label = ""

    def __init__(
        self, folder: Path, index: Index, keys: list[str], report: BuildReport | None = None
    ):
        self.folder = Path(folder)
        self.index = index
        self.keys = list(keys)
        self.report = report
        self._slots = {k: (index.entries[k].shard, index.entries[k].slot) for k in self.keys}
        self._readers = self._open_readers()

    def _open_readers(self) -> dict[str, ShardReader]:
        return open_readers(self.folder, self.index, {s for s, _ in self._slots.values()})

    @classmethod
    def open(cls, folder: Path | str) -> ReadyCache:
        """Open a cache as it is on disk (no data set, no profile): for info and benchmarks."""
        from naruto_lora.util.errors import UserError

        index = manifest.read_index(Path(folder), cls.kind)
        if index is None:
            raise UserError(f"'{folder}' holds no {cls.label} cache (no readable index.json).")
        return cls(Path(folder), index, index.order)

    @property
    def common(self) -> dict[str, Any]:
        return self.index.common

    def __len__(self) -> int:
        return len(self.keys)

    def _tensor(self, key: str, name: str) -> torch.Tensor:
        shard, slot = self._slots[key]
        return self._readers[shard].get(f"{slot:06d}.{name}")

    def __getstate__(self) -> dict[str, Any]:
        # mmaps do not pickle: spawned loader workers reopen the shards.
        state = dict(self.__dict__)
        state["_readers"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._readers = self._open_readers()
