"""The latent cache against a direct VAE encode; reuse, invalidation, damage, resume, bad input,
buckets and mirrored variants. The tiny VAE has downscale 2 and scaling_factor 0.5 (not SDXL's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from naruto_lora.cache import (
    build_train_dataset,
    builder,
    ensure_latent_cache,
    latent_cache_dir,
    make_batch_sampler,
    manifest,
)
from naruto_lora.cache.latents import LatentCache
from naruto_lora.data.sources import load_rgb, plan_crop, preprocess, time_ids
from naruto_lora.util.errors import UserError
from tests._cache_support import (
    all_latents,
    copy_subset,
    direct_latents,
    make_profile,
    write_imagefolder,
)
from tests.test_data import bad_folder, noise_image

ATOL = 2e-3  # fp16 storage of values around 1: half-ulp is about 5e-4


@pytest.fixture(scope="module")
def tiny_vae(tiny_model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()


@pytest.fixture()
def data8(tiny_data_dir, tmp_path):
    return copy_subset(tiny_data_dir, tmp_path / "data", 8)


def check_against_direct(cache, data_dir: Path, vae, data_cfg) -> None:
    for i, item in enumerate(cache.items):
        image = load_rgb((Path(data_dir) / item.source).read_bytes())
        plan = plan_crop(item.original_size, data_cfg, seed=42, key=item.key, flip=item.flip)
        expected = direct_latents(vae, preprocess(image, plan))
        stored = cache.stored(i)
        assert stored.dtype == torch.float16
        torch.testing.assert_close(cache.latents(i), expected, atol=ATOL, rtol=ATOL)


def test_cached_latents_equal_a_direct_vae_encode(data8, tmp_path, tiny_vae):
    profile = make_profile(data8, tmp_path / "cache")
    cache = ensure_latent_cache(profile)
    assert len(cache) == 8 and cache.report.encoded == 8
    factor = 2 ** (len(tiny_vae.config.block_out_channels) - 1)
    assert factor == 2 and tiny_vae.config.scaling_factor == 0.5
    assert cache.latents(0).shape == (tiny_vae.config.latent_channels, 64 // factor, 64 // factor)
    check_against_direct(cache, data8, tiny_vae, profile.data)
    # The scaling factor really is applied (an unscaled encode would differ by 2x).
    image = load_rgb((data8 / cache.items[0].source).read_bytes())
    plan = plan_crop(cache.items[0].original_size, profile.data, seed=42, key=cache.items[0].key)
    unscaled = tiny_vae.encode(preprocess(image, plan)[None]).latent_dist.mean[0].detach()
    torch.testing.assert_close(cache.latents(0), unscaled * 0.5, atol=ATOL, rtol=ATOL)


def test_rerun_reuses_and_settings_invalidate(data8, tmp_path, tiny_model_dir):
    profile = make_profile(data8, tmp_path / "cache")
    first = all_latents(ensure_latent_cache(profile))
    again = ensure_latent_cache(profile)
    assert (again.report.reused, again.report.encoded) == (8, 0)
    assert ensure_latent_cache(profile, auto=False).report.reused == 8

    smaller = make_profile(data8, tmp_path / "cache", "data.resolution=32")
    with pytest.raises(
        UserError, match=r"(?s)8 item\(s\) cached for other settings.*nlora cache latents"
    ):
        ensure_latent_cache(smaller, auto=False)
    resized = ensure_latent_cache(smaller)
    assert resized.report.encoded == 8 and resized.latents(0).shape == (4, 16, 16)

    # Another VAE: the same weights with another scaling factor -> every latent re-encoded,
    # and the new latents are exactly the old ones times 0.25 / 0.5.
    other = tmp_path / "vae"
    shutil.copytree(tiny_model_dir / "vae", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.25}))
    swapped = ensure_latent_cache(
        make_profile(data8, tmp_path / "cache", f"model.vae={json.dumps(str(other))}")
    )
    assert swapped.report.encoded == 8 and swapped.common["scaling_factor"] == 0.25
    for key, value in all_latents(swapped).items():
        torch.testing.assert_close(value, first[key] / 2, atol=ATOL, rtol=ATOL)


def test_changed_and_removed_items(data8, tmp_path):
    profile = make_profile(data8, tmp_path / "cache")
    before = all_latents(ensure_latent_cache(profile))
    lines = (data8 / "metadata.jsonl").read_text().splitlines()
    (data8 / "metadata.jsonl").write_text("\n".join(lines[1:]) + "\n")  # item 0 removed
    changed = json.loads(lines[2])["file_name"]
    Image.open(data8 / changed).rotate(90).save(data8 / changed)  # item 2 changed
    cache = ensure_latent_cache(profile)
    r = cache.report
    assert (r.reused, r.encoded, r.removed) == (6, 1, 1)
    after = all_latents(cache)
    assert set(after) == set(before) - {(json.loads(lines[0])["file_name"], False)}
    for key, value in after.items():
        assert torch.equal(value, before[key]) != (key[0] == changed)
    index = manifest.read_index(latent_cache_dir(profile))
    # Dead entries were moved out: every shard is fully used, no file is unaccounted for.
    assert sum(s["count"] for s in index.shards.values()) == len(index.entries) == 7
    on_disk = {p.name for p in (latent_cache_dir(profile) / "shards").iterdir()}
    assert on_disk == set(index.shards)


def test_corrupt_and_truncated_shards_are_detected_and_rebuilt(data8, tmp_path):
    profile = make_profile(data8, tmp_path / "cache")
    clean = all_latents(ensure_latent_cache(profile))
    folder = latent_cache_dir(profile)
    shards = sorted((folder / "shards").iterdir())
    data = bytearray(shards[0].read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern inside tensor data
    shards[0].write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{shards[0].name} is content checksum mismatch"):
        ensure_latent_cache(profile, auto=False)
    rebuilt = ensure_latent_cache(profile)
    assert shards[0].name in rebuilt.report.corrupt and rebuilt.report.encoded == 4
    assert all(torch.equal(v, clean[k]) for k, v in all_latents(rebuilt).items())

    victim = sorted((folder / "shards").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        LatentCache.open(folder)
    again = ensure_latent_cache(profile)
    assert again.report.encoded == 4
    assert all(torch.equal(v, clean[k]) for k, v in all_latents(again).items())


def test_resume_after_a_failure_between_shards(data8, tmp_path, monkeypatch):
    profile = make_profile(data8, tmp_path / "cache", "cache.shard_items=2")
    clean = all_latents(ensure_latent_cache(make_profile(data8, tmp_path / "clean")))
    real = builder.write_shard
    calls = []

    def failing(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("disk unplugged")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(builder, "write_shard", failing)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        ensure_latent_cache(profile)
    monkeypatch.setattr(builder, "write_shard", real)
    # A crash after a shard is written but before the index names it: an orphan file.
    monkeypatch.setattr(manifest, "write_index", lambda *a: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        ensure_latent_cache(profile)
    monkeypatch.undo()
    folder = latent_cache_dir(profile)
    interrupted = manifest.read_index(folder)
    assert len(interrupted.entries) == 4 and interrupted.state == "partial"  # 2 shards survived
    assert len(list((folder / "shards").iterdir())) == 3  # plus the orphan
    resumed = ensure_latent_cache(profile)
    assert (resumed.report.reused, resumed.report.encoded) == (4, 4)
    assert all(torch.equal(v, clean[k]) for k, v in all_latents(resumed).items())
    assert len(list((folder / "shards").iterdir())) == 4


KILLER = """
import os, signal, sys
from naruto_lora.cache import builder, ensure_latent_cache
from tests._cache_support import make_profile
real, done = builder.write_shard, []
def write_then_die(*args, **kwargs):
    info = real(*args, **kwargs)
    done.append(1)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return info
