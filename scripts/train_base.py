"""Train the toy base model ``nlora:toy-base`` (naruto_lora/demo/assets/toy-base).

An SDXL-architecture pipeline at toy scale, trained from scratch on a CPU, in stages that can run
as separate processes (``--stage``), each seeded:

1. ``vae``: an AutoencoderKL with downscale factor 4 (64 px -> 8 x 16 x 16 latents) trained to
   reconstruct *any* flat drawing: random backgrounds (flat, gradients, stripes), 1-3 shapes of
   any colour, size and outline (``naruto_lora.demo.toy.random_drawing``), plus the plain scenes and
   scenes in random looks. The style set is one more corner of that distribution; the VAE never
   sees it. Writes ``WORK/vae``.
2. ``unet``: two CLIP text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``) at a
   seeded random init, frozen (their hidden states still tell the words apart; the UNet learns
   to read them), and a text-time-conditioned UNet trained with the DDPM epsilon objective
   (SDXL's noise schedule: scaled_linear 0.00085..0.012, 1000 steps; Min-SNR-5 weights for a
   faster start) on the VAE's latents of scenes in *many looks*: the plain one and random
   backgrounds, outline colours and widths that the captions never mention (the caption names
   shape, colour, size and position only). 10 % caption dropout (half to zeroed embeddings, what
   the SDXL pipeline feeds for an empty negative prompt, half to the empty string's) makes
   classifier-free guidance work. The saved UNet is an EMA of its weights. Writes ``--out``.

So the base knows flat drawings in general, as SDXL knows pictures in general, and a style LoRA
only has to steer it to one look (the style set's orange background and black ink), as a
Naruto LoRA narrows SDXL to one anime style. The backgrounds the base is shown stay away from
the style's two colours, so that its own images score low on the style score.

Reproduce the committed weights with (about 30 + 60 minutes on two threads)::

    python scripts/train_base.py --stage vae --threads 2
    python scripts/train_base.py --stage unet --threads 2 --out naruto_lora/demo/assets/toy-base
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from naruto_lora.demo import toy
from naruto_lora.demo.tiny import clip_tokenizers, sdxl_euler_scheduler

TIME_EMBED_DIM = 8
LATENT_CHANNELS = 8


def text_encoders(seed: int):
    """Two small CLIP text encoders at a seeded random init, and their tokenizers."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from naruto_lora.demo.tiny import clip_text_config

    tokenizer, tokenizer_2, vocab_size = clip_tokenizers()
    torch.manual_seed(seed)
    cfg = clip_text_config(tokenizer, vocab_size, 64, 64)
    text_encoder = CLIPTextModel(cfg).eval().requires_grad_(False)
    text_encoder_2 = CLIPTextModelWithProjection(cfg).eval().requires_grad_(False)
    return (tokenizer, tokenizer_2), (text_encoder, text_encoder_2)


def build_vae(channels: tuple[int, ...], latent_channels: int = LATENT_CHANNELS):
    from diffusers import AutoencoderKL

    # Three blocks: downscale factor 2 ** (3 - 1) = 4. No mid-block attention: flat shapes need none.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
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
    # posterior's std starts small): with unit noise on the latents a short run only learns
    # blurry masks and loses the colours.
    with torch.no_grad():
        half = vae.config.latent_channels
        vae.encoder.conv_out.weight[half:] *= 0.01
        vae.encoder.conv_out.bias[half:] = -8.0
    return vae


