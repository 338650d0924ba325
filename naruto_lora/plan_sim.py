"""The planner's simulation: the real training step, run on fake tensors, with every storage counted.

``simulate_training`` builds the profile's models from their configs (no weights: meta device,
then fake tensors), sets them up with the training loop's own building blocks (``inject_lora``,
the ``nlora_prepare_unet`` hooks, ``make_optimizer``, the ``nlora_train_start`` hooks one plugin
at a time so their state is told apart) and runs two micro-steps of the loop's own
``compute_loss`` with backward and the optimizer update (clip, step, zero-grad,
``nlora_after_optimizer_step``), then one validation denoising step and VAE decode as
``nlora train`` draws its samples. ``AllocationTracker`` keeps the peak and its split.

The fake tensors are CPU tensors standing in for CUDA ones (fake CUDA tensors cannot run
autograd in a CPU build of torch): autocast gets CUDA's cast policy
(``memtrack.cuda_autocast_policy``) and the optimizer is built as for a CUDA device.

The same code runs on real tensors (``fake=False``) with the model loaded from its folder: the
tests compare the two on the tiny model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from naruto_lora.memtrack import HOST_PREFIX, AllocationTracker, cuda_autocast_policy
from naruto_lora.plan_models import (
    ModelConfigs,
    StandInTokenizer,
    materialise,
    meta_text_encoders,
    meta_unet,
    meta_vae,
    noise_scheduler,
    on_meta,
    quiet_libraries,
)
from naruto_lora.profile import Profile

SIM_DEVICE = torch.device("cpu")  # fake CPU tensors stand in for the GPU's
WEIGHTS, LORA, GRADS, OPTIMIZER = "weights", "lora", "lora_grads", "optimizer"
TEXT_ENCODERS, VAE, ACTIVATIONS = "text_encoders", "vae", "activations"
PLUGIN_PREFIX = "plugin:"


@dataclass
class PhasePeak:
    """The peak bytes of one phase (what ``torch.cuda.max_memory_allocated`` would report for
    it) and how they split by category at that moment."""

    name: str
    peak_bytes: int
    split: dict[str, int]
    where: str = ""
    host: dict[str, int] = field(default_factory=dict)  # kept in host memory (not counted)

    @classmethod
    def of(cls, name: str, tracker: AllocationTracker) -> PhasePeak:
        peak = tracker.peak
        host = {
            k[len(HOST_PREFIX):]: v
            for k, v in tracker.live.items()
            if k.startswith(HOST_PREFIX) and v
        }
        return cls(name, peak.total_bytes, dict(peak.by_label), peak.where, host)


@dataclass
class TrainingSim:
    training: PhasePeak
    validation: PhasePeak | None
    flops_per_micro_step: float
    lora_parameters: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SimTarget:
    """What the simulated step stands for: a CUDA GPU (``cuda``) or this CPU (``cpu``)."""

    device_type: str = "cuda"
    fake: bool = True

    @property
    def emulate_cuda(self) -> bool:
        return self.device_type == "cuda"


def weight_dtype_for(profile: Profile, target: SimTarget) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the frozen weights, autocast dtype or None) as the training setup chooses them."""
    from naruto_lora.train.setup import precision_for

    mode, dtype = precision_for(profile, torch.device(target.device_type))
    return dtype, (None if mode == "no" else dtype)


@contextlib.contextmanager
def tracking(target: SimTarget) -> Iterator[AllocationTracker]:
    """Fake mode (when simulating), the CUDA cast policy (for a CUDA target) and the tracker."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = AllocationTracker()
    with contextlib.ExitStack() as stack:
        if target.emulate_cuda:
            # Active for the whole run, not just the forward: checkpointed blocks recompute their
            # forward inside backward and must cast the same way.
            stack.enter_context(cuda_autocast_policy())
        if target.fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(tracker)
        yield tracker


def autocast_for(target: SimTarget, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(SIM_DEVICE.type, dtype=dtype)


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


# ------------------------------------------------------------------------------ models


def build_unet(profile: Profile, configs: ModelConfigs, pm: Any, tracker: AllocationTracker,
               dtype: torch.dtype, fake: bool) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The frozen UNet with the LoRA, as ``train.setup.load_trainable_unet`` makes it."""
    from naruto_lora.lora import inject_lora

    if fake:
        # The LoRA goes in on the meta device: peft's module moves cannot run on fake tensors.
        unet = meta_unet(configs, dtype)
        with on_meta():
            inject_lora(unet, profile.lora)
        with tracker.labelled(WEIGHTS):
            materialise(unet)
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        from naruto_lora.models import load_unet

        unet = load_unet(profile.model, dtype)
        params = inject_lora(unet, profile.lora)
        tracker.relabel(unet.parameters(), WEIGHTS)
    tracker.relabel(params, LORA)
    pm.hook.nlora_prepare_unet(unet=unet, profile=profile, training=True)
    unet.train()
    return unet, params


