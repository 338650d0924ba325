"""FLOPs of the full-size SDXL UNet, counted (not estimated) on fake tensors: a forward pass, and a
LoRA training micro-step (forward + backward, frozen base) with and without gradient
checkpointing, at each shipped profile's resolution. Attention is included; 2 FLOPs per
multiply-add (``torch.utils.flop_counter``'s convention).

    python benchmarks/bench_flops.py [--resolution 1024 --resolution 768 ...] [--json]
    python benchmarks/bench_flops.py --model nlora:tiny --resolution 128

Beside the step it counts what diffusers' ``train_text_to_image_lora_sdxl.py`` also runs for
every image (the VAE encoder, both text encoders on 77 tokens) and prints the ratio our step /
its step in FLOPs: the speed ratio ``bench_vs_diffusers.py`` can reach when both run at the same
efficiency (our caches remove that work; the UNet step itself is the same computation).

Needs no GPU and no weights (published SDXL configs); about a minute per resolution on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encode_images_as_the_script, encode_prompts_as_the_script  # noqa: E402


def counted(profile: Any, configs: Any, training: bool) -> float:
    """UNet FLOPs of one micro-step of ``profile`` (batch, resolution, LoRA, checkpointing as it
    says), or of one forward pass without gradients."""
    from naruto_lora.plan.build import build_unet
    from naruto_lora.plan.core import (
        FlopCounter,
        SimTarget,
        autocast_for,
        tracking,
        weight_dtype_for,
    )
    from naruto_lora.plan.sim import text_conditioning
    from naruto_lora.plugins.manager import build_plugin_manager

    target = SimTarget()
    dtype, autocast_dtype = weight_dtype_for(profile, target)
    batch, size = profile.train.batch_size, profile.data.resolution // configs.vae_scale_factor
    with tracking(target) as tracker:
        unet, _ = build_unet(profile, configs, build_plugin_manager(profile), tracker, dtype, True)
        embeds, pooled = text_conditioning(configs, batch)
        latents = torch.zeros(batch, configs.unet["in_channels"], size, size, dtype=dtype)
        time_ids = torch.zeros(batch, 6, dtype=dtype)
        counter = FlopCounter()
        with counter, torch.set_grad_enabled(training):
            with autocast_for(target, autocast_dtype):
                out = unet(
                    latents,
                    torch.zeros(batch, dtype=torch.long),
                    embeds.to(dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
                )
            if training:
                out.sample.float().square().mean().backward()
    return float(counter.flops)


def encoders_counted(profile: Any, configs: Any) -> tuple[float, float]:
    """FLOPs of one image's VAE encode at the profile's resolution and of both text encoders on
    one prompt, forward only (what the diffusers script runs every step and our caches hold)."""
    from naruto_lora.plan.build import build_text_encoders, build_vae
    from naruto_lora.plan.core import FlopCounter, SimTarget, tracking, weight_dtype_for

    target = SimTarget()
    dtype, _ = weight_dtype_for(profile, target)
    size = profile.data.resolution
    with tracking(target) as tracker, torch.no_grad():
        vae = build_vae(profile, configs, tracker, dtype, True)
        pixels = torch.zeros(1, 3, size, size, dtype=next(vae.parameters()).dtype)
        with FlopCounter() as vae_counter:
            encode_images_as_the_script(vae, pixels)
        text = build_text_encoders(profile, configs, tracker, dtype, True)
        with FlopCounter() as text_counter:
            encode_prompts_as_the_script(text.encoders, 1)
    return float(vae_counter.flops), float(text_counter.flops)


def table(resolutions: list[int], model: str = "") -> list[dict[str, Any]]:
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plugins.manager import load_profile

    chosen = [f'model.pretrained="{model}"', 'model.vae=""'] if model else []
    rows = []
    for resolution in resolutions:
        base = load_profile(
            "14gb", overrides=[*chosen, f"data.resolution={resolution}", "train.batch_size=1"]
        )
        configs = load_model_configs(base.model)
        plain = load_profile(
            "14gb",
            overrides=[
                *chosen,
                f"data.resolution={resolution}",
                "train.batch_size=1",
                "plugins.gradient_checkpointing.enabled=false",
            ],
        )
        forward = counted(base, configs, training=False)
        step = counted(plain, configs, training=True)
        checkpointed = counted(base, configs, training=True)
        vae_encode, text = encoders_counted(plain, configs)
        rows.append(
            {
                "resolution": resolution,
                "forward_tflop": forward / 1e12,
                "step_tflop": step / 1e12,
                "step_over_forward": step / forward,
                "step_checkpointed_tflop": checkpointed / 1e12,
                "checkpointed_over_forward": checkpointed / forward,
                "vae_encode_tflop": vae_encode / 1e12,
                "text_encoders_tflop": text / 1e12,
                "ours_over_diffusers_script": step / (step + vae_encode + text),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, action="append")
    parser.add_argument("--model", default="", help="model id or folder (default: SDXL's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = table(args.resolution or [1024, 768, 512], args.model)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        name = args.model or "SDXL"
        print(f"{name} UNet, LoRA rank 16 on to_q/to_k/to_v/to_out.0, batch 1, TFLOP per image:")
        print(
            f"{'px':>6} {'forward':>9} {'step':>9} {'x fwd':>6} {'step+ckpt':>10} {'x fwd':>6}"
            f" {'vae enc':>9} {'text':>9} {'ours/script':>12}"
        )
        digits = 2 if max(r["step_tflop"] for r in rows) >= 0.1 else 5
        for r in rows:
            print(
                f"{r['resolution']:>6} {r['forward_tflop']:>9.{digits}f} "
                f"{r['step_tflop']:>9.{digits}f} {r['step_over_forward']:>6.2f} "
                f"{r['step_checkpointed_tflop']:>10.{digits}f} "
                f"{r['checkpointed_over_forward']:>6.2f} {r['vae_encode_tflop']:>9.{digits}f} "
                f"{r['text_encoders_tflop']:>9.{digits}f} {r['ours_over_diffusers_script']:>12.2f}"
            )
        print(
            "ours/script: our step's FLOPs (latents and text read from the caches) over the "
            "diffusers script's (UNet step + VAE encode + both text encoders), no checkpointing."
        )
    print(f"[bench_flops took {time.perf_counter() - started:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
