"""Tiled VAE decoding of validation samples: the decoder runs on overlapping tiles of
``tile_px`` pixels (blended at the seams, diffusers' ``AutoencoderKL.tiled_decode``) instead of
the whole image at once, so its activations are those of one tile.

At 1024 px the SDXL VAE decode is the peak of a run with validation samples (about 1.5 GiB of
activations, ``nlora plan``); 512 px tiles cut that to about a quarter, which keeps the 1024 px
rank-16 recipe's validation samples within an 8 GB card. Only decoding is tiled: with
``cache.latents = false`` training encodes with the same VAE, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class VAETilingConfig:
    tile_px: int = 512  # tile size in image pixels (a multiple of the VAE's downscale factor)
    overlap: float = 0.25  # the fraction of a tile blended with its neighbour

    def validate(self) -> None:
        if self.tile_px < 64 or self.tile_px % 8:
            raise UserError(
                f"plugins.vae_tiling.tile_px = {self.tile_px!r} must be a multiple of 8, >= 64."
            )
        if not 0.0 <= self.overlap < 0.5:
            raise UserError(f"plugins.vae_tiling.overlap = {self.overlap!r} must be in [0, 0.5).")


def tile_decoding(vae: Any, tile_px: int, overlap: float) -> None:
    """Make ``vae.decode`` tile latents larger than one tile (encoding stays as it is)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    tile_latent = tile_px // factor
    whole = vae.decode

    def decode(z: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        if z.shape[-1] > tile_latent or z.shape[-2] > tile_latent:
            return vae.tiled_decode(z, return_dict=return_dict)
        return whole(z, return_dict=return_dict, **kwargs)

    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_latent
    vae.tile_overlap_factor = overlap
    vae.decode = decode


class VAETiling(Plugin):
    name = "vae_tiling"
    Config = VAETilingConfig
    description = "Decodes validation samples in tiles: far less VRAM at 1024 px."
    memory_role = "tiled_decode"  # nlora plan --fit may switch it

    @hookimpl
    def nlora_prepare_validation_vae(self, vae: Any, profile: Any) -> None:
        tile_decoding(vae, self.config.tile_px, self.config.overlap)


PLUGIN = VAETiling
