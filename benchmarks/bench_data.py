"""What reading the caches costs training. Runs on a CPU; prints the numbers.

1. Per-item read latency at SDXL's real sizes (latents 4 x 128 x 128, prompt_embeds 77 x 2048,
   pooled_embeds 1280, all fp16): our memory-mapped shards against the reference recipe's one
   ``torch.load`` of a ``.pt`` file per sample, with the files in the page cache (warm) and
   evicted from it first (cold, via posix_fadvise DONTNEED).
2. The loader against a real training step on the tiny model (UNet forward + backward + AdamW on
   the LoRA weights, batch 4): loader throughput, and the time a training loop waits for data
   as a share of its step time (target: under 2 %).

    python benchmarks/bench_data.py [--items 256] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NLORA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SDXL_SHAPES = {"latents": (4, 128, 128), "prompt_embeds": (77, 2048), "pooled_embeds": (1280,)}


def _evict(paths: list[Path]) -> None:
    """Drop files from the page cache so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _percentiles(samples_s: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_s)
    return statistics.median(ordered) * 1e3, ordered[int(0.99 * (len(ordered) - 1))] * 1e3


def _build_sdxl_shaped_caches(folder: Path, items: int):
    """Real cache folders (the builder's own code path) filled with random SDXL-sized tensors."""
    from naruto_lora.cache.builder import Planned, sync_cache
    from naruto_lora.cache.latents import LatentCache
    from naruto_lora.cache.text import TextCache, caption_key

    def random_encoder(names: tuple[str, ...]):
        def encode(batch):
            return [
                {n: torch.randn(SDXL_SHAPES[n]).half() for n in names} for _ in range(len(batch))
            ]

        return (lambda batch: batch), encode

    metas = [
        {
            "item": f"{i:05d}.png",
            "source": f"{i:05d}.png",
            "caption": f"caption {i}",
            "original_size": [1280, 1280],
            "crop_top_left": [128, 128],
            "target_size": [1024, 1024],
            "flip": False,
        }
        for i in range(items)
    ]
    planned = [Planned(f"N:{m['item']}", str(i), m, None, None) for i, m in enumerate(metas)]
    kwargs = dict(
        batch_size=16, shard_items=256, auto=True, command="", skipped=[], skipped_of=None
    )
    index, _ = sync_cache(
        folder / "latents", "latents", {}, planned, lambda: random_encoder(("latents",)), **kwargs
    )
    latents = LatentCache(folder / "latents", index, [p.key for p in planned])
    captions = [m["caption"] for m in metas]
    text_planned = [
        Planned(caption_key(c), "0", {"caption": c, "source": c}, None, c) for c in captions
    ]
    index, _ = sync_cache(
        folder / "text",
        "text",
        {},
        text_planned,
        lambda: random_encoder(("prompt_embeds", "pooled_embeds")),
        **kwargs,
    )
    return latents, TextCache(folder / "text", index, [p.key for p in text_planned]), captions


def _time_reads(read, count: int) -> list[float]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist()
    out = []
    for i in order:
        started = time.perf_counter()
        read(i)
        out.append(time.perf_counter() - started)
    return out


def bench_item_reads(folder: Path, items: int) -> list[tuple[str, float, float]]:
    from naruto_lora.cache.latents import LatentCache
    from naruto_lora.cache.text import TextCache

    latents, text, captions = _build_sdxl_shaped_caches(folder, items)
    pt_dir = folder / "pt"
    pt_dir.mkdir()
    for i in range(items):  # the reference recipe's layout: one file per sample
        torch.save({"latents": latents.stored(i).clone()}, pt_dir / f"latent_{i}.pt")
        prompt, pooled = text.embeddings(captions[i])
        torch.save({"prompt_embeds": prompt, "pooled_embeds": pooled}, pt_dir / f"text_emb_{i}.pt")

    def ours(i: int) -> None:
        latents.latents(i)
        text.embeddings(captions[i])

    def per_file(i: int) -> None:
        torch.load(pt_dir / f"latent_{i}.pt", weights_only=True)["latents"].float()
        torch.load(pt_dir / f"text_emb_{i}.pt", weights_only=True)

    rows = []
    for label, read in (("shards (ours)", ours), ("one .pt per sample", per_file)):
        rows.append((f"{label}, warm", *_percentiles(_time_reads(read, items))))
    # Pages still mapped cannot be evicted: unmap everything first, then map afresh.
    del latents, text
    gc.collect()
    _evict(sorted(folder.glob("*/shards/*.safetensors")))
    latents = LatentCache.open(folder / "latents")
    text = TextCache.open(folder / "text")
    rows.append(("shards (ours), cold", *_percentiles(_time_reads(ours, items))))
    _evict(sorted(pt_dir.iterdir()))
    rows.append(("one .pt per sample, cold", *_percentiles(_time_reads(per_file, items))))
    return rows