def build_unet(cross_attention_dim: int, pooled_dim: int, latent_size: int, channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=channels,
        out_channels=channels,
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


def uint8_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8 (a large pool in a quarter of the memory)."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor) -> float:
    """PSNR in dB of encode -> decode on [-1, 1] pixels, measured on the [0, 1] scale."""
    recon = torch.cat(
        [
            vae.decode(vae.encode(pixels[i : i + 64]).latent_dist.mean).sample
            for i in range(0, len(pixels), 64)
        ]
    )
    mse = ((recon.clamp(-1, 1) - pixels) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def vae_eval_sets() -> dict[str, torch.Tensor]:
    """The VAE's gate sets: every styled scene, every plain scene, held-out random drawings."""
    scenes = toy.all_scenes()
    return {
        "style": image_tensor([toy.draw(s, styled=True) for s in scenes]),
        "plain": image_tensor([toy.draw(s) for s in scenes]),
        "random": image_tensor(toy.random_drawings(64, seed=toy.HELD_OUT_DRAWINGS_SEED)),
    }


def evaluate_and_save(vae, evals: dict, folder: Path, label: str, log) -> None:
    """Log the PSNR on each gate set and save the VAE (atomically), in eval mode."""
    from naruto_lora.util.io import atomic_dir

    vae.eval()
    psnr = {name: reconstruction_psnr(vae, px) for name, px in evals.items()}
    log(f"{label} psnr " + ", ".join(f"{k} {v:.2f} dB" for k, v in psnr.items()))
    with atomic_dir(folder) as tmp:
        vae.save_pretrained(tmp)


def cosine_lr(base: float, step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    warm = min(1.0, step / max(1, warmup))
    return base * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))


def train_vae(args, log) -> None:
    """Reconstruction training on a large pool of random drawings; saves ``WORK/vae`` at every
    evaluation, so a run stopped early still leaves the last evaluated weights."""

    torch.manual_seed(args.seed + 1)
    vae = build_vae(tuple(args.vae_channels)).train()
    if args.vae_init is not None:  # a later VAE stage: go on from saved weights
        vae = load_vae(args.vae_init).train().requires_grad_(True)
    rng_seed = args.seed + 11
    pool = uint8_tensor(toy.random_drawings(args.vae_pool, seed=rng_seed))
    plain = uint8_tensor([image for _, image in toy.plain_scenes(4, seed=args.seed)])
    looks = uint8_tensor(toy.random_look_scenes(len(plain), args.seed))
    pool = torch.cat([pool, plain, looks])
    evals = vae_eval_sets()
    log(f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params; pool {len(pool)}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1 + (args.vae_init is not None))
    start = time.time()
    last = args.vae_stop_after or args.vae_steps  # the lr schedule still spans --vae-steps
    for step in range(1, last + 1):
        x = pool[torch.randint(0, len(pool), (args.vae_batch,), generator=gen)].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # L1 keeps flat colours and edges sharp, MSE (what PSNR measures) punishes a wrong
        # colour; a tiny KL keeps the latent space near the origin, as SD's VAE does.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        # Set after the step (so the first step runs at the base rate): the committed VAE was
        # trained so; the decoder and UNet stages warm up from their first step.
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.vae_lr, step, args.vae_steps, 100)
        if step % 50 == 0:
            log(
                f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} {time.time() - start:.0f}s"
            )
        if step % args.eval_every == 0 or step == last:
            evaluate_and_save(vae, evals, args.work / "vae", f"vae step {step}", log)
            vae.train()
        if time.time() - start > args.max_vae_minutes * 60:
            log(f"vae stopped by --max-vae-minutes after step {step}")
            break
    evaluate_and_save(vae, evals, args.work / "vae", "vae end", log)


