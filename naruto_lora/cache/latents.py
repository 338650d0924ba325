"""The latent cache: every item encoded once through the profile's VAE.

Stored per entry: ``latents`` = ``(posterior mean - shift_factor) * scaling_factor`` in fp16,
shape ``[latent_channels, h / f, w / f]`` with ``f`` the VAE's downscale factor (both read from
the VAE config). With ``data.random_flip`` each image has two entries (mirrored and not); the
training sampler picks one per image per epoch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naruto_lora.cache import manifest
from naruto_lora.cache.builder import BuildReport, Planned, ReadyCache, sync_cache
from naruto_lora.cache.manifest import Index, fingerprint
from naruto_lora.data.sources import (
    RESAMPLE,
    CropPlan,
    ImageError,
    PlannedItem,
    Skipped,
    check_usable,
    image_hash,
    load_rgb,
    plan_items,
    preprocess,
    scan_source,
)
from naruto_lora.util.devices import resolve_device
from naruto_lora.util.errors import UserError

KIND = "latents"
STORE_DTYPE = torch.float16
COMMAND = "nlora cache latents"


@dataclass(frozen=True)
class ItemMeta:
    """What training needs to know about one cached item (sizes in pixels, (h, w) order)."""

    key: str
    source: str
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    bucket: tuple[int, int]
    flip: bool


def item_meta(meta: dict[str, Any]) -> ItemMeta:
    return ItemMeta(
        key=meta["item"],
        source=meta["source"],
        caption=meta["caption"],
        original_size=tuple(meta["original_size"]),
        crop_top_left=tuple(meta["crop_top_left"]),
        target_size=tuple(meta["target_size"]),
        bucket=tuple(meta["target_size"]),
        flip=bool(meta["flip"]),
    )


def latent_cache_dir(profile: Any) -> Path:
    return Path(profile.cache.dir).expanduser() / KIND


def _vae_location(model_cfg: Any) -> tuple[str, str, str]:
    """(id, subfolder, revision) of the VAE ``models.load_vae`` loads."""
    if model_cfg.vae:
        return model_cfg.vae, "", ""
    return model_cfg.pretrained, "vae", model_cfg.revision


def latent_common(model_cfg: Any, data_cfg: Any) -> dict[str, Any]:
    """The fingerprint fields shared by all entries (VAE identity, preprocessing settings).

    Reads only the VAE's config, so checking a cache never loads weights.
    """
    from diffusers import AutoencoderKL

    from naruto_lora.models.loading import resolve_model

    vae_id, subfolder, revision = _vae_location(model_cfg)
    resolved = resolve_model(vae_id)
    kwargs = {"subfolder": subfolder or None, "revision": revision or None}
    try:
        with warnings.catch_warnings():  # diffusers' deprecation noise for offline hub ids
            warnings.simplefilter("ignore", UserWarning)
            config = AutoencoderKL.load_config(resolved, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Could not read the VAE config of '{vae_id}': {str(exc).splitlines()[0]}",
            hint="Check model.vae / --vae (a hub id needs network access once).",
        ) from exc
    return {
        "vae": vae_id,
        "vae_subfolder": subfolder,
        "vae_revision": manifest.component_revision(resolved, vae_id, [subfolder], revision),
        "vae_config": fingerprint({k: v for k, v in config.items() if not k.startswith("_")}),
        "scaling_factor": float(config.get("scaling_factor", 1.0)),
        "shift_factor": float(config.get("shift_factor") or 0.0),
        "latent_channels": int(config.get("latent_channels", 4)),
        "downscale_factor": 2 ** (len(config.get("block_out_channels", [0])) - 1),
        "resolution": data_cfg.resolution,
        "buckets": data_cfg.buckets,
        "center_crop": data_cfg.center_crop,
        "store_dtype": str(STORE_DTYPE).removeprefix("torch."),
        "posterior": "mean",
        "resample": RESAMPLE,
    }


def entry_key(item_key: str, flip: bool) -> str:
    # A fixed prefix, not a suffix, so no file name can collide with another item's variant.
    return f"{'F' if flip else 'N'}:{item_key}"


def _planned_entry(pi: PlannedItem, plan: CropPlan, common: dict[str, Any]) -> Planned:
    factor, channels = common["downscale_factor"], common["latent_channels"]
    meta = {
        "item": pi.item.key,
        "source": pi.item.source,
        "caption": pi.item.caption,
        "image": pi.image_hash,
        **plan.fields(),
        "crop_top_left": list(plan.crop_top_left),
        "shape": [channels, plan.target_size[0] // factor, plan.target_size[1] // factor],
    }
    fields = {"common": common, "image": pi.image_hash, **plan.fields()}
    return Planned(
        entry_key(pi.item.key, plan.flip), fingerprint(fields), meta, plan.target_size, (pi, plan)
    )


def vae_encoder(model_cfg: Any, device: torch.device):
    """(prepare, encode) for the builder: decode + preprocess on the CPU, encode on ``device``.

    The VAE runs in fp16 only on a GPU and only when it is fp16-safe (SDXL's own VAE overflows
    to NaN in fp16); otherwise fp32.
    """
    from naruto_lora.models.loading import latent_scale, load_vae, vae_is_fp16_safe

    probe = load_vae(model_cfg, torch.float32)
    dtype = torch.float32
    if device.type == "cuda" and vae_is_fp16_safe(model_cfg, probe):
        dtype = torch.float16
        probe = load_vae(model_cfg, dtype)  # loading in fp16 keeps diffusers' fp32 modules fp32
    vae = probe.to(device).eval().requires_grad_(False)
    _, scaling, shift = latent_scale(vae)

    def prepare(batch: list[Planned]) -> list[torch.Tensor | str]:
        images: dict[str, Any] = {}
        out: list[torch.Tensor | str] = []
        for p in batch:
            pi, plan = p.payload
            if pi.item.key not in images:
                images[pi.item.key] = _decode(pi)
            image = images[pi.item.key]
            try:
                out.append(image if isinstance(image, str) else preprocess(image, plan))
            except ImageError as exc:
                out.append(str(exc))
        return out

    @torch.no_grad()
    def encode(prepared: list[torch.Tensor | str]) -> list[dict[str, torch.Tensor] | str]:
        results: list[Any] = list(prepared)
        ready = [i for i, x in enumerate(prepared) if isinstance(x, torch.Tensor)]
        if ready:
            pixels = torch.stack([prepared[i] for i in ready]).to(device=device, dtype=dtype)
            mean = vae.encode(pixels).latent_dist.mode().float()
            latents = ((mean - shift) * scaling).to(STORE_DTYPE).cpu()
            for j, i in enumerate(ready):
                item = latents[j].clone()
                ok = bool(torch.isfinite(item).all())
                results[i] = {"latents": item} if ok else "the VAE produced non-finite latents"
        return results

    return prepare, encode


def _decode(pi: PlannedItem) -> Any:
    try:
        data = pi.item.blob.read()
        if image_hash(data) != pi.image_hash:
            return "the file changed while the cache was being built; run again"
        return load_rgb(data)
    except (ImageError, OSError) as exc:
        return str(exc)


class LatentCache(ReadyCache):
    """A ready latent cache: ``items[i]`` describes entry i, ``latents(i)`` reads it."""

    kind = KIND
    label = "latent"

    def __init__(
        self,
        folder: Path,
        index: Index,
        keys: list[str],
        metas: list[dict[str, Any]] | None = None,
        report: BuildReport | None = None,
    ):
        super().__init__(folder, index, keys, report)
        metas = metas if metas is not None else [index.entries[k].meta for k in self.keys]
        self.items: list[ItemMeta] = [item_meta(m) for m in metas]

    def stored(self, i: int) -> torch.Tensor:
        """Entry i's latents exactly as stored (fp16), as a read-only-by-convention view."""
        return self._tensor(self.keys[i], "latents")

    def latents(self, i: int) -> torch.Tensor:
        """Entry i's latents as a float32 tensor [C, h, w] (a copy the caller may change)."""
        return self.stored(i).to(torch.float32, copy=True)