def _tiny_training_step(profile):
    """A closure doing one real LoRA training step of the tiny UNet on a batch."""
    from naruto_lora.lora.inject import inject_lora
    from naruto_lora.models.loading import load_noise_scheduler, load_unet

    unet = load_unet(profile.model)
    params = inject_lora(unet, profile.lora)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = load_noise_scheduler(profile.model)
    generator = torch.Generator().manual_seed(0)

    def step(batch) -> None:
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator
        )
        prediction = unet(
            scheduler.add_noise(latents, noise, timesteps),
            timesteps,
            encoder_hidden_states=batch["prompt_embeds"].float(),
            added_cond_kwargs={
                "text_embeds": batch["pooled_embeds"].float(),
                "time_ids": batch["time_ids"],
            },
        ).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _epochs(dataset, batch_size: int, prefetch: int):
    from naruto_lora.cache import make_batch_sampler, make_loader

    epoch = 0
    while True:  # a fresh sampler and loader per epoch, as training does
        sampler = make_batch_sampler(dataset, batch_size, seed=0, epoch=epoch)
        yield from make_loader(dataset, sampler, prefetch=prefetch)
        epoch += 1


def _train_loop(dataset, step, steps: int, prefetch: int) -> dict[str, float]:
    """Step time and time waited for data per step, over ``steps`` steps after a warm-up."""
    batches = _epochs(dataset, 4, prefetch)
    for _ in range(3):
        step(next(batches))
    waits, steps_s = [], []
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - started
        step(batch)
        waits.append(waited)
        steps_s.append(time.perf_counter() - started)
    return {
        "step_ms": statistics.mean(steps_s) * 1e3,
        "wait_ms": statistics.mean(waits) * 1e3,
        "wait_median_ms": statistics.median(waits) * 1e3,
    }


def bench_training(folder: Path, steps: int) -> dict[str, float]:
    from naruto_lora.cache import (
        build_train_dataset,
        ensure_latent_cache,
        ensure_text_cache,
        make_batch_sampler,
        make_loader,
    )
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile("smoke", overrides=[f'cache.dir="{folder / "smoke"}"'])
    dataset = build_train_dataset(profile, ensure_latent_cache(profile), ensure_text_cache(profile))
    started, count = time.perf_counter(), 0
    for epoch in range(20):
        for batch in make_loader(dataset, make_batch_sampler(dataset, 4, seed=0, epoch=epoch)):
            count += len(batch["index"])
    loader_items_s = count / (time.perf_counter() - started)
    step = _tiny_training_step(profile)
    return {
        "items": len(dataset),
        "loader_items_s": loader_items_s,
        "read-ahead (prefetch=2)": _train_loop(dataset, step, steps, prefetch=2),
        "no read-ahead (prefetch=0)": _train_loop(dataset, step, steps, prefetch=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=256, help="SDXL-sized items for part 1")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps for part 2")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("NLORA_BENCH_DIR")) as tmp:
        reads = bench_item_reads(Path(tmp) / "sdxl", args.items)
        train = bench_training(Path(tmp), args.steps)
    print(f"## Per-item read at SDXL sizes ({args.items} items; latents + both embeddings)")
    print("| reader | median ms | p99 ms |\n|---|---|---|")
    for label, median, p99 in reads:
        print(f"| {label} | {median:.3f} | {p99:.3f} |")
    print(
        f"\n## Loader vs a tiny-model training step (batch 4, {train['items']} items, "
        f"{args.threads} thread(s), {args.steps} steps)"
    )
    print(f"loader alone: {train['loader_items_s']:.0f} items/s\n")
    print("| loader | step ms (mean) | data wait ms/step (mean) | median | wait / step |")
    print("|---|---|---|---|---|")
    for label in ("read-ahead (prefetch=2)", "no read-ahead (prefetch=0)"):
        r = train[label]
        share = 100 * r["wait_ms"] / r["step_ms"]
        print(
            f"| {label} | {r['step_ms']:.1f} | {r['wait_ms']:.3f} | {r['wait_median_ms']:.3f} "
            f"| {share:.2f} % |"
        )


if __name__ == "__main__":
    main()
