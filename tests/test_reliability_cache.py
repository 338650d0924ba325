"""Cache folders are marked as ours; a folder of other files is never adopted, and files the
cache did not write are never deleted; a full disk during a build is a message."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

from naruto_lora.cache import manifest
from tests._cache_support import copy_subset
from tests.conftest import invoke


def common(data: Path, cache_dir: Path) -> list[str]:
    return ["--profile", "smoke", "--data", str(data), "--cache-dir", str(cache_dir),
            "--device", "cpu"]  # fmt: skip


def digest_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_folder_of_other_files_is_not_adopted(cli_runner, tiny_data_dir, tmp_path):
    data = copy_subset(tiny_data_dir, tmp_path / "data", 3)
    foreign = tmp_path / "cache" / "latents"
    (foreign / "shards").mkdir(parents=True)
    (foreign / "index.json").write_text(json.dumps({"my": "own index"}))
    (foreign / "shards" / "latents-0abc.safetensors").write_bytes(b"someone else's")
    (foreign / "shards" / "notes.txt").write_text("mine")
    before = digest_tree(foreign)
    result = invoke(cli_runner, ["cache", "latents", *common(data, tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert "not a naruto-lora latents cache" in result.output and "Traceback" not in result.output
    assert digest_tree(foreign) == before
    assert not (foreign / manifest.LOCK).exists() and not (foreign / manifest.MARKER).exists()


def test_our_cache_is_marked_and_keeps_files_it_did_not_write(cli_runner, tiny_data_dir, tmp_path):
    data = copy_subset(tiny_data_dir, tmp_path / "data", 3)
    args = ["cache", "latents", *common(data, tmp_path / "cache")]
    assert invoke(cli_runner, args).exit_code == 0
    folder = tmp_path / "cache" / "latents"
    assert json.loads((folder / manifest.MARKER).read_text())["kind"] == "latents"
    stranger = folder / "shards" / "README.txt"
    stranger.write_text("a note someone left")
    orphan = folder / "shards" / "latents-00ff.safetensors"  # our naming, not in the index
    orphan.write_bytes(b"from a killed run")
    result = invoke(cli_runner, [*args, "--set", "data.center_crop=false"])  # a rebuild
    assert result.exit_code == 0, result.output
    assert stranger.read_text() == "a note someone left"
    assert not orphan.exists()


def test_a_cache_from_before_the_marker_is_adopted(cli_runner, tiny_data_dir, tmp_path):
    data = copy_subset(tiny_data_dir, tmp_path / "data", 2)
    args = ["cache", "latents", *common(data, tmp_path / "cache")]
    assert invoke(cli_runner, args).exit_code == 0
    (tmp_path / "cache" / "latents" / manifest.MARKER).unlink()
    result = invoke(cli_runner, args)
    assert result.exit_code == 0 and "2 reused" in " ".join(result.output.split())
    assert (tmp_path / "cache" / "latents" / manifest.MARKER).is_file()


def test_a_full_disk_while_caching_is_a_message(cli_runner, tiny_data_dir, tmp_path, monkeypatch):
    import naruto_lora.cache.shards as shards

    data = copy_subset(tiny_data_dir, tmp_path / "data", 3)

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(shards, "atomic_save_safetensors", full)
    result = invoke(cli_runner, ["cache", "latents", *common(data, tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert "no space left on the disk" in result.output and "GiB free there" in result.output
    assert "Traceback" not in result.output


def test_a_build_that_will_not_fit_stops_after_the_first_shard(
    cli_runner, tiny_data_dir, tmp_path, monkeypatch
):
    import collections
    import shutil

    data = copy_subset(tiny_data_dir, tmp_path / "data", 4)
    args = ["cache", "latents", *common(data, tmp_path / "cache"), "--set", "cache.shard_items=1"]
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    result = invoke(cli_runner, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "remaining 3 entries" in text and "GiB are free there" in text
    assert "Traceback" not in result.output
    monkeypatch.undo()
    again = invoke(cli_runner, args)
    assert again.exit_code == 0 and "1 reused, 3 encoded" in " ".join(again.output.split())


def test_a_shard_cut_short_while_in_use_is_a_message_not_sigbus(tmp_path):
    import pytest
    import torch

    from naruto_lora.cache.shards import ShardReader, write_shard
    from naruto_lora.util.errors import UserError

    path = tmp_path / "latents-00aa.safetensors"
    write_shard(path, {"000000.latents": torch.ones(4, 64, 64)}, {"kind": "latents"})
    reader = ShardReader(path)
    assert reader.get("000000.latents").sum().item() == 4 * 64 * 64
    with open(path, "r+b") as fh:  # truncated in place, as `truncate -s` or a bad copy does
        fh.truncate(100)
    with pytest.raises(UserError, match="was cut short while in use"):
        reader.get("000000.latents")
