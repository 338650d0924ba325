"""Shard files: many items' tensors in one safetensors file, written atomically, read by mmap.

One file per image (the reference recipe's ``latent_{idx}.pt``) costs an open, a pickle parse
and a small read per sample; a shard is opened once and each tensor is a view into the mapped
file. The format is plain safetensors, so any safetensors reader can open a shard; the reader
here maps the file once and builds tensors at their offsets without copying.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from naruto_lora.util.io import atomic_save_safetensors

DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
HASH_CHUNK = 1 << 20


class CorruptShard(Exception):
    """A shard whose bytes do not match what the index recorded, or that does not parse."""


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, int | str]:
    """Write a shard atomically (temp file, fsync, rename); return its size and digest."""
    atomic_save_safetensors(path, tensors, metadata)
    return {"bytes": path.stat().st_size, "blake2b": file_digest(path)}


def verify_shard(path: Path, expected_bytes: int, expected_digest: str) -> str | None:
    """None if the shard is intact, else what is wrong with it (missing, truncated, changed)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected_bytes:
        return f"size {size} bytes, expected {expected_bytes} (truncated or overwritten)"
    if file_digest(path) != expected_digest:
        return "content checksum mismatch (corrupt)"
    return None


class ShardReader:
    """A memory-mapped shard. ``get(name)`` returns a tensor viewing the mapped bytes.

    The mapping is private copy-on-write (ACCESS_COPY), so torch gets a writable buffer and
    nothing a caller does to a returned view can reach the file. Callers that hand tensors on
    should copy them (the cache readers do).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            size = stat.st_size
            self._inode, self._size = (stat.st_dev, stat.st_ino), size
            if size < 8:
                raise CorruptShard(f"{self.path.name}: {size} bytes, too short for safetensors")
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > size - 8:
            raise CorruptShard(f"{self.path.name}: header length {header_len} beyond file end")
        try:
            header = json.loads(bytes(self._map[8 : 8 + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptShard(f"{self.path.name}: header does not parse ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        data_start = 8 + header_len
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = DTYPES.get(info["dtype"])
            if dtype is None or data_start + end > size or start > end:
                raise CorruptShard(f"{self.path.name}: tensor '{name}' has a bad dtype or offsets")
            self._entries[name] = (dtype, info["shape"], data_start + start, end - start)

    def names(self) -> list[str]:
        return list(self._entries)

    def slot(self, slot: int) -> dict[str, torch.Tensor]:
        """The tensors of one entry (named ``{slot:06d}.{name}`` in the file), as views."""
        prefix = f"{slot:06d}."
        return {n[len(prefix) :]: self.get(n) for n in self._entries if n.startswith(prefix)}

    def check_not_cut(self) -> None:
        """Reading a mapped page past the end of a file that was cut short kills the process
        with SIGBUS, which nothing can catch: stat first. (A file replaced by another under the
        same name is harmless: the map keeps the old one.) A cut between this check and the
        read can still crash; docs/reliability.md says so."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return  # deleted: the map keeps the old file alive
        if (stat.st_dev, stat.st_ino) == self._inode and stat.st_size < self._size:
            from naruto_lora.util.errors import UserError

            raise UserError(
                f"The cache shard '{self.path}' was cut short while in use ({self._size} bytes "
                f"when opened, {stat.st_size} now): something truncated it.",
                hint="Stop whatever writes into the cache folder, rebuild the cache "
                "(`nlora cache latents` / `nlora cache text --to-disk`), then continue with "
                "--resume latest.",
            )

    def get(self, name: str) -> torch.Tensor:
        self.check_not_cut()
        dtype, shape, offset, nbytes = self._entries[name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = nbytes // itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset)
        return flat.view(shape)

    def close(self) -> None:
        # Tensors handed out may still view the map; let the GC close it when they are gone.
        self._entries.clear()
