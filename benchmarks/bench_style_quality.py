"""Style-transfer quality side by side: ``nlora train`` against a plain reference loop.

Both train a LoRA on the toy style set (``nlora:toy-style``) from the committed toy base
(``nlora:toy-base``) with the same settings (the ``tiny`` profile's: rank, alpha, targets,
learning rate, schedule, batch, steps, seed). The reference loop is written here from diffusers
and peft alone, nothing of ours: ``UNet2DConditionModel.add_adapter`` with a peft ``LoraConfig``,
the standard DDPM epsilon objective on VAE latents, the pipeline's own ``encode_prompt``, AdamW,
and ``StableDiffusionXLPipeline.save_lora_weights``. Both LoRAs are then read back through
diffusers' ``load_lora_weights`` and sampled on the held-out prompts at a fixed seed; the style
score and the content check (``naruto_lora.demo.style``) score the images.

    python benchmarks/bench_style_quality.py            # about 12 minutes on two CPU threads

Prints one table (markdown) with the base, ours and the reference.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from naruto_lora.demo import style, toy


def profile_settings(name: str) -> dict:
    """The settings both loops use, read from the profile (not re-typed here)."""
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(name)
    return {
        "rank": profile.lora.rank,
        "alpha": profile.lora.alpha,
        "targets": list(profile.lora.target_modules),
        "lr": profile.train.learning_rate,
        "warmup": profile.train.lr_warmup_steps,
        "scheduler": profile.train.lr_scheduler,
        "batch": profile.train.batch_size,
        "steps": profile.train.max_steps,
        "seed": profile.train.seed,
        "resolution": profile.data.resolution,
        "guidance": profile.validation.guidance_scale,
        "sample_steps": profile.validation.num_inference_steps,
    }


def train_ours(profile: str, work: Path) -> Path:
    from click.testing import CliRunner

    from naruto_lora.cli import cli

    args = ["train", "-p", profile, "--device", "cpu", "--output", str(work / "ours")]
    args += ["--cache-dir", str(work / "cache")]
    args += ["--set", "validation.every_steps=0", "--set", "train.checkpoint_every=0"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"nlora train failed:\n{result.output}")
    return work / "ours"


def _pixels(images) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_reference(settings: dict, work: Path) -> Path:
    """A plain LoRA loop from diffusers + peft, the standard epsilon objective, nothing cached
    beyond what a reader of the diffusers docs would cache (latents and prompt embeddings)."""
    import json

    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image

    torch.manual_seed(settings["seed"])
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(toy.toy_base_dir()), torch_dtype=torch.float32
    )
    folder = toy.ensure_toy_dataset(styled=True)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(folder / row["file_name"]) for row in rows]
    captions = [row["text"] for row in rows]
    vae, unet = pipe.vae, pipe.unet
    with torch.no_grad():
        latents = vae.encode(_pixels(images)).latent_dist.sample() * vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=settings["rank"],
            lora_alpha=settings["alpha"],
            init_lora_weights="gaussian",
            target_modules=settings["targets"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings["lr"])
    noise_scheduler = DDPMScheduler.from_pretrained(str(toy.toy_base_dir()), subfolder="scheduler")
    res = settings["resolution"]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
    steps, warmup, batch = settings["steps"], settings["warmup"], settings["batch"]
    gen = torch.Generator().manual_seed(settings["seed"])
    unet.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(
            noise_scheduler.add_noise(x0, noise, t),
            t,
            encoder_hidden_states=embeds[idx],
            added_cond_kwargs={"text_embeds": pooled[idx], "time_ids": time_ids.repeat(batch, 1)},
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # The profile's schedule: linear warm-up, then cosine to zero.
        if step < warmup:
            factor = step / max(1, warmup)
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = settings["lr"] * factor
    out = work / "reference"
    StableDiffusionXLPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )
    return out


def score(lora_dir: Path, settings: dict) -> tuple[list, list]:
    """(base scores, LoRA scores) on the held-out prompts, via diffusers' own loader."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(toy.toy_base_dir()), torch_dtype=torch.float32
    )
    pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    scores = style.score_samples(
        pipe,
        list(toy.HELD_OUT_PROMPTS),
        scales=(0.0, 1.0),
        seed=0,
        steps=25,
        guidance=settings["guidance"],
    )
    return [s for s in scores if s.scale == 0.0], [s for s in scores if s.scale == 1.0]


def row(name: str, scores: list, seconds: float | None) -> str:
    mean = sum(s.style for s in scores) / len(scores)
    low = min(s.style for s in scores)
    content = sum(s.content.passed for s in scores)
    took = f"{seconds:.0f}" if seconds is not None else "-"
    return f"| {name} | {mean:.3f} | {low:.3f} | {content} / {len(scores)} | {took} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep the two LoRAs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = profile_settings(args.profile)
    work = args.keep or Path(tempfile.mkdtemp(prefix="nlora-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ours = train_ours(args.profile, work)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = train_reference(settings, work)
    reference_s = time.perf_counter() - started
    base, ours_scores = score(ours, settings)
    _, reference_scores = score(reference, settings)
    print(f"settings: {settings}")
    print("| model | mean style | lowest style | content | train s |")
    print("|---|---|---|---|---|")
    print(row("base (LoRA scale 0)", base, None))
    print(row("nlora train", ours_scores, ours_s))
    print(row("reference loop (diffusers + peft)", reference_scores, reference_s))
    for name, scores in (("ours", ours_scores), ("reference", reference_scores)):
        for s in scores:
            print(f"  {name} {s.prompt!r}: style {s.style:.3f}, {s.content.summary()}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
