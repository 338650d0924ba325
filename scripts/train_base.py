"""Train the toy base model ``nlora:toy-base`` (naruto_lora/assets/toy-base) on plain scenes.

An SDXL-architecture pipeline at toy scale, trained from scratch on one CPU thread:

1. two CLIP text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``) with the
   whole-word BPE tokenizer of ``naruto_lora.tiny``; kept at their seeded random init and frozen
   (their hidden states still tell the words apart; the UNet learns to read them);
2. an AutoencoderKL with downscale factor 4 (64 px -> 4 x 16 x 16 latents) trained to reconstruct
   the plain scenes; its ``scaling_factor`` is set to 1 / std of the latents, as SD's was;
3. a text-time-conditioned UNet trained with the standard DDPM epsilon objective on cached latents
   (SDXL's noise schedule: scaled_linear 0.00085..0.012, 1000 steps), 10 % caption dropout (half to
   zeroed embeddings, what the SDXL pipeline feeds for an empty negative prompt, half to the
   empty string's) so that classifier-free guidance works, and an EMA of its weights.

Seeded; writes progress to stdout and a full pipeline checkpoint every ``--checkpoint-every``
UNet steps (so a run stopped early still leaves usable weights), then the final model to
``--out``. Reproduce the committed weights with::

    OMP_NUM_THREADS=1 python scripts/train_base.py --out naruto_lora/assets/toy-base

(about 55 minutes on one thread of a shared 2-core AMD EPYC: VAE 7, decoder 7, UNet ~40).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from naruto_lora import toy
from naruto_lora.tiny import clip_tokenizers, sdxl_euler_scheduler

TIME_EMBED_DIM = 8


def text_encoders(seed: int):
    """Two small CLIP text encoders at a seeded random init, and their tokenizers."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    tokenizer, tokenizer_2, vocab_size = clip_tokenizers()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    torch.manual_seed(seed)
    cfg = dict(
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=64,
        layer_norm_eps=1e-5,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg)).eval().requires_grad_(False)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval().requires_grad_(False)
    return (tokenizer, tokenizer_2), (text_encoder, text_encoder_2)


def build_vae(channels: tuple[int, ...] = (32, 64, 64)):
    from diffusers import AutoencoderKL

    # Three blocks: downscale factor 2 ** (3 - 1) = 4. No mid-block attention: flat shapes need none.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=toy.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        force_upcast=False,
    )
    # Start the encoder's log-variance channels at -8, not 0 (quant_conv then mixes them, so the
    # posterior's std starts small, not exactly 0.02): with unit noise on the latents a short
    # training run only learns blurry masks and loses the colours.
    with torch.no_grad():
        half = vae.config.latent_channels
        vae.encoder.conv_out.weight[half:] *= 0.01
        vae.encoder.conv_out.bias[half:] = -8.0
    return vae


def build_unet(cross_attention_dim: int, pooled_dim: int, latent_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        transformer_layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=16,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + pooled_dim,
    )


def image_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, log) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # L1 keeps flat colours and edges sharp, MSE punishes a wrong colour; a tiny KL keeps the
        # latent space near the origin (as SD's VAE).
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} l1 {loss.item():.4f} {time.time() - start:.0f}s")
    vae.eval()


def finetune_decoder(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, log) -> None:
    """Train the decoder further with the encoder frozen: sharper outlines and truer colours,
    while the latents (what the UNet learns) stay exactly as they were. The latents get a little
    noise so the decoder forgives the UNet's imperfect samples."""
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    start = time.time()
    for step in range(1, steps + 1):
        x = pixels[torch.randint(0, len(pixels), (batch,), generator=gen)]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        z = z + 0.1 * z.std() * torch.randn(z.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if step % 50 == 0 or step == steps:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def pin_posterior_std(vae, logvar: float = -12.0) -> None:
    """Make the posterior's log-variance a constant -12 (std 0.0025), leaving its mean as it is.

    Our short VAE training lets the std drift to about a quarter of the latents' spread; then
    ``latent_dist.sample()`` (what latent caches, ours included, call) returns noisy latents
    and a LoRA learns to draw noise. SD's VAE has a std far below its latents' spread too.
    """
    half = vae.config.latent_channels
    # The moments come out of quant_conv (a 1x1 conv that mixes all channels), so pin its
    # log-variance rows; the encoder's own conv_out also feeds the mean.
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    last.weight[half:] = 0.0
    last.bias[half:] = logvar


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [vae.encode(pixels[i : i + 64]).latent_dist.mean for i in range(0, len(pixels), 64)]
    )