@torch.no_grad()
def grow_layers(vae, layers_per_block: int):
    """The same VAE with ``layers_per_block`` ResNet blocks per level: the old weights where they
    exist, and each new block (appended at the end of its level, where channels no longer change)
    starts as the identity (its last convolution zero, so ``x + 0``). Encoder and decoder compute
    exactly what they computed before; the new decoder blocks then have room to learn."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    if layers_per_block <= config["layers_per_block"]:
        return vae
    config["layers_per_block"] = layers_per_block
    grown = AutoencoderKL(**config)
    missing, unexpected = grown.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected, unexpected
    for name in missing:
        assert ".resnets." in name, f"grow_layers: unexpected new weight {name}"
        if ".conv2." in name:
            grown.get_parameter(name).zero_()
    return grown.eval().requires_grad_(False)


def train_decoder(args, log) -> None:
    """Decoder-only training from ``WORK/vae`` with the encoder frozen: sharper edges and truer
    colours while the latents (what the UNet learns) stay exactly as they are, so this stage can
    run beside the UNet stage. The latents get a little noise so the decoder forgives the UNet's
    imperfect samples. Writes ``WORK/vae-decoder``."""

    vae = load_vae(args.vae or args.work / "vae")
    if args.decoder_layers:
        before = vae
        vae = grow_layers(vae, args.decoder_layers)
        probe = image_tensor(toy.random_drawings(8, seed=args.seed + 17))
        same = torch.allclose(
            vae.encode(probe).latent_dist.mean, before.encode(probe).latent_dist.mean, atol=1e-5
        ) and torch.allclose(vae(probe).sample, before(probe).sample, atol=1e-4)
        assert same, "grow_layers changed what the VAE computes"
        log(f"grew the VAE to {args.decoder_layers} ResNet blocks per level (identity init)")
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    pool = uint8_tensor(toy.random_drawings(args.vae_pool, seed=args.seed + 13))
    plain = uint8_tensor([image for _, image in toy.plain_scenes(4, seed=args.seed + 1)])
    looks = uint8_tensor(toy.random_look_scenes(len(plain), args.seed + 1))
    pool = torch.cat([pool, plain, looks])
    evals = vae_eval_sets()
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 3)
    start = time.time()
    for step in range(1, args.decoder_steps + 1):
        x = pool[torch.randint(0, len(pool), (args.vae_batch,), generator=gen)].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        z = z + args.decoder_noise * z.std() * torch.randn(z.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        # Warm up from the first step: Adam's first update moves every weight by about the
        # learning rate, which at full rate undoes much of a trained decoder.
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.decoder_lr, step, args.decoder_steps, 50)
        opt.step()
        if step % 50 == 0:
            log(f"decoder step {step} loss {loss.item():.4f} {time.time() - start:.0f}s")
        if step % args.eval_every == 0 or step == args.decoder_steps:
            evaluate_and_save(vae, evals, args.work / "vae-decoder", f"decoder step {step}", log)
            vae.decoder.train()
        if time.time() - start > args.max_vae_minutes * 60:
            log(f"decoder stopped by --max-vae-minutes after step {step}")
            break
    evaluate_and_save(vae, evals, args.work / "vae-decoder", "decoder end", log)


@torch.no_grad()
def pin_posterior_std(vae, logvar: float = -12.0) -> None:
    """Make the posterior's log-variance a constant -12 (std 0.0025), leaving its mean as it is.

    A short VAE training lets the std drift to a sizeable share of the latents' spread; then
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
    """SDXL conditioning, as training computes it (``models.loading.encode_prompts``)."""
    from naruto_lora.models.loading import TextEncoders, encode_prompts

    return encode_prompts(TextEncoders(tuple(tokenizers), tuple(encoders)), captions, "cpu")


def make_pipeline(vae, tokenizers, encoders, unet):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=sdxl_euler_scheduler(),
        add_watermarker=False,
    )


def save_pipeline(pipe, folder: Path, half_unet: bool = False) -> None:
    """Save in the diffusers layout; ``half_unet`` stores the UNet in fp16 (the committed model:
    half the size; loaders upcast it with ``torch_dtype=torch.float32``)."""
    from naruto_lora.util.io import atomic_dir

    with atomic_dir(folder) as tmp:
        if half_unet:
            pipe.unet.to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        pipe.unet.to(torch.float32)


