"""Helpers shared by the data and cache tests (not a test module)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_profile(data: Path | str, cache_dir: Path, *overrides: str):
    """The tiny profile reading ``data`` with its caches in ``cache_dir`` (small shards)."""
    from naruto_lora.plugins.manager import load_profile

    return load_profile(
        "smoke",
        overrides=[
            f"data.source={json.dumps(str(data))}",
            f"cache.dir={json.dumps(str(cache_dir))}",
            "cache.shard_items=4",
            *overrides,
        ],
    )


def copy_subset(src: Path, dst: Path, count: int) -> Path:
    """The first ``count`` items of an imagefolder data set, copied (so tests may change it)."""
    dst.mkdir(parents=True, exist_ok=True)
    lines = (src / "metadata.jsonl").read_text().splitlines()[:count]
    for line in lines:
        name = json.loads(line)["file_name"]
        shutil.copy(src / name, dst / name)
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def write_imagefolder(folder: Path, images: dict, captions: dict | None = None) -> Path:
    """Save PIL images under their names and a metadata.jsonl with ``text`` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, image in images.items():
        image.save(folder / name)
        record = {"file_name": name}
        caption = (captions or {}).get(name, f"picture {Path(name).stem}")
        if caption is not None:
            record["text"] = caption
        lines.append(json.dumps(record))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@torch.no_grad()
def direct_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The reference: diffusers' VAE encode of one preprocessed image, posterior mean scaled by
    the config's own ``scaling_factor`` (and shift), in fp32."""
    dist = vae.encode(pixels.unsqueeze(0).float()).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean - shift) * vae.config.scaling_factor)[0]


def all_latents(cache) -> dict[tuple[str, bool], torch.Tensor]:
    return {(it.key, it.flip): cache.latents(i) for i, it in enumerate(cache.items)}