@torch.no_grad()
def encode_captions(tokenizers, encoders, captions: list[str]):
    """SDXL conditioning: both encoders' penultimate hidden states concatenated, and the second
    encoder's projected pooled output (as ``StableDiffusionXLPipeline.encode_prompt``)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=False):
        ids = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def make_pipeline(vae, tokenizers, encoders, unet):
    from diffusers import StableDiffusionXLPipeline

    scheduler = sdxl_euler_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_pipeline(pipe, folder: Path, half_unet: bool = False) -> None:
    """Save in the diffusers layout; ``half_unet`` stores the UNet in fp16 (the committed model:
    half the size; loaders upcast it with ``torch_dtype=torch.float32``)."""
    from naruto_lora.io import atomic_dir

    with atomic_dir(folder) as tmp:
        if half_unet:
            pipe.unet.to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        pipe.unet.to(torch.float32)


@torch.no_grad()
def check_samples(pipe, prompts: list[str], path: Path, log, seed: int = 0) -> float:
    """Sample ``prompts`` (25 Euler steps, guidance 5), save a strip, return the content pass rate."""
    from PIL import Image

    from naruto_lora.style import content_check

    images = pipe(
        prompts,
        num_inference_steps=25,
        guidance_scale=5.0,
        height=toy.RESOLUTION,
        width=toy.RESOLUTION,
        generator=torch.Generator().manual_seed(seed),
    ).images
    strip = Image.new("RGB", (toy.RESOLUTION * len(images), toy.RESOLUTION))
    for i, image in enumerate(images):
        strip.paste(image, (i * toy.RESOLUTION, 0))
    strip.save(path)
    results = [content_check(image, prompt) for image, prompt in zip(images, prompts, strict=False)]
    log(
        "samples: "
        + "; ".join(f"{p!r}: {r.summary()}" for p, r in zip(prompts, results, strict=False))
    )
    return sum(r.passed for r in results) / len(results)


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=False):
            e.lerp_(p, 1.0 - decay)


def train_unet(unet, latents, caption_idx, embeds, pooled, args, on_checkpoint, log) -> object:
    """DDPM epsilon training on cached latents; returns the EMA copy of the UNet."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(2)
    res = toy.RESOLUTION
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
    zeros_embeds, zeros_pooled = torch.zeros_like(embeds[0]), torch.zeros_like(pooled[0])
    empty = len(embeds) - 1  # the last cached caption is the empty string
    start, step = time.time(), 0
    last = args.stop_after or args.unet_steps  # the lr schedule still spans --unet-steps
    while step < last and time.time() - start < args.max_unet_minutes * 60:
        step += 1
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        x0 = latents[idx]
        cap = caption_idx[idx].clone()
        drop = torch.rand(args.batch, generator=gen)
        cap[drop < 0.05] = empty  # caption dropout, half to "" ...
        ctx, pool = embeds[cap].clone(), pooled[cap].clone()
        zeroed = (drop >= 0.05) & (drop < 0.10)  # ... half to zeros (SDXL's empty negative)
        ctx[zeroed], pool[zeroed] = zeros_embeds, zeros_pooled
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=ctx,
            added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids.expand(args.batch, -1)},
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        warm = min(1.0, step / max(1, args.unet_warmup))
        for group in opt.param_groups:
            group["lr"] = (
                args.unet_lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / args.unet_steps))
            )
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        if step % 25 == 0:
            log(
                f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} "
                f"{time.time() - start:.0f}s"
            )
        if step % args.checkpoint_every == 0:
            on_checkpoint(ema, step)
    log(f"unet stage ended after step {step}")
    return ema


