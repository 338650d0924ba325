"""``OUTPUT/README.md``: the model card of a finished run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from naruto_lora.lora.inject import EMA_SUBFOLDER, WEIGHT_NAME

CARD_NAME = "README.md"


@dataclass
class RunSummary:
    steps: int
    epochs_seen: int
    items: int
    final_loss: float | None
    train_s: float
    device: str
    precision: str  # what the frozen weights ran in: fp32, fp16, bf16
    sample_grid: str | None  # relative to the output folder
    has_ema: bool
    processes: int = 1


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _training_rows(profile: Any, run: RunSummary) -> list[tuple[str, Any]]:
    train = profile.train
    loss = f"{run.final_loss:.4f}" if run.final_loss is not None else "n/a"
    quantized = profile.model.base_weights != "full"
    base_row = (
        "base weights in training",
        f"{profile.model.base_weights} (quantized frozen base; the LoRA is a normal LoRA and "
        "loads on the full-precision base)",
    )
    return [
        ("base model", f"`{profile.model.pretrained}`"),
        *([base_row] if quantized else []),
        ("VAE", f"`{profile.model.vae}`" if profile.model.vae else "the model's own"),
        ("data", f"`{profile.data.source}`, {run.items} items at {profile.data.resolution} px"),
        ("profile", f"`{profile.name}` (resolved in `profile.toml`)"),
        (
            "LoRA",
            ("DoRA (weight-decomposed), " if profile.lora.use_dora else "")
            + f"rank {profile.lora.rank}, alpha {profile.lora.alpha:g}, "
            f"targets {', '.join(profile.lora.target_modules)}",
        ),
        ("steps", f"{run.steps} optimizer updates ({run.epochs_seen} epoch(s) seen)"),
        ("effective batch", _effective_batch(train, run.processes)),
        (
            "learning rate",
            f"{train.learning_rate:g}, {train.lr_scheduler}, {train.lr_warmup_steps} warm-up steps",
        ),
        ("precision", f"{run.precision} on {_devices(run)} (LoRA weights in fp32)"),
        ("plugins", ", ".join(profile.enabled_plugins()) or "none"),
        ("final loss (smoothed)", loss),
        ("training time", _duration(run.train_s)),
    ]


def _effective_batch(train: Any, processes: int) -> str:
    per_process = f"{train.batch_size} x {train.gradient_accumulation_steps}"
    if processes == 1:
        return per_process
    total = processes * train.batch_size * train.gradient_accumulation_steps
    return f"{total} ({processes} processes x {per_process})"


def _devices(run: RunSummary) -> str:
    return run.device if run.processes == 1 else f"{run.processes} x {run.device}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _usage(profile: Any, output_dir: Path, has_ema: bool) -> str:
    ema = (
        f'\n# the EMA weights instead:\n# pipe.load_lora_weights("{output_dir}/{EMA_SUBFOLDER}")'
        if has_ema
        else ""
    )
    return (
        "```python\nimport torch\nfrom diffusers import StableDiffusionXLPipeline\n\n"
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{profile.model.pretrained}", '
        'torch_dtype=torch.float16).to("cuda")\n'
        f'pipe.load_lora_weights("{output_dir}")  # reads {WEIGHT_NAME}{ema}\n'
        f'image = pipe("{profile.validation.prompts[0] if profile.validation.prompts else ""}")'
        ".images[0]\n```\n\n"
        f'Or with naruto-lora: `nlora sample --lora {output_dir} --prompt "..."`.'
    )


def model_card(profile: Any, output_dir: Path, run: RunSummary) -> str:
    front = (
        "---\n"
        f"base_model: {profile.model.pretrained}\n"
        "library_name: diffusers\n"
        "tags: [stable-diffusion-xl, lora, text-to-image, naruto-lora]\n"
        "---\n"
    )
    parts = [
        front,
        f"# LoRA for {profile.model.pretrained}",
        f"Trained with naruto-lora on `{profile.data.source}`.",
        "## Training",
        _table(_training_rows(profile, run)),
    ]
    if run.sample_grid:
        prompts = "; ".join(profile.validation.prompts)
        parts += [
            "## Samples",
            f"Prompts: {prompts} (seed {profile.validation.seed}).",
            f"![validation samples]({run.sample_grid})",
        ]
    parts += [
        "## Loss",
        "![loss curve](loss.png)",
        "## How to load it",
        _usage(profile, output_dir, run.has_ema),
    ]
    return "\n\n".join(parts) + "\n"


def write_model_card(profile: Any, output_dir: Path, run: RunSummary) -> Path:
    from naruto_lora.util.io import atomic_write_text

    path = output_dir / CARD_NAME
    atomic_write_text(path, model_card(profile, output_dir, run))
    return path