builder.write_shard = write_then_die
ensure_latent_cache(make_profile(sys.argv[1], sys.argv[2], "cache.shard_items=2"))
"""


def test_resume_after_sigkill(data8, tmp_path, nlora_home):
    env = {**os.environ, "NLORA_HOME": str(nlora_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLER), str(data8), str(tmp_path / "cache")],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    profile = make_profile(data8, tmp_path / "cache", "cache.shard_items=2")
    resumed = ensure_latent_cache(profile)
    # The shard written just before the kill may or may not be in the index: never corrupt.
    assert resumed.report.reused in (2, 4) and resumed.report.reused + resumed.report.encoded == 8
    assert not resumed.report.corrupt
    clean = all_latents(ensure_latent_cache(make_profile(data8, tmp_path / "clean")))
    # Equal up to fp16 storage rounding: the killed run encoded in a child process whose thread
    # count (and so the convolutions' summation order) may differ from this one's.
    resumed_latents = all_latents(resumed)
    assert resumed_latents.keys() == clean.keys()
    for key, value in resumed_latents.items():
        torch.testing.assert_close(value, clean[key], rtol=2e-3, atol=2e-3)
    folder = latent_cache_dir(profile)
    assert not list(folder.glob(".*.tmp")) and not list((folder / "shards").glob(".*"))


def test_bad_inputs_are_skipped_listed_and_remembered(tmp_path, tiny_vae):
    folder = bad_folder(tmp_path)
    profile = make_profile(folder, tmp_path / "cache")
    cache = ensure_latent_cache(profile)
    assert {it.key for it in cache.items} == {
        "good.png",
        "grey.png",
        "alpha.png",
        "nocap.png",
        "cmyk.jpg",
    }
    lines = (latent_cache_dir(profile) / "skipped.jsonl").read_text().splitlines()
    reasons = {json.loads(x)["key"]: json.loads(x)["reason"] for x in lines}
    assert "decode" in reasons["truncated.png"] and "0 bytes" in reasons["empty.png"]
    assert "escapes" in reasons["../outside.png"] and len(reasons) == 7
    # The undecodable file is remembered: a check does not ask for it again...
    assert ensure_latent_cache(profile, auto=False).report.encoded == 0
    with pytest.raises(UserError, match="--strict"):
        ensure_latent_cache(profile, strict=True)
    check_against_direct(cache, folder, tiny_vae, profile.data)

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "cut.png").write_bytes((folder / "truncated.png").read_bytes())
    with pytest.raises(UserError, match="No usable item"):
        ensure_latent_cache(make_profile(only_bad, tmp_path / "cache2"))


def test_buckets_no_upscaling_real_time_ids_one_bucket_per_batch(tmp_path, tiny_vae):
    sizes = {
        "wide.png": (130, 260),
        "tall.png": (270, 140),
        "big.png": (300, 300),
        "small.png": (100, 90),
        "wide2.png": (128, 250),
    }
    images = {n: noise_image(h, w, seed=i) for i, (n, (h, w)) in enumerate(sizes.items())}
    folder = write_imagefolder(tmp_path / "data", images)
    profile = make_profile(folder, tmp_path / "cache", "data.resolution=128", "data.buckets=true")
    cache = ensure_latent_cache(profile)
    dataset = build_train_dataset(profile, cache, None)
    for i, item in enumerate(cache.items):
        h, w = sizes[item.key]
        assert item.original_size == (h, w)
        assert item.bucket[0] <= h and item.bucket[1] <= w  # never upscaled
        assert item.bucket[0] % 64 == 0 and item.bucket[1] % 64 == 0
        assert cache.latents(i).shape == (4, item.bucket[0] // 2, item.bucket[1] // 2)
        expected = time_ids((h, w), item.crop_top_left, item.bucket)
        assert torch.equal(dataset[i]["time_ids"], expected)
    bucket = {it.key: it.bucket for it in cache.items}
    assert bucket["big.png"] == (128, 128) and bucket["small.png"] == (64, 64)
    assert (
        bucket["wide.png"][1] > bucket["wide.png"][0]
        and bucket["tall.png"][0] > bucket["tall.png"][1]
    )
    assert cache.items[[it.key for it in cache.items].index("wide.png")].crop_top_left != (0, 0)
    check_against_direct(cache, folder, tiny_vae, profile.data)
    for epoch in range(3):
        batches = list(make_batch_sampler(dataset, 2, seed=1, epoch=epoch))
        assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
        assert all(len({dataset.buckets[i] for i in b}) == 1 for b in batches)


def test_random_flip_caches_both_mirror_images(data8, tmp_path, tiny_vae):
    profile = make_profile(
        data8, tmp_path / "cache", "data.random_flip=true", "data.center_crop=false"
    )
    cache = ensure_latent_cache(profile)
    assert len(cache) == 16 and sum(it.flip for it in cache.items) == 8
    check_against_direct(cache, data8, tiny_vae, profile.data)
    wide = next(i for i, it in enumerate(cache.items) if it.flip and it.original_size == (64, 96))
    plan = plan_crop((64, 96), profile.data, seed=42, key=cache.items[wide].key, flip=True)
    assert cache.items[wide].crop_top_left == (0, 96 - plan.crop_box_top_left[1] - 64)
    # The mirror image's pixels are the original's, reversed left to right.
    plain = preprocess(
        load_rgb((data8 / cache.items[wide].source).read_bytes()),
        plan_crop((64, 96), profile.data, seed=42, key=cache.items[wide].key),
    )
    flipped = preprocess(load_rgb((data8 / cache.items[wide].source).read_bytes()), plan)
    assert np.array_equal(flipped.numpy(), plain.flip(-1).numpy())