def random_look_training_set(count: int, seed: int) -> tuple[list, list]:
    """``count`` scenes in random looks the captions do not mention (background, outline colour
    and width drawn at random; the fill stays the caption's colour), and their scenes.

    Trained on these, the UNet can draw many looks for one caption, so a LoRA only has to pick
    one (the style's) instead of learning a look the base never drew.
    """
    import random

    rng = random.Random(seed + 7)
    scenes = toy.all_scenes()

    def colour() -> tuple[int, int, int]:
        if rng.random() < 0.5:
            return rng.choice(toy._STRONG)
        return tuple(rng.randrange(256) for _ in range(3))

    chosen, images = [], []
    while len(images) < count:
        scene = rng.choice(scenes)
        fill = toy.COLOURS[scene.colour]
        background = colour()
        if math.dist(background, fill) < 90:  # the shape must stay visible
            continue
        look = {
            "background": background,
            "fill": fill,
            "outline": colour(),
            "width": rng.choice([0.0, rng.uniform(0.015, 0.085)]),
        }
        chosen.append(scene)
        images.append(toy.draw(scene, jitter=rng, palette=look))
    return chosen, images


def load_base(folder: Path):
    """Tokenizers, text encoders and VAE (and the UNet, as a start) of an existing base."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    encoders = (pipe.text_encoder.eval(), pipe.text_encoder_2.eval())
    for module in (*encoders, pipe.vae):
        module.requires_grad_(False)
    return tokenizers, encoders, pipe.vae.eval(), pipe.unet.train()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("naruto_lora/assets/toy-base"))
    parser.add_argument("--work", type=Path, default=Path("nlora-output/toy-base-work"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-scene", type=int, default=12, help="plain drawings per scene")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-channels", type=int, nargs=3, default=[16, 32, 32])
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--decoder-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-only", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vae-only", action="store_true", help="stop after the VAE (trials)")
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=1300)
    parser.add_argument("--unet-lr", type=float, default=8e-4)
    parser.add_argument(
        "--max-unet-minutes",
        type=float,
        default=float("inf"),
        help="stop the UNet stage early (the weights then differ)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="end the UNet stage after this step (0: --unet-steps)",
    )
    parser.add_argument("--unet-warmup", type=int, default=200, help="UNet lr warm-up steps")
    parser.add_argument(
        "--random-look-share",
        type=float,
        default=0.0,
        help="extra UNet training scenes in random looks, as a share of the plain ones "
        "(captions unchanged)",
    )
    parser.add_argument(
        "--from-base",
        type=Path,
        default=None,
        help="UNet stage only: keep this base's text encoders and VAE, start from its UNet",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def vae_stage(args, pixels: torch.Tensor, log):
    """Text encoders at their seeded init and a VAE trained here; ``None`` after a trial run
    (``--vae-only``, ``--decoder-only``)."""
    tokenizers, encoders = text_encoders(args.seed)
    torch.manual_seed(args.seed + 1)
    vae = build_vae(tuple(args.vae_channels))
    # The VAE also sees scenes in random looks, so it can encode styles it never saw.
    vae_pixels = torch.cat([pixels, image_tensor(toy.random_look_scenes(len(pixels), args.seed))])
    if args.decoder_only:
        # A decoder run on its own, from a VAE saved after the first stage (the same as running
        # the stages in one go: the decoder stage has its own random streams).
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.decoder_only)
        finetune_decoder(vae, vae_pixels, args.decoder_steps, args.vae_batch, args.decoder_lr, log)
        vae.save_pretrained(args.work / "vae-decoder")
        return None
    train_vae(vae, vae_pixels, args.vae_steps, args.vae_batch, args.vae_lr, log)
    finetune_decoder(vae, vae_pixels, args.decoder_steps, args.vae_batch, args.decoder_lr, log)
    pin_posterior_std(vae)
    raw = encode_latents(vae, pixels)
    # As Stable Diffusion: scale latents to unit variance so the noise schedule fits them.
    vae.register_to_config(scaling_factor=round(1.0 / raw.std().item(), 4))
    latents = raw * vae.config.scaling_factor
    styled = image_tensor([toy.draw(scene, styled=True) for scene in toy.all_scenes()[:64]])
    with torch.no_grad():
        recon = vae.decode(raw[:64]).sample
        recon_styled = vae.decode(encode_latents(vae, styled)).sample
    log(
        f"vae recon l1 plain {F.l1_loss(recon, pixels[:64]).item():.4f}, styled (unseen) "
        f"{F.l1_loss(recon_styled, styled).item():.4f}; "
        f"scaling_factor {vae.config.scaling_factor}; latents {tuple(latents.shape)}"
    )

    if args.vae_only:
        vae.save_pretrained(args.work / "vae")
        return None
    return tokenizers, encoders, vae, latents, None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # the reference run: one thread of a shared 2-core CPU
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "train.log").open("a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    scenes = toy.plain_scenes(args.per_scene, seed=args.seed)
    pixels = image_tensor([image for _, image in scenes])
    captions = sorted({scene.caption for scene, _ in scenes}) + [""]
    caption_idx = torch.tensor([captions.index(scene.caption) for scene, _ in scenes])
    log(f"{len(scenes)} plain images, {len(captions) - 1} captions; args {vars(args)}")

    if args.from_base:
        # UNet stage only: the base's text encoders and VAE stay exactly as they are.
        tokenizers, encoders, vae, unet = load_base(args.from_base)
        latents = encode_latents(vae, pixels) * vae.config.scaling_factor
        log(f"from base {args.from_base}: scaling_factor {vae.config.scaling_factor}")
    else:
        stage = vae_stage(args, pixels, log)
        if stage is None:
            return
        tokenizers, encoders, vae, latents, unet = stage
    if args.random_look_share > 0:
        count = round(args.random_look_share * len(pixels))
        extra_scenes, extra_images = random_look_training_set(count, args.seed)
        extra = encode_latents(vae, image_tensor(extra_images)) * vae.config.scaling_factor
        latents = torch.cat([latents, extra])
        extra_idx = torch.tensor([captions.index(scene.caption) for scene in extra_scenes])
        caption_idx = torch.cat([caption_idx, extra_idx])
        log(f"{count} more scenes in random looks for the UNet; latents {tuple(latents.shape)}")
    embeds, pooled = encode_captions(tokenizers, encoders, captions)
    if unet is None:
        torch.manual_seed(args.seed + 2)
        unet = build_unet(embeds.shape[-1], pooled.shape[-1], latents.shape[-1])
    log(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
        f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M"
    )
    prompts = list(toy.HELD_OUT_PROMPTS) + [
        "a small purple square on the right",
        "a big green triangle on the left",
    ]

    def on_checkpoint(ema, step: int) -> None:
        pipe = make_pipeline(vae, tokenizers, encoders, ema)
        save_pipeline(pipe, args.work / "checkpoint")
        rate = check_samples(pipe, prompts, args.work / f"samples-{step:05d}.png", log)
        log(f"checkpoint at unet step {step}: content pass rate {rate:.2f}")

    ema = train_unet(unet, latents, caption_idx, embeds, pooled, args, on_checkpoint, log)
    pipe = make_pipeline(vae, tokenizers, encoders, ema)
    save_pipeline(pipe, args.out, half_unet=True)
    rate = check_samples(pipe, prompts, args.work / "samples-final.png", log)
    log(f"saved {args.out}; final content pass rate {rate:.2f}")
    shutil.copy(args.work / "train.log", args.work / "train-final.log")
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}))


if __name__ == "__main__":
    main()