def build_text_encoders(profile: Profile, configs: ModelConfigs, tracker: AllocationTracker,
                        dtype: torch.dtype, fake: bool) -> Any:
    from naruto_lora.models import TextEncoders, load_text_encoders

    if not fake:
        text = load_text_encoders(profile.model, dtype)
    else:
        encoders = meta_text_encoders(configs, dtype)
        with tracker.labelled(TEXT_ENCODERS):
            for encoder in encoders:
                materialise(encoder)
        text = TextEncoders(tokenizers=(StandInTokenizer(), StandInTokenizer()), encoders=encoders)
    for encoder in text.encoders:
        tracker.relabel(encoder.parameters(), TEXT_ENCODERS)
        tracker.relabel(encoder.buffers(), TEXT_ENCODERS)
    return text


def build_vae(profile: Profile, configs: ModelConfigs, tracker: AllocationTracker,
              dtype: torch.dtype, fake: bool, label: str = VAE) -> Any:
    """The VAE in ``dtype``, or fp32 when it would overflow in fp16 (``load_vae_for``'s rule)."""
    from naruto_lora.models import load_vae, vae_is_fp16_safe

    if not fake:
        vae = load_vae(profile.model, torch.float32)
    else:
        vae = meta_vae(configs, torch.float32)
    if dtype == torch.float16 and not vae_is_fp16_safe(profile.model, vae):
        dtype = torch.float32
    if fake:
        with on_meta():
            vae = torch.nn.Module.to(vae, dtype=dtype)
        with tracker.labelled(label):
            materialise(vae)
    else:
        vae = vae.to(dtype)
    vae.requires_grad_(False)
    vae.eval()
    tracker.relabel(vae.parameters(), label)
    return vae


# ------------------------------------------------------------------------------ optimizer


