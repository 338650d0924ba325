"""The training-side reader: data set items, the bucket batch sampler, the prefetching loader,
and the memory-mapped shard reader against safetensors' own loader."""

from __future__ import annotations

import pickle
import threading
from collections import Counter

import pytest
import torch

from naruto_lora.cache import (
    build_train_dataset,
    collate,
    ensure_latent_cache,
    ensure_text_cache,
    make_batch_sampler,
    make_loader,
)
from naruto_lora.cache.latents import LatentCache
from naruto_lora.cache.shards import ShardReader, write_shard
from naruto_lora.data.sources import load_rgb, plan_crop, preprocess, time_ids
from naruto_lora.util.errors import UserError
from tests._cache_support import copy_subset, make_profile


class FakeDataset:
    """Buckets and mirror groups without any cache: what the sampler looks at."""

    def __init__(self, buckets, groups=None):
        self.buckets = buckets
        self.groups = groups or [[i] for i in range(len(buckets))]

    def __len__(self):
        return len(self.buckets)

    def __getitem__(self, i):
        return {"index": i, "caption": f"c{i}", "latents": torch.full((2, 3, 3), float(i))}


def test_shard_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "000000.latents": torch.randn(4, 5, 6).half(),
        "000001.x": torch.arange(7),
        "000002.y": torch.randn(3, dtype=torch.float32),
        "000003.z": torch.zeros(0),
    }
    info = write_shard(tmp_path / "s.safetensors", tensors, {"kind": "test"})
    assert info["bytes"] == (tmp_path / "s.safetensors").stat().st_size
    reader = ShardReader(tmp_path / "s.safetensors")
    reference = load_file(tmp_path / "s.safetensors")
    assert reader.metadata == {"kind": "test"} and sorted(reader.names()) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(reader.get(name), value) and reader.get(name).dtype == value.dtype
    view = reader.get("000000.latents")
    view.add_(1)  # a private copy-on-write mapping: the file never changes
    assert torch.equal(
        load_file(tmp_path / "s.safetensors")["000000.latents"], tensors["000000.latents"]
    )


def test_sampler_is_deterministic_shuffled_and_bucket_pure():
    buckets = [(64, 64)] * 10 + [(64, 128)] * 7 + [(128, 64)] * 3
    ds = FakeDataset(buckets)
    a = list(make_batch_sampler(ds, 4, seed=3, epoch=0))
    assert a == list(make_batch_sampler(ds, 4, seed=3, epoch=0))
    assert a != list(make_batch_sampler(ds, 4, seed=3, epoch=1))
    assert a != list(make_batch_sampler(ds, 4, seed=4, epoch=0))
    assert sorted(i for b in a for i in b) == list(range(20))  # nothing dropped
    assert all(len({buckets[i] for i in b}) == 1 for b in a)
    assert sorted(len(b) for b in a) == [2, 3, 3, 4, 4, 4]  # 10 = 4+4+2, 7 = 4+3, 3
    assert len(make_batch_sampler(ds, 4, seed=3, epoch=0)) == 6


def test_sampler_resumes_mid_epoch_exactly():
    ds = FakeDataset([(1, 1)] * 13)
    full = list(make_batch_sampler(ds, 2, seed=0, epoch=5))
    resumed = make_batch_sampler(ds, 2, seed=0, epoch=5, skip_batches=3)
    assert list(resumed) == full[3:] and len(resumed) == len(full)