@torch.no_grad()
def check_samples(pipe, prompts: list[str], path: Path, log, seed: int = 0) -> float:
    """Sample ``prompts`` (25 Euler steps, guidance 5), save a strip, return the content pass rate."""
    from PIL import Image

    from naruto_lora.demo.style import content_check, style_score

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
    styles = [style_score(image) for image in images]
    log(
        "samples: "
        + "; ".join(
            f"{p!r}: style {s:.2f} {r.summary()}"
            for p, s, r in zip(prompts, styles, results, strict=False)
        )
    )
    return sum(r.passed for r in results) / len(results)


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def many_looks_training_set(count: int, seed: int) -> tuple[list, list]:
    """``count`` scenes in random looks the captions do not mention, and their scenes.

    The background is any colour far (90) from the shape's fill and far (100) from the style's
    orange and black, so that the base's own images stay off the style score; the outline is
    any colour and width (or none); the fill stays the caption's colour.
    """
    rng = random.Random(seed + 7)
    scenes = toy.all_scenes()
    style_colours = (toy.STYLE_BACKGROUND, toy.STYLE_INK)
    chosen, images = [], []
    while len(images) < count:
        scene = rng.choice(scenes)
        fill = toy.COLOURS[scene.colour]
        background = toy._any_colour(rng)
        if math.dist(background, fill) < 90:  # the shape must stay visible
            continue
        if min(math.dist(background, c) for c in style_colours) < 100:
            continue
        look = {
            "background": background,
            "fill": fill,
            "outline": toy._any_colour(rng),
            "width": rng.choice([0.0, rng.uniform(0.015, 0.085)]),
        }
        chosen.append(scene)
        images.append(toy.draw(scene, jitter=rng, palette=look))
    return chosen, images


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
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    # A continued run (--unet-init) draws other batches than the run it continues.
    gen = torch.Generator().manual_seed(2 + 1000 * (args.unet_init is not None))
    res = toy.RESOLUTION
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
    zeros_embeds, zeros_pooled = torch.zeros_like(embeds[0]), torch.zeros_like(pooled[0])
    empty = len(embeds) - 1  # the last cached caption is the empty string
    start, step = time.time(), 0
    while step < args.unet_steps and time.time() - start < args.max_unet_minutes * 60:
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
        # Min-SNR-5 (Hang et al. 2023): min(SNR, 5) / SNR per sample for epsilon prediction.
        weight = snr[t].clamp(max=5.0) / snr[t]
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for group in opt.param_groups:  # warm-up from the very first step
            group["lr"] = cosine_lr(args.unet_lr, step, args.unet_steps, args.unet_warmup, 0.1)
        opt.step()
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


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder)).eval().requires_grad_(False)


