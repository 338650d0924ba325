"""Generate images with a trained LoRA: the base SDXL pipeline, the LoRA fused in at a scale, and
side-by-side grids of the base model against the LoRA at several scales.

Determinism: image ``j`` of every prompt uses seed ``seed + j`` through a CPU generator, so the
same seed and inputs give the same image on any device type, and the cells of a comparison grid
differ only in the LoRA scale. Scale 0 runs with the LoRA switched off: the base model's image,
bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from naruto_lora.util.errors import UserError

if TYPE_CHECKING:
    import torch

    from naruto_lora.lora.weights import LoraWeights

ADAPTER = "nlora"
DEFAULT_SCALES = (0.0, 0.7, 1.0, 1.5)

# name -> (diffusers scheduler class, config overrides); "default" keeps the model's own.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)


@dataclass(frozen=True)
class SampleOptions:
    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None  # None: the model's default size
    width: int | None = None
    seed: int = 0
    num_images: int = 1
    scheduler: str = "default"

    def validate(self) -> None:
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise UserError("No prompt to sample: give --prompt TEXT or --prompts FILE.")
        if self.steps < 1:
            raise UserError(f"--steps {self.steps} must be at least 1.")
        if self.num_images < 1:
            raise UserError(f"--num-images {self.num_images} must be at least 1.")
        for flag, size in (("--height", self.height), ("--width", self.width)):
            if size is not None and (size < 8 or size % 8):
                raise UserError(f"{flag} {size} must be a positive multiple of 8.")
        if self.scheduler not in SCHEDULER_NAMES:
            raise UserError(
                f"Unknown scheduler '{self.scheduler}'.",
                hint=f"Choose one of: {', '.join(SCHEDULER_NAMES)}.",
            )


@dataclass
class Sampler:
    """A loaded pipeline and what to write into the images' metadata about it."""

    pipe: Any
    model: str
    lora: LoraWeights | None

    def size(self, options: SampleOptions) -> tuple[int, int]:
        """(width, height): the options', or the model's default (UNet sample size x VAE factor)."""
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return options.width or default, options.height or default


# --------------------------------------------------------------------------- the pipeline