class AdamW8bitStandIn(torch.optim.Optimizer):
    """Holds what bitsandbytes' ``AdamW8bit`` holds, for the planner (bitsandbytes needs a GPU):
    per parameter of 4096+ elements two uint8 moments and an fp32 scale per 256-element block
    (smaller parameters keep fp32 moments), plus the two shared 256-entry code books."""

    BLOCK, MIN_8BIT = 256, 4096

    def __init__(self, params: list[torch.nn.Parameter], **defaults: Any) -> None:
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._initial_state(p))
                p.add_(p.grad, alpha=-group["lr"])  # stands in for the fused 8-bit kernel

    def _initial_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p.numel() < self.MIN_8BIT:
            return {"state1": torch.zeros_like(p), "state2": torch.zeros_like(p)}
        blocks = -(-p.numel() // self.BLOCK)
        state = {
            "state1": torch.zeros_like(p, dtype=torch.uint8),
            "state2": torch.zeros_like(p, dtype=torch.uint8),
            "absmax1": torch.zeros(blocks, device=p.device),
            "absmax2": torch.zeros(blocks, device=p.device),
        }
        if "qmap1" not in self.defaults:
            self.defaults["qmap1"] = torch.zeros(256, device=p.device)
            self.defaults["qmap2"] = torch.zeros(256, device=p.device)
        return state


def build_optimizer(params: list[torch.nn.Parameter], profile: Profile,
                    target: SimTarget) -> torch.optim.Optimizer:
    """``train.schedule.make_optimizer`` for the target device; the 8-bit one stood in for."""
    from naruto_lora.train.schedule import make_optimizer

    cfg = profile.train
    if cfg.optimizer == "adamw8bit" and target.fake:
        return AdamW8bitStandIn(params, lr=cfg.learning_rate)
    return make_optimizer(params, cfg, torch.device(target.device_type))


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    yield from (v for v in optimizer.defaults.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------ plugins


def host_resident(profile: Profile, plugin_name: str) -> bool:
    """A plugin configured with ``device = "cpu"`` keeps its state in host memory."""
    settings = profile.plugins.get(plugin_name)
    return getattr(getattr(settings, "config", None), "device", None) == "cpu"


def start_plugins(pm: Any, state: Any, profile: Profile, tracker: AllocationTracker) -> None:
    """``nlora_train_start``, one plugin at a time, so each plugin's state gets its own label."""
    names = [pm.get_name(impl.plugin) for impl in pm.hook.nlora_train_start.get_hookimpls()]
    everyone = [pm.get_plugin(name) for name in names]
    for name in names:
        others = [p for p in everyone if p is not pm.get_plugin(name)]
        caller = pm.subset_hook_caller("nlora_train_start", remove_plugins=others)
        prefix = HOST_PREFIX if host_resident(profile, name) else ""
        with tracker.labelled(f"{prefix}{PLUGIN_PREFIX}{name}"):
            caller(state=state)


# ------------------------------------------------------------------------------ the step


def make_batch(profile: Profile, configs: ModelConfigs, conditioner: Any) -> dict[str, Any]:
    """One micro-batch as the data loader delivers it: cached latents or pixels, cached text
    embeddings or captions, SDXL time ids."""
    cfg, size = profile.data, profile.data.resolution
    batch_size = profile.train.batch_size
    batch: dict[str, Any] = {
        "index": list(range(batch_size)),
        "caption": ["a caption"] * batch_size,
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch_size, dtype=torch.float32),
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
    """Clip, step, zero-grad and the after-step hooks, as ``train.loop.optimizer_update`` does
    (its logging and non-finite checks read values, which fake tensors do not have)."""
    params = run.state.lora_parameters
    with run.tracker.in_phase("optimizer step"):
        max_norm = run.profile.train.max_grad_norm or float("inf")
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=run.target.emulate_cuda or None)
        with run.tracker.labelled(OPTIMIZER):
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.state.global_step += 1
        run.pm.hook.nlora_after_optimizer_step(state=run.state)


def label_gradients(params: list[torch.nn.Parameter], tracker: AllocationTracker) -> list[Any]:
    """Gradients are labelled the moment autograd stores them."""
    return [
        p.register_post_accumulate_grad_hook(lambda p: tracker.relabel([p.grad], GRADS))
        for p in params
    ]


# ------------------------------------------------------------------------------ the run


def setup(profile: Profile, configs: ModelConfigs, pm: Any, tracker: AllocationTracker,
          target: SimTarget) -> SimpleNamespace:
    """What ``train.setup.setup_run`` builds, as far as device memory goes, plus the plugins'
    ``nlora_train_start``: the fields ``compute_loss`` reads, and the planner's own."""
    from naruto_lora.train.conditioning import Conditioner
    from naruto_lora.train.state import TrainState

    dtype, autocast_dtype = weight_dtype_for(profile, target)
    unet, params = build_unet(profile, configs, pm, tracker, dtype, target.fake)
    generator = torch.Generator(device=SIM_DEVICE).manual_seed(profile.train.seed)
    conditioner = Conditioner(device=SIM_DEVICE, weight_dtype=dtype, generator=generator)
    if profile.cache.text == "memory":
        conditioner.text_encoders = build_text_encoders(profile, configs, tracker, dtype, target.fake)
    vae = None
    if not profile.cache.latents or profile.validation.every_steps > 0:
        vae = build_vae(profile, configs, tracker, dtype, target.fake)
    if not profile.cache.latents:
        conditioner.vae = vae
        conditioner.scaling_factor = float(configs.vae["scaling_factor"])
        conditioner.shift_factor = float(configs.vae.get("shift_factor") or 0.0)
    optimizer = build_optimizer(params, profile, target)
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
        profile=profile, configs=configs, pm=pm, tracker=tracker, target=target, state=state,
        model=PreparedUNet(unet, target, autocast_dtype), conditioner=conditioner,
        generator=generator, optimizer=optimizer, vae=vae, autocast_dtype=autocast_dtype,
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
    originals = [(cls, name, cls.__dict__[name]) for cls in classes
                 for name in ("__init__", "set_timesteps", "scale_model_input", "step")
                 if name in cls.__dict__]

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


def validation_sample(run: SimpleNamespace) -> None:
    """One denoising step and the VAE decode of ``train.validation.generate_images`` (each of
    its steps and prompts peaks the same), inside the ``nlora_validation_weights`` wrappers."""
    from naruto_lora.train.validation import Validation, generate_images

    cfg, unet = run.profile.validation, run.state.unet
    with run.tracker.labelled(HOST_PREFIX + "validation prompts"):  # kept on the CPU
        embeds, pooled = text_conditioning(run.configs, 1)
    validation = Validation(
        prompts=tuple(cfg.prompts[:1]), prompt_embeds=embeds, pooled_embeds=pooled, vae=run.vae,
        resolution=run.profile.data.resolution, seed=cfg.seed, num_inference_steps=1,
        guidance_scale=cfg.guidance_scale,
    )

    def render(state: Any) -> None:
        generate_images(validation, unet, state.noise_scheduler, SIM_DEVICE, state.weight_dtype,
                        lambda: autocast_for(run.target, run.autocast_dtype))

    unet.eval()
    try:
        with torch.no_grad(), run.tracker.in_phase("validation sample"):
            run.pm.hook.nlora_validation_weights.call_extra([render], {"state": run.state})
    finally:
        unet.train()


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs with ``torch.utils.flop_counter``'s formulas (matmuls, convolutions,
    attention; 2 per multiply-add), plus the CPU flash-attention kernels the fake CPU tensors
    dispatch to. Unlike ``FlopCounterMode`` it installs no module hooks: those keep
    checkpointed blocks' activations alive and would change the memory being measured."""

    def __init__(self) -> None:
        # The module's sdpa formulas are registered (and so already shape-wrapped) for the
        # CUDA kernels; the CPU kernels take the same leading arguments.
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

        super().__init__()
        aten = torch.ops.aten
        self.registry = {
            **flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
        }
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def simulate_training(
    profile: Profile,
    configs: ModelConfigs,
    *,
    pm: Any = None,
    target: SimTarget = SimTarget(),
    validation: bool = True,
    on_phase: Any = None,
) -> TrainingSim:
    """Two training micro-steps (the first ending its window with an optimizer update, the second
    with the window's earlier gradients held when accumulating), then a validation sample."""
    from naruto_lora.plugins import build_plugin_manager

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
        announce("training step 1")
        with tracker.in_phase("step 1"):
            micro_step(run, batch, window_started=False)
            optimizer_update(run)
        announce("training step 2")
        counter = FlopCounter()
        with tracker.in_phase("step 2"), counter:
            micro_step(run, batch, window_started=accumulating)
        optimizer_update(run)
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


