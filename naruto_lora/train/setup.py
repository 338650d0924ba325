"""Everything a run needs before its first step, in the order that fails fast.

Cheap checks first (device, output folder, LoRA targets against the UNet), then the caches (which
may take minutes to build), then models onto the device, optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from naruto_lora.config.profile import Profile, write_resolved
from naruto_lora.lora.inject import inject_lora, targeted_convolutions, trainable_parameters
from naruto_lora.models.loading import (
    latent_scale,
    load_noise_scheduler,
    load_text_encoders,
    load_unet,
    load_vae,
    vae_is_fp16_safe,
)
from naruto_lora.models.quantize import describe_quantized, quantize_frozen, quiet_peft_torchao
from naruto_lora.plugins.state import TrainState
from naruto_lora.train.conditioning import Conditioner
from naruto_lora.train.distributed import (
    check_device_for_processes,
    launched_processes,
    local_main_first,
    process_seed,
    quiet_unless_main,
)
from naruto_lora.train.guard import NonFiniteGuard
from naruto_lora.train.metrics import MetricsLog, PeakMemory
from naruto_lora.train.outputs import PROFILE_NAME, check_output_folder, clear_previous_run
from naruto_lora.train.run import Run, TrainOptions
from naruto_lora.train.schedule import make_lr_scheduler, make_optimizer, plan_total_steps
from naruto_lora.train.validation import Validation, encode_validation_prompts
from naruto_lora.util.console import console
from naruto_lora.util.devices import DTYPES, resolve_device
from naruto_lora.util.errors import UserError


def precision_for(profile: Profile, device: torch.device) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of the frozen weights): the profile's on a GPU, fp32
    on a CPU, where fp16 kernels are missing or slow."""
    if device.type == "cpu":
        return "no", torch.float32
    return profile.train.mixed_precision, DTYPES[profile.train.mixed_precision]


def make_accelerator(profile: Profile, device: torch.device, options: TrainOptions) -> Any:
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "--tensorboard needs the tensorboard package.",
            hint="pip install 'naruto-lora[tensorboard]' (or tensorboard).",
        )
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    check_device_for_processes(device, launched_processes())
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if launched_processes() == 1:
        # accelerate keeps one process-wide state; a second run in the same process (tests,
        # notebooks) with other settings must start from a clean one.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    mixed_precision, _ = precision_for(profile, device)
    output_dir = Path(profile.train.output_dir).expanduser()
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=profile.train.gradient_accumulation_steps,
        log_with="tensorboard" if options.tensorboard else None,
        project_dir=str(output_dir / "logs"),
    )
    quiet_unless_main(accelerator)
    if mixed_precision != profile.train.mixed_precision:
        console.print(f"[dim]On the CPU: fp32 instead of {profile.train.mixed_precision}.[/]")
    return accelerator


def check_inputs(
    profile: Profile, options: TrainOptions, num_processes: int = 1
) -> tuple[Path, bool, Path | None, list[Any]]:
    """The output folder rule and the checkpoint to resume from, checked before anything loads:
    (output folder, whether an earlier run is started over, checkpoint or None, the settings
    changed on resume)."""
    from naruto_lora.train.checkpoint import check_checkpoint, read_info, resolve_resume
    from naruto_lora.train.resume import check_resume_settings

    output_dir = Path(profile.train.output_dir).expanduser()
    starting_over = check_output_folder(output_dir, profile, options.resume, options.overwrite)
    resume_from, changes = None, []
    if options.resume:
        resume_from = resolve_resume(output_dir, options.resume)
        check_checkpoint(resume_from, profile, num_processes=num_processes)
        changes = check_resume_settings(
            resume_from,
            read_info(resume_from),
            profile,
            output_dir,
            allow=options.resume_with_changes,
        )
    return output_dir, starting_over, resume_from, changes