def _print_warnings(messages: list[str]) -> None:
    from rich.markup import escape

    from naruto_lora.util.console import err_console

    for message in messages:
        err_console.print(f"[yellow]warning:[/] {escape(message)}")


# Beyond this factor an upscaled image is mostly interpolation: the LoRA would learn blur.
MAX_UPSCALE = 4.0


def upscale_warnings(planned_items: list[Any]) -> list[str]:
    """One warning naming the images much smaller than the training size (a 1x1 px image at
    64 px is upscaled 64x); they are still used."""
    small = []
    for pi in planned_items:
        plan = pi.plans[0]
        (h, w), (th, tw) = plan.original_size, plan.target_size
        factor = max(th / h, tw / w)
        if factor > MAX_UPSCALE:
            small.append((factor, f"{pi.item.source} ({w}x{h} px, {factor:.0f}x)"))
    if not small:
        return []
    small.sort(reverse=True)
    shown = "; ".join(text for _, text in small[:5])
    more = f" (and {len(small) - 5} more)" if len(small) > 5 else ""
    return [
        f"{len(small)} image(s) are upscaled more than {MAX_UPSCALE:g}x to the training size "
        f"and will look blurred: {shown}{more}. Use larger images, remove them, or lower "
        "data.resolution."
    ]


def plan_latent_entries(
    profile: Any, strict: bool = False
) -> tuple[list[Planned], list[Skipped], dict[str, Any], Any]:
    """Scan the data, hash and plan every item: (entries, skipped, common fields, scan)."""
    from naruto_lora.util.console import progress

    scan = scan_source(profile.data, strict=strict)
    _print_warnings(scan.warnings)
    common = latent_common(profile.model, profile.data)
    with progress("image") as bar:
        task = bar.add_task("Checking images", total=len(scan.items))
        planned_items, plan_skipped = plan_items(
            scan.items, profile.data, profile.train.seed, lambda: bar.advance(task)
        )
    skipped = scan.skipped + plan_skipped
    check_usable(scan.description, len(planned_items), skipped, strict)
    _print_warnings(upscale_warnings(planned_items))
    entries = [_planned_entry(pi, plan, common) for pi in planned_items for plan in pi.plans]
    return entries, skipped, common, scan


def ensure_latent_cache(
    profile: Any,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    strict: bool = False,
    auto: bool = True,
) -> LatentCache:
    """Validate the profile's latent cache; encode what is missing or stale (``auto``), or
    raise a UserError naming what is missing and the command that builds it."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1.")
    folder = latent_cache_dir(profile)
    entries, skipped, common, scan = plan_latent_entries(profile, strict)
    index, report = sync_cache(
        folder,
        KIND,
        common,
        entries,
        lambda: vae_encoder(profile.model, resolve_device(device)),
        batch_size=batch_size,
        shard_items=profile.cache.shard_items,
        auto=auto,
        command=COMMAND,
        skipped=skipped,
        skipped_of=lambda p, reason: Skipped(p.meta["item"], p.meta["source"], reason),
        unit="image",
    )
    report.warnings = scan.warnings
    ready = [p for p in entries if _is_ready(index, p)]
    check_usable(scan.description, len(ready), report.skipped, strict)
    return LatentCache(folder, index, [p.key for p in ready], [p.meta for p in ready], report)


def _is_ready(index: Index, p: Planned) -> bool:
    entry = index.entries.get(p.key)
    return entry is not None and entry.fingerprint == p.fingerprint
