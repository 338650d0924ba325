"""FLOPs of the full-size SDXL UNet, counted (not estimated) on fake tensors: a forward pass, and a
LoRA training micro-step (forward + backward, frozen base) with and without gradient
checkpointing, at each shipped profile's resolution. Attention is included; 2 FLOPs per
multiply-add (``torch.utils.flop_counter``'s convention).

    python benchmarks/bench_flops.py [--resolution 1024 --resolution 768 ...] [--json]

Needs no GPU and no weights (published SDXL configs); about a minute per resolution on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


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


def table(resolutions: list[int]) -> list[dict[str, Any]]:
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plugins.manager import load_profile

    rows = []
    for resolution in resolutions:
        base = load_profile(
            "14gb", overrides=[f"data.resolution={resolution}", "train.batch_size=1"]
        )
        configs = load_model_configs(base.model)
        plain = load_profile(
            "14gb",
            overrides=[
                f"data.resolution={resolution}",
                "plugins.gradient_checkpointing.enabled=false",
            ],
        )
        forward = counted(base, configs, training=False)
        step = counted(plain, configs, training=True)
        checkpointed = counted(base, configs, training=True)
        rows.append(
            {
                "resolution": resolution,
                "forward_tflop": forward / 1e12,
                "step_tflop": step / 1e12,
                "step_over_forward": step / forward,
                "step_checkpointed_tflop": checkpointed / 1e12,
                "checkpointed_over_forward": checkpointed / forward,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = table(args.resolution or [1024, 768, 512])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("SDXL UNet, LoRA rank 16 on to_q/to_k/to_v/to_out.0, batch 1, TFLOP per image:")
        print(f"{'px':>6} {'forward':>9} {'step':>9} {'x fwd':>6} {'step+ckpt':>10} {'x fwd':>6}")
        for r in rows:
            print(
                f"{r['resolution']:>6} {r['forward_tflop']:>9.2f} {r['step_tflop']:>9.2f} "
                f"{r['step_over_forward']:>6.2f} {r['step_checkpointed_tflop']:>10.2f} "
                f"{r['checkpointed_over_forward']:>6.2f}"
            )
    print(f"[bench_flops took {time.perf_counter() - started:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