def fetch_builtin_assets(profile: Profile) -> None:
    """Build the built-in ``nlora:`` model and data set now if they are missing (a no-op for hub
    ids and folders), so that several processes do not all build them at once."""
    from naruto_lora.models.loading import resolve_data, resolve_model

    for model_id in (profile.model.pretrained, profile.model.vae):
        if model_id.startswith("nlora:"):
            resolve_model(model_id)
    if profile.data.source.startswith("nlora:"):
        resolve_data(profile.data.source)


def claim_output_folder(output_dir: Path, profile: Profile, starting_over: bool) -> None:
    """Once setup has succeeded: clear an earlier run being started over, remove the temp files
    of writes a kill interrupted (the folder's lock is held: none is in progress), write
    profile.toml."""
    from naruto_lora.train.outputs import CHECKPOINTS
    from naruto_lora.util.io import remove_stale_temps

    if starting_over and (output_dir / PROFILE_NAME).is_file():
        console.print(f"Starting over in [bold]{output_dir}[/] (its earlier run is replaced).")
        clear_previous_run(output_dir)
        MetricsLog(output_dir).reset()
    output_dir.mkdir(parents=True, exist_ok=True)
    for folder in (output_dir, output_dir / CHECKPOINTS):
        remove_stale_temps(folder)
    write_resolved(profile, output_dir / PROFILE_NAME)


def load_trainable_unet(profile: Profile, pm: Any, weight_dtype: torch.dtype) -> Any:
    """The frozen UNet in the weight dtype with the LoRA (fp32) injected, on the CPU still.

    The seed is set first: peft draws the LoRA's initial weights from the global generator.
    """
    return make_trainable(load_unet(profile.model, weight_dtype), profile, pm)


def make_trainable(
    unet: Any,
    profile: Profile,
    pm: Any,
    *,
    building: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    place: Callable[[Any], Any] | None = None,
) -> tuple[Any, list[torch.nn.Parameter]]:
    """The LoRA injected into a loaded UNet, the ``nlora_prepare_unet`` hooks, train mode (also
    for a UNet built elsewhere, e.g. the GPU check's random full-size one).

    The planner passes ``building`` (inject on the meta device) and ``place`` (give the module
    storage afterwards): the same steps, on a UNet without weights."""
    from accelerate.utils import set_seed

    set_seed(profile.train.seed)
    with building():
        summary = quantize_base(unet, profile)
        with quiet_peft_torchao():
            params = inject_lora(unet, profile.lora)
    if summary is not None and place is None:
        console.print(describe_quantized("UNet", summary))
    if place is not None:
        place(unet)
        params = list(trainable_parameters(unet).values())  # placing makes new parameters
    pm.hook.nlora_prepare_unet(unet=unet, profile=profile, training=True)
    unet.train()
    return unet, params


def quantize_base(unet: Any, profile: Profile) -> Any:
    """``model.base_weights`` int8 / fp8: the frozen UNet in 8 bits before the LoRA goes in; the
    convolutions the LoRA targets stay as they are. None for a full-precision base."""
    kind = profile.model.base_weights
    if kind == "full":
        return None
    return quantize_frozen(
        unet, kind, keep=targeted_convolutions(unet, profile.lora.target_modules)
    )


def quantize_text_encoders(text: Any, profile: Profile) -> None:
    """The resident text encoders (text encoded each step) in 8 bits too."""
    kind = profile.model.base_weights
    if kind != "full":
        for encoder in text.encoders:
            quantize_frozen(encoder, kind, convolutions=False)


