"""The planner's training simulation: the real training step, run on fake tensors, with every
storage counted.

``simulate_training`` builds the profile's models from their configs (no weights: meta device,
then fake tensors), sets them up with the trainer's own functions (``train.setup.make_trainable``:
LoRA and ``nlora_prepare_unet`` hooks; ``make_optimizer``; the ``nlora_train_start`` hooks one
plugin at a time so their state is told apart), puts the optimizer in its steady state and runs
one micro-step of the loop's own ``compute_loss`` with backward and the loop's update
(``clip_gradients``, ``step_optimizer``, then ``nlora_after_optimizer_step``), then one
validation denoising step and VAE decode as ``nlora train`` draws its samples (``train.validation.generate_images``).
``AllocationTracker`` keeps the peak and its split.

The same code runs on real tensors (``SimTarget(fake=False)``) with the model loaded from its
folder: the tests compare the two on the tiny model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.plan.build import (
    build_optimizer,
    build_text_encoders,
    build_unet,
    build_vae,
    start_plugins,
)
from naruto_lora.plan.core import (
    GRADS,
    OPTIMIZER,
    SIM_DEVICE,
    FlopCounter,
    PhasePeak,
    SimTarget,
    autocast_for,
    tracking,
    weight_dtype_for,
)
from naruto_lora.plan.memtrack import HOST_PREFIX, AllocationTracker
from naruto_lora.plan.models import ModelConfigs, StandInTokenizer, noise_scheduler
from naruto_lora.plan.pipeline import (
    phases_of,
    postprocess_returns_tensor,
    schedulers_on_real_tensors,
)


@dataclass
class TrainingSim:
    training: PhasePeak
    validation: PhasePeak | None
    flops_per_micro_step: float
    lora_parameters: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)


class PreparedUNet:
    """What ``accelerator.prepare`` makes of the UNet for mixed precision: the forward under
    autocast and its outputs converted to fp32."""

    def __init__(self, unet: torch.nn.Module, target: SimTarget, dtype: torch.dtype | None):
        self.unet, self.target, self.dtype = unet, target, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from accelerate.utils.operations import convert_to_fp32

        with autocast_for(self.target, self.dtype):
            out = self.unet(*args, **kwargs)
        return out if self.dtype is None else convert_to_fp32(out)


def make_batch(profile: Profile, configs: ModelConfigs, conditioner: Any) -> dict[str, Any]:
    """One micro-batch as the data loader delivers it: cached latents or pixels, cached text
    embeddings or captions, SDXL time ids."""
    cfg, size = profile.data, profile.data.resolution
    batch_size = profile.train.batch_size
    batch: dict[str, Any] = {
        "index": list(range(batch_size)),
        "caption": ["a caption"] * batch_size,
        "time_ids": torch.tensor(
            [[size, size, 0, 0, size, size]] * batch_size, dtype=torch.float32
        ),
    }
    latent_size = size // configs.vae_scale_factor
    if profile.cache.latents:
        channels = configs.unet["in_channels"]
        batch["latents"] = torch.zeros(batch_size, channels, latent_size, latent_size)
    else:
        batch["pixel_values"] = torch.zeros(batch_size, 3, cfg.resolution, cfg.resolution)
    if conditioner.text_encoders is None:
        batch["prompt_embeds"], batch["pooled_embeds"] = text_conditioning(configs, batch_size)
    return batch


def text_conditioning(configs: ModelConfigs, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and pooled embeddings of the shapes the UNet takes (SDXL's micro-
    conditioning adds 6 time ids to the pooled embedding)."""
    unet = configs.unet
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    tokens = StandInTokenizer().model_max_length
    return (
        torch.zeros(batch_size, tokens, unet["cross_attention_dim"]),
        torch.zeros(batch_size, pooled),
    )