def pick_device_dtype(dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when there is a GPU, else the CPU in fp32; ``dtype_name`` overrides."""
    from naruto_lora.util.devices import resolve_device, resolve_dtype

    device = resolve_device("auto")
    return device, resolve_dtype(dtype_name, device)


def load_pipeline(model_cfg: Any, dtype: torch.dtype, profile: Any | None = None):
    """The SDXL pipeline of ``model_cfg`` (its VAE too) in ``dtype``, on the CPU."""
    from diffusers import StableDiffusionXLPipeline

    from naruto_lora.models.loading import _common, _load, load_unet, load_vae, resolve_model

    unet = load_unet(model_cfg, dtype)  # also checks that the model is SDXL-shaped
    vae = load_vae(model_cfg, dtype)
    pipe = _load(
        StableDiffusionXLPipeline,
        resolve_model(model_cfg.pretrained),
        "SDXL pipeline",
        unet=unet,
        vae=vae,
        torch_dtype=dtype,
        add_watermarker=False,
        **_common(model_cfg),
    )
    pipe.set_progress_bar_config(disable=True)  # our own bar covers images and steps
    if profile is not None:
        from naruto_lora.plugins.manager import build_plugin_manager

        # Plugins that change the UNet for sampling too (attention processors) do it here.
        build_plugin_manager(profile).hook.nlora_prepare_unet(
            unet=unet, profile=profile, training=False
        )
    return pipe


def set_scheduler(pipe: Any, name: str) -> None:
    if name == "default":
        return
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)


def attach_lora(pipe: Any, weights: LoraWeights) -> None:
    """Add the LoRA to the UNet unfused (for scale sweeps); checks it fits first."""
    from naruto_lora.lora.weights import check_fits, load_into_unet
    from naruto_lora.models.quantize import quiet_peft_torchao

    check_fits(weights, pipe.unet)
    with quiet_peft_torchao():
        load_into_unet(pipe.unet, weights, ADAPTER)


def fuse_lora(pipe: Any, weights: LoraWeights, scale: float) -> None:
    """Fuse the LoRA into the UNet's weights at ``scale`` and drop the adapter layers, so
    sampling runs at the base model's speed."""
    attach_lora(pipe, weights)
    pipe.unet.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
    pipe.unet.unload_lora()


def conv_modules(weights: LoraWeights, unet: Any) -> list[str]:
    """The Conv2d layers a LoRA names (kept in full precision when the base is quantized)."""
    import torch

    layers = dict(unet.named_modules())
    return [n for n in weights.modules if isinstance(layers.get(n), torch.nn.Conv2d)]


def quantize_pipeline(pipe: Any, kind: str, keep: Sequence[str] = ()) -> list[str]:
    """``model.base_weights`` for sampling: the UNet and both text encoders in 8 bits."""
    from naruto_lora.models.quantize import describe_quantized, quantize_frozen

    lines = [describe_quantized("UNet", quantize_frozen(pipe.unet, kind, keep=keep))]
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            summary = quantize_frozen(encoder, kind, convolutions=False)
            lines.append(describe_quantized(name.replace("_", " "), summary))
    return lines


def set_lora_scale(pipe: Any, scale: float) -> None:
    """For an attached (unfused) LoRA. Scale 0 switches it off: exactly the base model."""
    if scale == 0:
        pipe.unet.disable_lora()
        return
    pipe.unet.enable_lora()
    pipe.unet.set_adapters([ADAPTER], weights=[scale])


def place(pipe: Any, device: torch.device, low_vram: bool) -> list[str]:
    """Move the pipeline to ``device``; with ``low_vram`` the reference's 6-8 GB recipe.
    Returns notes for the user about what could not be applied here."""
    notes = []
    if low_vram:
        pipe.enable_attention_slicing(1)
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        if device.type == "cuda":
            # Weights stay in CPU RAM and move to the GPU layer by layer: slow, but ~5-6 GB.
            pipe.enable_sequential_cpu_offload()
            return notes
        notes.append("no GPU: sequential CPU offload skipped (it only saves GPU memory)")
    pipe.to(device)
    return notes


def generate(
    sampler: Sampler,
    prompt: str,
    options: SampleOptions,
    seed: int,
    on_step: Callable[[], None] | None = None,
):
    """One image; the generator lives on the CPU so a seed means the same noise everywhere."""
    import torch

    width, height = sampler.size(options)

    def step_end(pipe, step, timestep, callback_kwargs):
        if on_step is not None:
            on_step()
        return callback_kwargs

    result = sampler.pipe(
        prompt=prompt,
        negative_prompt=options.negative_prompt or None,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=step_end,
    )
    return result.images[0]


# --------------------------------------------------------------------------- files


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> tuple[str, ...]:
    """``--prompt`` values, then the lines of ``--prompts FILE`` (blank and ``#`` lines skipped)."""
    found = [p for p in prompts if p.strip()]
    if prompts_file:
        path = Path(prompts_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"Cannot read --prompts file '{path}': {exc.strerror or exc}.") from exc
        found += [
            line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
    return tuple(found)


def output_paths(out: Path, names: list[str]) -> list[Path]:
    """A ``.png`` path takes exactly one image; anything else is a folder for all of them."""
    if out.suffix.lower() == ".png":
        if len(names) != 1:
            raise UserError(
                f"--out '{out}' names one file, but {len(names)} images will be written.",
                hint="Give a folder for --out.",
            )
        return [out]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a folder.")
    return [out / name for name in names]


def png_info(fields: dict[str, Any]):
    """PNG text chunks: one per field, plus AUTOMATIC1111's ``parameters`` line so image
    browsers that know it show the settings."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))
    if "prompt" in fields:
        lines = [str(fields["prompt"])]
        if fields.get("negative_prompt"):
            lines.append(f"Negative prompt: {fields['negative_prompt']}")
        lines.append(
            f"Steps: {fields.get('steps')}, Sampler: {fields.get('scheduler')}, "
            f"CFG scale: {fields.get('guidance')}, Seed: {fields.get('seed')}, "
            f"Size: {fields.get('size')}, Model: {fields.get('model')}, "
            f"Lora: {fields.get('lora')}, Lora scale: {fields.get('lora_scale')}"
        )
        info.add_text("parameters", "\n".join(lines))
    return info


def save_png(image: Any, path: Path, fields: dict[str, Any]) -> None:
    from naruto_lora.util.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(fields))


def image_fields(
    sampler: Sampler, options: SampleOptions, prompt: str, seed: int, scale: float | str
) -> dict[str, Any]:
    from naruto_lora import __version__

    width, height = sampler.size(options)
    return {
        "prompt": prompt,
        "negative_prompt": options.negative_prompt or "",
        "seed": seed,
        "lora": str(sampler.lora.path) if sampler.lora else "",
        "lora_scale": scale,
        "steps": options.steps,
        "guidance": options.guidance,
        "scheduler": options.scheduler,
        "size": f"{width}x{height}",
        "model": sampler.model,
        "software": f"naruto-lora {__version__}",
    }


# --------------------------------------------------------------------------- running


class _Bars:
    """One bar over every step of every image (so the ETA covers the whole run), its label
    counting the images."""

    def __init__(self, images: int, steps: int):
        from naruto_lora.util.console import progress

        self.images, self.done = images, 0
        self.bar = progress("step")
        self.task = self.bar.add_task(self._label(), total=images * steps)

    def _label(self) -> str:
        return f"image {min(self.done + 1, self.images)}/{self.images}"

    def __enter__(self) -> _Bars:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def step(self) -> None:
        self.bar.advance(self.task)

    def image_done(self) -> None:
        self.done += 1
        self.bar.update(self.task, description=self._label())


def plan_images(options: SampleOptions, out: Path) -> list[tuple[str, int, Path]]:
    """(prompt, seed, file) for every image of a plain run, checked before anything loads."""
    jobs = [
        (i, prompt, options.seed + j)
        for i, prompt in enumerate(options.prompts)
        for j in range(options.num_images)
    ]
    names = [f"{i:02d}-{slug(prompt)}-{seed}.png" for i, prompt, seed in jobs]
    return [
        (prompt, seed, path)
        for (_, prompt, seed), path in zip(jobs, output_paths(out, names), strict=True)
    ]


def check_no_images_there(paths: list[Path], overwrite: bool) -> None:
    """Refuse, before anything loads, to replace images a user already has."""
    there = [p for p in paths if p.exists()]
    if there and not overwrite:
        shown = ", ".join(f"'{p}'" for p in there[:3]) + (
            f" (and {len(there) - 3} more)" if len(there) > 3 else ""
        )
        raise UserError(
            f"{len(there)} of the {len(paths)} image(s) to write already exist: {shown}. They "
            "are not replaced without --overwrite.",
            hint="Give another --out (or --seed), or --overwrite to replace them.",
        )


def plan_grids(options: SampleOptions, out: Path) -> list[tuple[str, Path]]:
    names = [f"compare-{i:02d}-{slug(prompt)}.png" for i, prompt in enumerate(options.prompts)]
    return list(zip(options.prompts, output_paths(out, names), strict=True))


def run_images(
    sampler: Sampler, options: SampleOptions, scale: float, plan: list[tuple[str, int, Path]]
) -> list[Path]:
    with _Bars(len(plan), options.steps) as bars:
        for prompt, seed, path in plan:
            image = generate(sampler, prompt, options, seed, on_step=bars.step)
            save_png(image, path, image_fields(sampler, options, prompt, seed, scale))
            bars.image_done()
    return [path for _, _, path in plan]


def scale_label(scale: float) -> str:
    return "base (scale 0)" if scale == 0 else f"LoRA x{scale:g}"


def run_grids(
    sampler: Sampler, options: SampleOptions, scales: Sequence[float], plan: list[tuple[str, Path]]
) -> list[Path]:
    """One grid per prompt: a row per seed, a column per scale, all with the same seeds."""
    import json

    from naruto_lora.sample.grid import make_grid

    seeds = [options.seed + j for j in range(options.num_images)]
    with _Bars(len(plan) * len(seeds) * len(scales), options.steps) as bars:
        for prompt, path in plan:
            rows = []
            for seed in seeds:
                row = []
                for scale in scales:
                    set_lora_scale(sampler.pipe, scale)
                    row.append(generate(sampler, prompt, options, seed, on_step=bars.step))
                    bars.image_done()
                rows.append(row)
            grid = make_grid(
                rows, [scale_label(s) for s in scales], [f"seed {s}" for s in seeds], title=prompt
            )
            fields = image_fields(
                sampler, options, prompt, seeds[0], ",".join(f"{s:g}" for s in scales)
            )
            fields.update(seeds=",".join(map(str, seeds)), grid_cells=json.dumps(grid.boxes))
            save_png(grid.image, path, fields)
    return [path for _, path in plan]


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise UserError(
            f"--scales '{text}' must be numbers separated by commas, e.g. 0,0.7,1,1.5."
        ) from exc
    if not scales:
        raise UserError("--scales is empty; give e.g. 0,0.7,1,1.5.")
    return scales


def sample(
    *,
    lora_file: Path,
    model_cfg: Any,
    profile: Any | None,
    options: SampleOptions,
    out: Path,
    scale: float = 1.0,
    compare: bool = False,
    scales: Sequence[float] = DEFAULT_SCALES,
    low_vram: bool = False,
    dtype_name: str = "auto",
    overwrite: bool = False,
    base_weights: str | None = None,
) -> list[Path]:
    """Load the base pipeline and the LoRA, then write the images (or comparison grids).
    Images already at their paths are only replaced with ``overwrite``."""
    from rich.markup import escape

    from naruto_lora.lora.weights import peek_format, read_lora
    from naruto_lora.util.console import console

    options.validate()
    device, dtype = pick_device_dtype(dtype_name)
    plan = plan_grids(options, out) if compare else plan_images(options, out)
    check_no_images_there([item[-1] for item in plan], overwrite)
    peek_format(lora_file)  # a wrong file fails now, not after loading the model
    console.print(
        f"Loading [bold]{escape(model_cfg.pretrained)}[/] ({str(dtype).removeprefix('torch.')}, "
        f"{device.type}) and the LoRA {escape(str(lora_file))}"
    )
    pipe = load_pipeline(model_cfg, dtype, profile)
    weights = read_lora(lora_file, pipe.unet)
    set_scheduler(pipe, options.scheduler)
    model = model_cfg.pretrained + (f" + VAE {model_cfg.vae}" if model_cfg.vae else "")
    sampler = Sampler(pipe=pipe, model=model, lora=weights)
    kind = base_weights or model_cfg.base_weights
    if kind != "full" and low_vram:
        console.print(
            f"[yellow]note:[/] --low-vram streams the weights layer by layer: the base stays in "
            f"{str(dtype).removeprefix('torch.')} (base weights {kind} ignored)"
        )
        kind = "full"
    if kind != "full":
        # A LoRA cannot be fused into 8-bit weights: it stays attached, at the scale asked.
        for line in quantize_pipeline(pipe, kind, keep=conv_modules(weights, pipe.unet)):
            console.print(line)
        attach_lora(pipe, weights)
        if not compare:
            set_lora_scale(pipe, scale)
    elif compare:
        attach_lora(pipe, weights)
    else:
        fuse_lora(pipe, weights, scale)
    for note in place(pipe, device, low_vram):
        console.print(f"[yellow]note:[/] {note}")
    if compare:
        return run_grids(sampler, options, scales, plan)
    return run_images(sampler, options, scale, plan)