def load_dataset(profile: Profile, options: TrainOptions, accelerator: Any) -> tuple[Any, int]:
    """Caches first (built when missing or stale, unless --no-auto-cache), then the data set.

    Every process calls this: the cache's build lock lets the first one build while the others
    wait (a file lock, so a long build hits no collective timeout), then they find it complete
    and only read it. Batches per epoch are this process's share of the data."""
    from naruto_lora.cache import (
        build_train_dataset,
        ensure_latent_cache,
        ensure_text_cache,
        make_batch_sampler,
    )

    device = str(accelerator.device)
    latents = None
    if profile.cache.latents:
        latents = ensure_latent_cache(profile, device=device, auto=options.auto_cache)
        _cache_notice("latent", latents, "nlora cache latents", accelerator)
    text = None
    if profile.cache.text == "disk":
        text = ensure_text_cache(profile, device=device, auto=options.auto_cache)
        _cache_notice("text", text, "nlora cache text --to-disk", accelerator)
    dataset = build_train_dataset(profile, latents, text)
    sampler = make_batch_sampler(
        dataset,
        profile.train.batch_size,
        profile.train.seed,
        0,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    return dataset, len(sampler)


def _cache_notice(kind: str, cache: Any, command: str, accelerator: Any) -> None:
    """Say so when training had to (re)build part of a cache first (from whichever process
    built it: stdout of the others is quiet, so those say it on stderr)."""
    from naruto_lora.util.console import err_console

    report = getattr(cache, "report", None)
    if report is not None and report.encoded:
        who = console if accelerator.is_main_process else err_console
        by = "" if accelerator.is_main_process else f"process {accelerator.process_index}: "
        who.print(
            f"{by}The {kind} cache was missing or stale: encoded {report.encoded} entries "
            f"first (reused {report.reused}) in {cache.folder}. `{command}` does this ahead."
        )


def load_vae_for(profile: Profile, device: torch.device, weight_dtype: torch.dtype) -> Any:
    """The VAE in the weight dtype, or in fp32 when it would overflow in fp16 (SDXL's own VAE).
    Loaded in its final dtype (not cast after), as diffusers recommends."""
    vae = load_vae(profile.model, weight_dtype)
    if weight_dtype == torch.float16 and not vae_is_fp16_safe(profile.model, vae):
        console.print("[dim]The VAE is not fp16-safe: using it in fp32.[/]")
        vae = load_vae(profile.model, torch.float32)
    vae.requires_grad_(False)
    vae.eval()
    return vae.to(device)


def make_conditioner(
    profile: Profile, device: torch.device, weight_dtype: torch.dtype, generator: torch.Generator
) -> Conditioner:
    """Text encoders on the device only for ``cache.text = "memory"``; the VAE only when
    latents are not cached (validation loads its own share in ``make_validation``)."""
    conditioner = Conditioner(device=device, weight_dtype=weight_dtype, generator=generator)
    if profile.cache.text == "memory":
        conditioner.text_encoders = load_text_encoders(profile.model, weight_dtype)
        quantize_text_encoders(conditioner.text_encoders, profile)
        for encoder in conditioner.text_encoders.encoders:
            encoder.to(device)
    if not profile.cache.latents:
        conditioner.vae = load_vae_for(profile, device, weight_dtype)
        _, conditioner.scaling_factor, conditioner.shift_factor = latent_scale(conditioner.vae)
    return conditioner


def make_validation(
    profile: Profile,
    conditioner: Conditioner,
    device: torch.device,
    weight_dtype: torch.dtype,
    pm: Any = None,
) -> Validation | None:
    cfg = profile.validation
    if cfg.every_steps <= 0 or not cfg.prompts:
        return None
    embeds, pooled = encode_validation_prompts(profile, conditioner.text_encoders, device)
    vae = (
        conditioner.vae
        if conditioner.vae is not None
        else load_vae_for(profile, device, weight_dtype)
    )
    if pm is not None:
        pm.hook.nlora_prepare_validation_vae(vae=vae, profile=profile)
    return Validation(
        prompts=tuple(cfg.prompts),
        prompt_embeds=embeds,
        pooled_embeds=pooled,
        vae=vae,
        resolution=profile.data.resolution,
        seed=cfg.seed,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
    )


def prepare_training(
    profile: Profile,
    pm: Any,
    accelerator: Any,
    unet: Any,
    params: list[torch.nn.Parameter],
    noise_scheduler: Any,
    output_dir: Path,
    total_steps: int,
) -> tuple[TrainState, Any]:
    """The optimizer (``nlora_build_optimizer``), its LR schedule, accelerate's wrapping, the
    ``TrainState`` hooks receive, and the module the step calls (``nlora_wrap_model``); for
    ``setup_run`` and for anything that trains without a data set (the GPU check)."""
    optimizer = make_optimizer(pm, params, profile, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, profile.train, total_steps)
    model, optimizer = accelerator.prepare(unet, optimizer)
    state = TrainState(
        profile=profile,
        unet=accelerator.unwrap_model(model),
        noise_scheduler=noise_scheduler,
        lora_parameters=params,
        device=accelerator.device,
        weight_dtype=DTYPES[accelerator.mixed_precision],
        output_dir=output_dir,
        accelerator=accelerator,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
    )
    # Wrapped (e.g. compiled) after state.unet was unwrapped: hooks and saving see the plain module.
    return state, pm.hook.nlora_wrap_model(model=model, profile=profile)


def setup_run(profile: Profile, options: TrainOptions, pm: Any = None) -> Run:
    """Build a ``Run``: every input checked, models on the device, nothing trained yet."""
    from naruto_lora.plugins.manager import build_plugin_manager

    pm = pm if pm is not None else build_plugin_manager(profile)
    device = resolve_device(options.device, supported=("cpu", "cuda"))
    accelerator = make_accelerator(profile, device, options)
    device = accelerator.device
    output_dir, starting_over, resume_from, resume_changes = check_inputs(
        profile, options, accelerator.num_processes
    )
    weight_dtype = DTYPES[accelerator.mixed_precision]
    with local_main_first(accelerator):
        fetch_builtin_assets(profile)
    unet, params = load_trainable_unet(profile, pm, weight_dtype)
    seed = process_seed(profile.train.seed, accelerator.process_index)
    if accelerator.num_processes > 1:
        # The LoRA starts equal everywhere (seeded alike above; DDP also broadcasts rank 0's);
        # from here each process draws its own dropout masks and noise.
        from accelerate.utils import set_seed

        set_seed(seed)
    dataset, batches_per_epoch = load_dataset(profile, options, accelerator)
    total_steps = plan_total_steps(
        profile.train.max_steps,
        profile.train.epochs,
        batches_per_epoch,
        profile.train.gradient_accumulation_steps,
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    conditioner = make_conditioner(profile, device, weight_dtype, generator)
    validation = None  # samples are drawn by the main process only
    if accelerator.is_main_process:
        validation = make_validation(profile, conditioner, device, weight_dtype, pm)
    state, model = prepare_training(
        profile,
        pm,
        accelerator,
        unet,
        params,
        load_noise_scheduler(profile.model),
        output_dir,
        total_steps,
    )
    if options.tensorboard:
        accelerator.init_trackers("nlora", config=_tracker_config(profile))
    return Run(
        profile=profile,
        options=options,
        pm=pm,
        accelerator=accelerator,
        state=state,
        model=model,
        optimizer=state.optimizer,
        lr_scheduler=state.lr_scheduler,
        dataset=dataset,
        batches_per_epoch=batches_per_epoch,
        total_steps=total_steps,
        conditioner=conditioner,
        generator=generator,
        guard=NonFiniteGuard(
            profile.train.max_nonfinite_in_row,
            profile.train.learning_rate,
            announce=accelerator.is_main_process,
        ),
        memory=PeakMemory(device),
        metrics=MetricsLog(output_dir),
        validation=validation,
        starting_over=starting_over,
        resume_from=resume_from,
        resume_changes=resume_changes,
    )


def _tracker_config(profile: Profile) -> dict[str, Any]:
    """TensorBoard hparams accept only scalars and strings: flatten the profile."""
    flat: dict[str, Any] = {}
    for section, values in profile.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, (int, float, str, bool)):
                    flat[f"{section}.{key}"] = value
    return flat