def micro_step(run: Any, batch: dict[str, Any], window_started: bool) -> None:
    """The loop's ``compute_loss`` and backward. A micro-step after the first of its window
    finds the earlier micro-steps' gradients held: they are put in place first."""
    from naruto_lora.train.loop import compute_loss

    if window_started:
        with run.tracker.labelled(GRADS):
            for p in run.state.lora_parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
    with run.tracker.in_phase("forward"):
        loss = compute_loss(run, batch)
    with run.tracker.in_phase("backward"):
        loss.backward()


def optimizer_update(run: Any) -> None:
    """The loop's ``clip_gradients`` and ``step_optimizer``, then the after-step hooks (the
    loop's non-finite checks and logging read values, which fake tensors do not have)."""
    from naruto_lora.train.loop import clip_gradients, step_optimizer

    with run.tracker.in_phase("optimizer step"):
        clip_gradients(run)
        with run.tracker.labelled(OPTIMIZER):
            step_optimizer(run)
        run.state.global_step += 1
        run.pm.hook.nlora_after_optimizer_step(state=run.state)


@dataclass
class SimAccelerator:
    """What the loop asks of accelerate's ``Accelerator`` on one process without a grad
    scaler: ``clip_grad_norm_`` is torch's, with the fused (foreach) kernels a CUDA run uses."""

    foreach: bool | None

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.foreach)


def label_gradients(params: list[torch.nn.Parameter], tracker: AllocationTracker) -> list[Any]:
    """Gradients are labelled the moment autograd stores them."""
    return [
        p.register_post_accumulate_grad_hook(lambda p: tracker.relabel([p.grad], GRADS))
        for p in params
    ]


def setup(
    profile: Profile, configs: ModelConfigs, pm: Any, tracker: AllocationTracker, target: SimTarget
) -> SimpleNamespace:
    """What ``train.setup.setup_run`` builds, as far as device memory goes, plus the plugins'
    ``nlora_train_start``: the fields ``compute_loss`` reads, and the planner's own."""
    from naruto_lora.plugins.state import TrainState
    from naruto_lora.train.conditioning import Conditioner

    dtype, autocast_dtype = weight_dtype_for(profile, target)
    unet, params = build_unet(profile, configs, pm, tracker, dtype, target.fake)
    generator = torch.Generator(device=SIM_DEVICE).manual_seed(profile.train.seed)
    conditioner = Conditioner(device=SIM_DEVICE, weight_dtype=dtype, generator=generator)
    if profile.cache.text == "memory":
        conditioner.text_encoders = build_text_encoders(
            profile, configs, tracker, dtype, target.fake
        )
    vae = None
    if not profile.cache.latents or profile.validation.every_steps > 0:
        vae = build_vae(profile, configs, tracker, dtype, target.fake)
        if profile.validation.every_steps > 0 and profile.validation.prompts:
            pm.hook.nlora_prepare_validation_vae(vae=vae, profile=profile)
    if not profile.cache.latents:
        conditioner.vae = vae
        conditioner.scaling_factor = float(configs.vae["scaling_factor"])
        conditioner.shift_factor = float(configs.vae.get("shift_factor") or 0.0)
    optimizer = build_optimizer(pm, params, profile, target)
    state = TrainState(
        profile=profile,
        unet=unet,
        noise_scheduler=noise_scheduler(configs),
        lora_parameters=params,
        device=SIM_DEVICE,
        weight_dtype=dtype,
        output_dir=__import__("pathlib").Path("."),
        optimizer=optimizer,
    )
    start_plugins(pm, state, profile, tracker)
    return SimpleNamespace(
        profile=profile,
        configs=configs,
        pm=pm,
        tracker=tracker,
        target=target,
        accelerator=SimAccelerator(foreach=target.emulate_cuda or None),
        state=state,
        model=PreparedUNet(unet, target, autocast_dtype),
        conditioner=conditioner,
        generator=generator,
        optimizer=optimizer,
        vae=vae,
        autocast_dtype=autocast_dtype,
    )