# ------------------------------------------------------------------------------ sampling


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


def simulate_sampling(
    profile: Profile, configs: ModelConfigs, *, low_vram: bool, resolution: int | None = None,
    target: SimTarget = SimTarget(),
) -> PhasePeak:
    """One denoising step and the decode of ``nlora sample`` (fp16 on a GPU, LoRA fused into the
    weights, classifier-free guidance), as ``sample.place`` sets the pipeline up: all weights on
    the GPU, or with ``--low-vram`` sequential CPU offload (one layer's weights on the GPU at a
    time), attention slicing and VAE slicing/tiling."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from naruto_lora.plugins import build_plugin_manager

    dtype = torch.float16 if target.emulate_cuda else torch.float32
    size = resolution or configs.default_resolution
    streamed = HOST_PREFIX + "streamed weights" if low_vram else None
    with (
        tracking(target) as tracker,
        postprocess_returns_tensor(),
        schedulers_on_real_tensors(configs),
    ):
        unet, vae = meta_unet(configs, dtype), meta_vae(configs, dtype)
        encoders = meta_text_encoders(configs, dtype)
        for module, label in ((unet, WEIGHTS), (vae, VAE), *((e, TEXT_ENCODERS) for e in encoders)):
            with tracker.labelled(streamed or label):
                materialise(module)
        build_plugin_manager(profile).hook.nlora_prepare_unet(unet=unet, profile=profile, training=False)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=StandInTokenizer(), tokenizer_2=StandInTokenizer(), unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(configs.scheduler), add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        casts_in_place(vae, tracker, streamed or VAE)
        if low_vram:
            pipe.enable_attention_slicing(1)
            pipe.vae.enable_slicing()
            pipe.vae.enable_tiling()
            with tracker.labelled("weights (one layer at a time)"):
                layer = largest_module_bytes(unet, vae, *encoders)
                resident = torch.empty(layer, dtype=torch.uint8)  # noqa: F841 - held while sampling
        with tracker.in_phase("sample"), quiet_libraries():
            pipe(prompt="a prompt", num_inference_steps=1, height=size, width=size,
                 guidance_scale=profile.validation.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(0))
        name = "nlora sample --low-vram" if low_vram else "nlora sample"
        return PhasePeak.of(name, tracker)


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