def test_sampler_shards_disjointly_across_ranks():
    ds = FakeDataset([(1, 1)] * 10 + [(2, 2)] * 9)
    with pytest.warns(UserWarning, match="left out"):
        ranks = [list(make_batch_sampler(ds, 2, 0, 0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 3  # 10 batches: 9 used
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))
    with pytest.raises(UserError, match="fewer than"):
        make_batch_sampler(FakeDataset([(1, 1)] * 3), 4, 0, 0, num_replicas=2, rank=0)


def test_sampler_uses_one_mirror_variant_per_image_per_epoch():
    groups = [[2 * i, 2 * i + 1] for i in range(20)]
    ds = FakeDataset([(1, 1)] * 40, groups)
    picks = Counter()
    for epoch in range(6):
        used = [i for b in make_batch_sampler(ds, 4, seed=0, epoch=epoch) for i in b]
        assert sorted(i // 2 for i in used) == list(range(20))  # each image once
        picks.update(i % 2 for i in used)
    assert 0.3 < picks[1] / 120 < 0.7  # both variants used, about evenly


def test_loader_prefetches_in_order_and_propagates_errors():
    ds = FakeDataset([(1, 1)] * 11)
    sampler = make_batch_sampler(ds, 3, seed=0, epoch=0)
    expected = [collate([ds[i] for i in b]) for b in sampler]
    for workers, prefetch in ((0, 2), (0, 0), (1, 2)):
        got = list(make_loader(ds, sampler, workers=workers, prefetch=prefetch))
        assert len(got) == len(expected) == len(make_loader(ds, sampler))
        for g, e in zip(got, expected, strict=True):
            assert g["caption"] == e["caption"] and g["index"].dtype == torch.long
            assert torch.equal(g["index"], e["index"]) and torch.equal(g["latents"], e["latents"])

    class Broken(FakeDataset):
        def __getitem__(self, i):
            if i == 7:
                raise KeyError("item 7 is broken")
            return super().__getitem__(i)

    broken = Broken([(1, 1)] * 11)
    with pytest.raises(KeyError, match="item 7"):
        list(make_loader(broken, make_batch_sampler(broken, 3, seed=0, epoch=0)))
    before = threading.active_count()
    for _ in make_loader(ds, sampler):
        break  # stopping early must stop the read-ahead thread
    assert threading.active_count() == before


def test_collate_refuses_mixed_shapes():
    with pytest.raises(ValueError, match="one bucket per batch"):
        collate([{"latents": torch.zeros(1, 2)}, {"latents": torch.zeros(2, 2)}])


def test_dataset_from_caches_and_from_pixels(tiny_data_dir, tmp_path):
    data = copy_subset(tiny_data_dir, tmp_path / "data", 6)
    profile = make_profile(data, tmp_path / "cache", "data.random_flip=true")
    latents, text = ensure_latent_cache(profile), ensure_text_cache(profile)
    cached = build_train_dataset(profile, latents, text)
    assert len(cached) == 12 and len(cached.groups) == 6
    item = cached[3]
    meta = latents.items[3]
    assert item["index"] == 3 and item["caption"] == meta.caption
    assert torch.equal(item["latents"], latents.latents(3))
    assert torch.equal(
        item["time_ids"], time_ids(meta.original_size, meta.crop_top_left, meta.target_size)
    )
    assert torch.equal(item["prompt_embeds"], text.embeddings(meta.caption)[0])
    assert item["pooled_embeds"].shape == (40,)

    pixels = build_train_dataset(profile, None, None)
    assert [(it.key, it.flip) for it in pixels.items] == [(it.key, it.flip) for it in latents.items]
    item = pixels[3]
    plan = plan_crop(meta.original_size, profile.data, seed=42, key=meta.key, flip=meta.flip)
    expected = preprocess(load_rgb((data / meta.source).read_bytes()), plan)
    assert torch.equal(item["pixel_values"], expected) and "latents" not in item
    assert torch.equal(item["time_ids"], cached[3]["time_ids"])

    for dataset in (cached, pixels):  # the bulk read equals item-by-item reads, collated
        indices = next(iter(make_batch_sampler(dataset, 4, seed=0, epoch=0)))
        bulk, single = dataset.get_batch(indices), collate([dataset[i] for i in indices])
        assert bulk.keys() == single.keys() and bulk["caption"] == single["caption"]
        for key in bulk.keys() - {"caption"}:
            assert bulk[key].dtype == single[key].dtype and torch.equal(bulk[key], single[key])
    batch = next(iter(make_loader(cached, make_batch_sampler(cached, 4, seed=0, epoch=0))))
    assert batch["latents"].shape == (4, 4, 32, 32) and batch["prompt_embeds"].shape == (4, 77, 80)
    assert batch["time_ids"].shape == (4, 6) and len(batch["caption"]) == 4

    # A spawned loader worker gets the caches by pickle: the shards are mapped again there.
    clone = pickle.loads(pickle.dumps(latents))
    assert torch.equal(clone.latents(5), latents.latents(5))
    assert torch.equal(LatentCache.open(latents.folder).latents(5), latents.latents(5))


def test_dataset_refuses_a_text_cache_missing_captions(tiny_data_dir, tmp_path):
    data = copy_subset(tiny_data_dir, tmp_path / "data", 3)
    text = ensure_text_cache(make_profile(data, tmp_path / "cache", "data.max_items=2"))
    profile = make_profile(data, tmp_path / "cache")
    with pytest.raises(UserError, match="lacks 1 caption"):
        build_train_dataset(profile, ensure_latent_cache(profile), text)