def validation_sample(run: SimpleNamespace) -> None:
    """One denoising step and the VAE decode of ``train.validation.generate_images`` (each of
    its steps and prompts peaks the same), inside the ``nlora_validation_weights`` wrappers."""
    from naruto_lora.train.validation import Validation, generate_images

    cfg, unet = run.profile.validation, run.state.unet
    with run.tracker.labelled(HOST_PREFIX + "validation prompts"):  # kept on the CPU
        embeds, pooled = text_conditioning(run.configs, 1)
    validation = Validation(
        prompts=tuple(cfg.prompts[:1]),
        prompt_embeds=embeds,
        pooled_embeds=pooled,
        vae=run.vae,
        resolution=run.profile.data.resolution,
        seed=cfg.seed,
        num_inference_steps=1,
        guidance_scale=cfg.guidance_scale,
    )

    def render(state: Any) -> None:
        generate_images(
            validation,
            unet,
            state.noise_scheduler,
            SIM_DEVICE,
            state.weight_dtype,
            lambda: autocast_for(run.target, run.autocast_dtype),
        )

    models = {"validation: denoising": unet, "validation: VAE decode": run.vae.decoder}
    unet.eval()
    try:
        with (
            torch.no_grad(),
            run.tracker.in_phase("validation: weights swapped in"),
            phases_of(run.tracker, models),
        ):
            run.pm.hook.nlora_validation_weights.call_extra([render], {"state": run.state})
    finally:
        unet.train()


def prime_optimizer(run: SimpleNamespace) -> None:
    """Put the optimizer in its steady state before the traced micro-step: its state created
    by one update on zero gradients, as after a run's first update (no UNet pass needed)."""
    with run.tracker.labelled(GRADS):
        for p in run.state.lora_parameters:
            p.grad = torch.zeros_like(p)
    from naruto_lora.train.loop import step_optimizer

    with run.tracker.labelled(OPTIMIZER):
        step_optimizer(run)


def steady_step(
    run: SimpleNamespace, batch: dict[str, Any], accumulating: bool, announce: Any
) -> FlopCounter:
    """One traced micro-step that holds everything a steady-state micro-step holds: the
    optimizer state from earlier updates and, when accumulating, the window's earlier
    gradients; then the update (FLOPs counted in the micro-step). One UNet pass instead of two:
    a run's first micro-step holds less than this one, never more."""
    announce("training step")
    with run.tracker.in_phase("optimizer state"):
        prime_optimizer(run)
    counter = FlopCounter()
    with run.tracker.in_phase("step"), counter:
        micro_step(run, batch, window_started=accumulating)
    optimizer_update(run)
    return counter


def simulate_training(
    profile: Profile,
    configs: ModelConfigs,
    *,
    pm: Any = None,
    target: SimTarget = SimTarget(),
    validation: bool = True,
    on_phase: Any = None,
) -> TrainingSim:
    """One steady-state training micro-step (optimizer state present, the window's earlier
    gradients held when accumulating) with its update, then a validation sample."""
    from naruto_lora.plugins.manager import build_plugin_manager

    started = time.perf_counter()
    pm = pm if pm is not None else build_plugin_manager(profile)
    announce = on_phase or (lambda name: None)
    accumulating = profile.train.gradient_accumulation_steps > 1
    with (
        tracking(target) as tracker,
        postprocess_returns_tensor(),
        schedulers_on_real_tensors(configs),
    ):
        announce("building the models")
        with tracker.in_phase("setup"):
            run = setup(profile, configs, pm, tracker, target)
        hooks = label_gradients(run.state.lora_parameters, tracker)
        batch = make_batch(profile, configs, run.conditioner)
        counter = steady_step(run, batch, accumulating, announce)
        for hook in hooks:
            hook.remove()
        training = PhasePeak.of("training step", tracker)
        sample = None
        if validation and run.vae is not None and profile.validation.every_steps > 0:
            announce("validation sample")
            tracker.reset_peak()
            validation_sample(run)
            sample = PhasePeak.of("validation sample", tracker)
        lora_parameters = sum(p.numel() for p in run.state.lora_parameters)
    return TrainingSim(
        training=training,
        validation=sample,
        flops_per_micro_step=float(counter.flops),
        lora_parameters=lora_parameters,
        elapsed_s=time.perf_counter() - started,
    )
