"""The training data set: what one training item is, from the caches or from the images.

Item i is a dict with ``index``, ``caption``, ``time_ids`` (SDXL's six micro-conditioning
numbers, from the item's real sizes and crop), then ``latents`` (from the latent cache) or
``pixel_values`` (decoded and preprocessed now, for ``cache.latents = false``), and
``prompt_embeds`` / ``pooled_embeds`` when a text cache is given.

With ``data.random_flip`` the data set has two entries per image (mirrored and not), listed
together in ``groups``; the batch sampler uses exactly one of them per image per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from naruto_lora.cache.latents import ItemMeta, LatentCache
from naruto_lora.cache.text import COMMAND as TEXT_COMMAND
from naruto_lora.cache.text import TextCache
from naruto_lora.data.sources import (
    CropPlan,
    ImageError,
    Skipped,
    SourceItem,
    check_usable,
    load_rgb,
    plan_items,
    preprocess,
    scan_source,
    time_ids,
)
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class PixelSource:
    """Where the pixel path reads item i: the source image and its crop plan."""

    item: SourceItem
    plan: CropPlan


class TrainDataset(Dataset):
    def __init__(
        self,
        items: list[ItemMeta],
        latent_cache: LatentCache | None = None,
        text_cache: TextCache | None = None,
        pixels: list[PixelSource] | None = None,
    ):
        if (latent_cache is None) == (pixels is None):
            raise ValueError("give either a latent cache or pixel sources")
        self.items = items
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.pixels = pixels
        self.buckets: list[tuple[int, int]] = [it.bucket for it in items]
        self.time_ids = torch.stack(
            [time_ids(it.original_size, it.crop_top_left, it.target_size) for it in items]
        )
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.key, []).append(i)
        self.groups: list[list[int]] = list(groups.values())
        if text_cache is not None:
            missing = sorted({it.caption for it in items if it.caption not in text_cache})
            if missing:
                raise UserError(
                    f"The text cache '{text_cache.folder}' lacks {len(missing)} caption(s) of "
                    f"this data set, e.g. {missing[0]!r}.",
                    hint=f"Run `{TEXT_COMMAND}` with the training profile.",
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        out: dict[str, Any] = {"index": i, "caption": item.caption, "time_ids": self.time_ids[i]}
        if self.latent_cache is not None:
            out["latents"] = self.latent_cache.latents(i)
        else:
            source = self.pixels[i]
            out["pixel_values"] = preprocess(load_rgb(source.item.blob.read()), source.plan)
        if self.text_cache is not None:
            out["prompt_embeds"], out["pooled_embeds"] = self.text_cache.embeddings(item.caption)
        return out

    def get_batch(self, indices: list[int]) -> dict[str, Any]:
        """The collated batch of ``indices`` (all from one bucket), read in bulk: a handful of
        tensor ops per batch instead of a few per item, so a read-ahead thread needs the GIL
        only briefly while the training step runs."""
        index = torch.as_tensor(indices, dtype=torch.long)
        out: dict[str, Any] = {
            "index": index,
            "caption": [self.items[i].caption for i in indices],
            "time_ids": self.time_ids[index],
        }
        if len({self.buckets[i] for i in indices}) > 1:
            raise ValueError(f"batch {indices} mixes buckets: use one bucket per batch")
        if self.latent_cache is not None:
            views = [self.latent_cache.stored(i) for i in indices]
            out["latents"] = torch.stack(views).to(torch.float32)
        else:
            out["pixel_values"] = torch.stack([self[i]["pixel_values"] for i in indices])
        if self.text_cache is not None:
            pairs = [self.text_cache.stored(c) for c in out["caption"]]
            out["prompt_embeds"] = torch.stack([p for p, _ in pairs])
            out["pooled_embeds"] = torch.stack([p for _, p in pairs])
        return out


def _pixel_items(profile: Any) -> tuple[list[ItemMeta], list[PixelSource]]:
    """Plan the data set and decode every image once, so a bad file fails now (with the
    others skipped and listed) rather than in the middle of training."""
    from naruto_lora.util.console import err_console, progress

    scan = scan_source(profile.data)
    with progress("image") as bar:
        task = bar.add_task("Checking images", total=len(scan.items))
        planned, skipped = plan_items(scan.items, profile.data, profile.train.seed)
        items: list[ItemMeta] = []
        pixels: list[PixelSource] = []
        for pi in planned:
            try:
                load_rgb(pi.item.blob.read())
            except (ImageError, OSError) as exc:
                skipped.append(Skipped(pi.item.key, pi.item.source, str(exc)))
                continue
            finally:
                bar.advance(task)
            for plan in pi.plans:
                items.append(
                    ItemMeta(
                        pi.item.key,
                        pi.item.source,
                        pi.item.caption,
                        plan.original_size,
                        plan.crop_top_left,
                        plan.target_size,
                        plan.target_size,
                        plan.flip,
                    )
                )
                pixels.append(PixelSource(pi.item, plan))
    check_usable(scan.description, len(items), skipped + scan.skipped, strict=False)
    for s in skipped + scan.skipped:
        err_console.print(f"[yellow]skipped[/] {s.source}: {s.reason}")
    return items, pixels


def build_train_dataset(
    profile: Any, latent_cache: LatentCache | None, text_cache: TextCache | None
) -> TrainDataset:
    """Training items from the latent cache, or (no latent cache) from the images themselves."""
    if latent_cache is not None:
        return TrainDataset(list(latent_cache.items), latent_cache, text_cache)
    items, pixels = _pixel_items(profile)
    return TrainDataset(items, None, text_cache, pixels)