def unet_stage(args, log) -> None:
    tokenizers, encoders = text_encoders(args.seed)
    vae = load_vae(args.vae or args.work / "vae")
    pin_posterior_std(vae)
    plain = toy.plain_scenes(args.per_scene, seed=args.seed)
    looks, look_images = many_looks_training_set(round(args.look_share * len(plain)), args.seed)
    scenes = [scene for scene, _ in plain] + looks
    pixels = image_tensor([image for _, image in plain] + look_images)
    raw = encode_latents(vae, pixels)
    # As Stable Diffusion: scale latents to unit variance so the noise schedule fits them.
    vae.register_to_config(scaling_factor=round(1.0 / raw.std().item(), 4))
    latents = raw * vae.config.scaling_factor
    captions = sorted({scene.caption for scene in scenes}) + [""]
    caption_idx = torch.tensor([captions.index(scene.caption) for scene in scenes])
    embeds, pooled = encode_captions(tokenizers, encoders, captions)
    torch.manual_seed(args.seed + 2)
    if args.unet_init is not None:  # go on training a saved UNet (e.g. the committed base's)
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(args.unet_init)).to(torch.float32)
        log(f"unet from {args.unet_init}")
    else:
        unet = build_unet(embeds.shape[-1], pooled.shape[-1], latents.shape[-1], latents.shape[1])
    log(
        f"{len(plain)} plain + {len(looks)} many-look scenes, latents {tuple(latents.shape)}, "
        f"scaling_factor {vae.config.scaling_factor}; "
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params"
    )
    prompts = [
        *toy.HELD_OUT_PROMPTS,
        "a small purple square on the right",
        "a big green triangle on the left",
        "a big yellow circle in the center",
        "a small red triangle on the right",
    ]

    def on_checkpoint(ema, step: int) -> None:
        pipe = make_pipeline(vae, tokenizers, encoders, ema)
        save_pipeline(pipe, args.work / "checkpoint")
        rate = check_samples(pipe, prompts, args.work / f"samples-{step:05d}.png", log)
        log(f"checkpoint at unet step {step}: content pass rate {rate:.2f}")

    ema = train_unet(unet.train(), latents, caption_idx, embeds, pooled, args, on_checkpoint, log)
    decoder = args.final_vae or args.work / "vae-decoder"
    if decoder.is_dir():
        # The decoder stage's VAE: the same frozen encoder (so the same latents), a better decoder.
        final = load_vae(decoder)
        pin_posterior_std(final)
        final.register_to_config(scaling_factor=vae.config.scaling_factor)
        check = encode_latents(final, pixels[:64]) * final.config.scaling_factor
        assert torch.allclose(check, latents[:64], atol=1e-4), (
            "the decoder stage changed the encoder"
        )
        log(f"final VAE decoder from {decoder}")
        vae = final
    pipe = make_pipeline(vae, tokenizers, encoders, ema)
    save_pipeline(pipe, args.out, half_unet=True)
    rate = check_samples(pipe, prompts, args.work / "samples-final.png", log)
    log(f"saved {args.out}; final content pass rate {rate:.2f}")
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("vae", "decoder", "unet", "all"), default="all")
    parser.add_argument("--out", type=Path, default=Path("naruto_lora/demo/assets/toy-base"))
    parser.add_argument("--work", type=Path, default=Path("nlora-output/toy-base-work"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=250, help="VAE PSNR checks")
    parser.add_argument("--vae-steps", type=int, default=2400)
    parser.add_argument("--vae-channels", type=int, nargs=3, default=[32, 64, 64])
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-pool", type=int, default=24000, help="random drawings to learn")
    parser.add_argument("--max-vae-minutes", type=float, default=float("inf"))
    parser.add_argument(
        "--vae-stop-after", type=int, default=0, help="end the VAE stage after this step"
    )
    parser.add_argument("--vae-init", type=Path, default=None, help="start from this VAE folder")
    parser.add_argument("--decoder-steps", type=int, default=3000)
    parser.add_argument("--decoder-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-noise", type=float, default=0.05)
    parser.add_argument(
        "--decoder-layers",
        type=int,
        default=0,
        help="decoder stage: grow the VAE to this many ResNet blocks per level first",
    )
    parser.add_argument(
        "--final-vae",
        type=Path,
        default=None,
        help="unet stage: the VAE to save (default WORK/vae-decoder if it exists, else --vae)",
    )
    parser.add_argument("--vae", type=Path, default=None, help="unet stage: the VAE folder")
    parser.add_argument("--per-scene", type=int, default=12, help="plain drawings per scene")
    parser.add_argument(
        "--look-share",
        type=float,
        default=3.0,
        help="scenes in random looks for the UNet, as a multiple of the plain ones",
    )
    parser.add_argument("--unet-init", type=Path, default=None, help="start from this UNet folder")
    parser.add_argument("--unet-steps", type=int, default=2400)
    parser.add_argument("--unet-lr", type=float, default=8e-4)
    parser.add_argument("--unet-warmup", type=int, default=200, help="UNet lr warm-up steps")
    parser.add_argument(
        "--max-unet-minutes",
        type=float,
        default=float("inf"),
        help="stop the UNet stage early (the weights then differ)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--checkpoint-every", type=int, default=300)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / f"train-{args.stage}.log").open("a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"args {vars(args)}")
    if args.stage in ("vae", "all"):
        train_vae(args, log)
    if args.stage in ("decoder", "all"):
        train_decoder(args, log)
    if args.stage in ("unet", "all"):
        unet_stage(args, log)


if __name__ == "__main__":
    main()
