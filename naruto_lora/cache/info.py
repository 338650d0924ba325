"""What a cache folder holds (``nlora cache info``), and one item written out for inspection."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from naruto_lora.cache import manifest
from naruto_lora.cache.builder import open_readers
from naruto_lora.cache.manifest import Index
from naruto_lora.cache.shards import verify_shard
from naruto_lora.util.errors import UserError
from naruto_lora.util.io import atomic_save_safetensors

KINDS = ("latents", "text")


@dataclass
class CacheSummary:
    folder: Path
    kind: str
    state: str
    items: int
    bytes_on_disk: int
    shards: int
    shapes: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    common: dict[str, Any] = field(default_factory=dict)
    flips: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)


def find_caches(folder: Path) -> list[Path]:
    """``folder`` itself if it is a cache, else its ``latents``/``text`` subfolders that are."""
    folder = Path(folder)
    if (folder / manifest.INDEX).is_file():
        return [folder]
    found = [folder / kind for kind in KINDS if (folder / kind / manifest.INDEX).is_file()]
    if not found:
        raise UserError(
            f"'{folder}' is not a cache folder: no index.json in it or in {'/, '.join(KINDS)}/.",
            hint="Point at cache.dir (or cache.dir/latents, cache.dir/text) of a profile.",
        )
    return found


def _load(folder: Path) -> Index:
    index = manifest.read_index(folder)
    if index is None:
        raise UserError(f"'{folder / manifest.INDEX}' is unreadable or not an nlora cache index.")
    return index


def summarize(folder: Path) -> CacheSummary:
    index = _load(folder)
    summary = CacheSummary(
        folder=folder,
        kind=index.kind,
        state=index.state,
        items=len(index.order),
        bytes_on_disk=manifest.size_on_disk(folder),
        shards=len(index.shards),
        common=dict(index.common),
        skipped=manifest.read_skipped(folder),
    )
    for name, info in index.shards.items():
        problem = verify_shard(folder / manifest.SHARDS / name, info["bytes"], info["blake2b"])
        if problem:
            summary.damaged[name] = problem
    readers = open_readers(folder, index, set(index.shards) - set(summary.damaged))
    for key in index.order:
        entry = index.entries[key]
        if entry.shard in summary.damaged:
            continue
        for name, tensor in readers[entry.shard].slot(entry.slot).items():
            summary.shapes[(name, tuple(tensor.shape))] += 1
            summary.dtypes[(name, str(tensor.dtype).removeprefix("torch."))] += 1
        summary.flips += bool(entry.meta.get("flip"))
    return summary


def dump_item(folder: Path, number: int, out: Path) -> dict[str, str]:
    """Write entry ``number`` (0-based, in training order) to ``out`` as safetensors: the
    tensors exactly as stored, the SDXL size fields as int64 tensors, and its source file
    name, caption and key in the metadata. Returns the metadata."""
    index = _load(folder)
    if not 0 <= number < len(index.order):
        raise UserError(
            f"--item {number}: the cache '{folder}' has items 0..{len(index.order) - 1}."
        )
    key = index.order[number]
    entry = index.entries[key]
    reader = open_readers(folder, index, {entry.shard})[entry.shard]
    tensors = {name: t.clone() for name, t in reader.slot(entry.slot).items()}
    for name in ("original_size", "crop_top_left", "target_size"):
        if name in entry.meta:
            tensors[name] = torch.tensor(entry.meta[name], dtype=torch.int64)
    metadata = {
        "kind": index.kind,
        "key": key,
        "source": str(entry.meta.get("source", "")),
        "caption": str(entry.meta.get("caption", "")),
        "entry": json.dumps(entry.meta),
    }
    atomic_save_safetensors(out, tensors, metadata)
    return metadata
