"""Running diffusers pipelines on fake tensors, and the planner's prediction for ``nlora sample``.

Pipelines were not written for tensors without values: their schedulers build tables with numpy
and branch on sigmas, they end by converting the image to PIL, and the SDXL pipeline upcasts its
VAE with ``Module.to`` (which swaps tensors, which fake tensors do not allow). The context
managers here work around exactly those three things and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from naruto_lora.config.profile import Profile
from naruto_lora.plan.core import TEXT_ENCODERS, VAE, WEIGHTS, PhasePeak, SimTarget, tracking
from naruto_lora.plan.memtrack import HOST_PREFIX, AllocationTracker
from naruto_lora.plan.models import (
    ModelConfigs,
    StandInTokenizer,
    materialise,
    meta_text_encoders,
    meta_unet,
    meta_vae,
    on_meta,
    quiet_libraries,
)


@contextlib.contextmanager
def schedulers_on_real_tensors(configs: ModelConfigs) -> Iterator[None]:
    """Noise schedulers build their tables with numpy and branch on sigma values, which fake
    tensors have none of: while this is active their methods run outside the fake and tracking
    modes (their tables and latent-sized temporaries are kilobytes; the model output they are
    given stays fake)."""
    import functools

    import diffusers
    from torch.utils._python_dispatch import _disable_current_modes

    names = {"EulerDiscreteScheduler", "DDPMScheduler", configs.scheduler.get("_class_name", "")}
    classes = [getattr(diffusers, n) for n in sorted(names) if hasattr(diffusers, n)]
    originals = [
        (cls, name, cls.__dict__[name])
        for cls in classes
        for name in ("__init__", "set_timesteps", "scale_model_input", "step")
        if name in cls.__dict__
    ]

    def outside(method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _disable_current_modes():
                return method(*args, **kwargs)

        return call

    for cls, name, method in originals:
        setattr(cls, name, outside(method))
    try:
        yield
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)


@contextlib.contextmanager
def postprocess_returns_tensor() -> Iterator[None]:
    """Pipelines end by turning the decoded image into PIL, which needs values; fake tensors
    have none, so for the duration the decoded tensor is returned as it is."""
    from diffusers.image_processor import VaeImageProcessor

    original = VaeImageProcessor.postprocess
    VaeImageProcessor.postprocess = lambda self, image, output_type="pil", **kw: [image]
    try:
        yield
    finally:
        VaeImageProcessor.postprocess = original


def casts_in_place(module: torch.nn.Module, tracker: AllocationTracker, label: str) -> None:
    """Let ``module.to(dtype=...)`` (the pipeline's VAE upcast for decoding, and back) replace
    each parameter's data: ``Module.to`` swaps tensors, which fake tensors do not allow. Memory
    goes the same way: one parameter at a time."""

    def to(*args: Any, dtype: torch.dtype | None = None, **kwargs: Any) -> torch.nn.Module:
        if args or kwargs or dtype is None:
            raise TypeError("the planner's stand-in for Module.to only casts: to(dtype=...)")
        with tracker.labelled(label):
            for param in module.parameters():
                param.data = param.data.to(dtype)
        return module

    module.to = to  # type: ignore[method-assign]


def largest_module_bytes(*modules: torch.nn.Module) -> int:
    """The most parameter bytes any single leaf module holds (what sequential offload keeps on
    the GPU at a time)."""
    largest = 0
    for module in modules:
        for leaf in module.modules():
            if next(leaf.children(), None) is None:
                size = sum(p.numel() * p.element_size() for p in leaf.parameters(recurse=False))
                largest = max(largest, size)
    return largest


@contextlib.contextmanager
def phases_of(tracker: AllocationTracker, modules: dict[str, Any]) -> Iterator[None]:
    """Name the tracker's phase after the model that is running (text encoding, denoising, VAE
    decode), so the report says where a sampling peak happens."""

    def hook(name: str) -> Any:
        return lambda module, args: setattr(tracker, "phase", name)

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def sampling_pipeline(
    profile: Profile,
    configs: ModelConfigs,
    tracker: AllocationTracker,
    dtype: torch.dtype,
    streamed: str | None,
) -> Any:
    """The SDXL pipeline of ``load_pipeline``: fp16 models from the configs (their weights
    labelled, or host-resident when streamed), the profile's sampling-time UNet preparation."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from naruto_lora.plugins.manager import build_plugin_manager

    unet, vae = meta_unet(configs, dtype), meta_vae(configs, dtype)
    encoders = meta_text_encoders(configs, dtype)
    if streamed is None:  # as nlora sample: an 8-bit base, but not with --low-vram
        from naruto_lora.train.setup import quantize_base, quantize_text_encoders

        with on_meta():
            quantize_base(unet, profile)
            quantize_text_encoders(SimpleNamespace(encoders=encoders), profile)
    for module, label in ((unet, WEIGHTS), (vae, VAE), *((e, TEXT_ENCODERS) for e in encoders)):
        with tracker.labelled(streamed or label):
            materialise(module)
    pm = build_plugin_manager(profile)
    pm.hook.nlora_prepare_unet(unet=unet, profile=profile, training=False)
    casts_in_place(vae, tracker, streamed or VAE)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=StandInTokenizer(),
        tokenizer_2=StandInTokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(configs.scheduler),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def simulate_sampling(
    profile: Profile,
    configs: ModelConfigs,
    *,
    low_vram: bool,
    resolution: int | None = None,
    target: SimTarget = SimTarget(),
) -> PhasePeak:
    """One denoising step and the decode of ``nlora sample`` (fp16 on a GPU, LoRA fused into the
    weights, classifier-free guidance), as ``sample.place`` sets the pipeline up: all weights on
    the GPU, or with ``--low-vram`` sequential CPU offload (one layer's weights on the GPU at a
    time), attention slicing and VAE slicing/tiling."""
    dtype = torch.float16 if target.emulate_cuda else torch.float32
    size = resolution or configs.default_resolution
    streamed = HOST_PREFIX + "streamed weights" if low_vram else None
    with (
        tracking(target) as tracker,
        postprocess_returns_tensor(),
        schedulers_on_real_tensors(configs),
    ):
        pipe = sampling_pipeline(profile, configs, tracker, dtype, streamed)
        if low_vram:
            pipe.enable_attention_slicing(1)
            pipe.vae.enable_slicing()
            pipe.vae.enable_tiling()
            modules = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
            with tracker.labelled("weights (one layer at a time)"):
                layer = largest_module_bytes(*modules)
                resident = torch.empty(layer, dtype=torch.uint8)  # noqa: F841 - held while sampling
        models = {
            "text encoding": pipe.text_encoder,
            "text encoding 2": pipe.text_encoder_2,
            "denoising": pipe.unet,
            "VAE decode": pipe.vae.decoder,
        }
        with phases_of(tracker, models), quiet_libraries():
            pipe(
                prompt="a prompt",
                num_inference_steps=1,
                height=size,
                width=size,
                guidance_scale=profile.validation.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(0),
            )
        name = "nlora sample --low-vram" if low_vram else "nlora sample"
        return PhasePeak.of(name, tracker)
