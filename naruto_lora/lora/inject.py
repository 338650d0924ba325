"""LoRA on the SDXL UNet: injection (peft), the diffusers file format, reading LoRA files.

The training output is what ``StableDiffusionXLPipeline.save_lora_weights`` writes: keys
``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the adapter config (rank, alpha, targets)
as JSON under the ``lora_adapter_metadata`` safetensors metadata key, so
``pipe.load_lora_weights(folder)`` restores it exactly, alpha included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from naruto_lora.util.errors import UserError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMA_SUBFOLDER = "ema_unet"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
UNET_PREFIX = "unet."


def _adaptable_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's Linear and Conv2d modules by path: what a LoRA target can name."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def _names(path: str, target: str) -> bool:
    """peft's suffix rule: a target names a module path equal to it or ending in ``.target``."""
    return path == target or path.endswith("." + target)


def check_target_modules(unet: torch.nn.Module, targets: tuple[str, ...] | list[str]) -> None:
    """Every target must name at least one Linear/Conv module of the UNet (peft's suffix match)."""
    names = list(_adaptable_layers(unet))
    missing = [t for t in targets if not any(_names(n, t) for n in names)]
    if missing:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n in names}
            | {".".join(n.rsplit(".", 2)[-2:]) for n in names if n.endswith(".0")}
        )
        raise UserError(
            f"lora.target_modules names module(s) this UNet does not have: {', '.join(missing)}.",
            hint=f"Module names available to target include: {', '.join(leaves[:40])}.",
        )


# Top-level UNet layers that kohya-format loaders (kohya's sd-scripts, AUTOMATIC1111, Forge)
# have no name for and drop: a LoRA on them changes nothing there.
KOHYA_DROPPED = (
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
)


def targeted_modules(
    unet: torch.nn.Module, targets: tuple[str, ...] | list[str]
) -> dict[str, torch.nn.Module]:
    """The Linear/Conv2d modules the targets name, by path, by peft's suffix rule."""
    return {
        name: module
        for name, module in _adaptable_layers(unet).items()
        if any(_names(name, t) for t in targets)
    }


def targeted_convolutions(unet: torch.nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The Conv2d modules the targets name (they get the conv rank, and stay full precision on
    a quantized base)."""
    return [
        name
        for name, module in targeted_modules(unet, targets).items()
        if isinstance(module, torch.nn.Conv2d)
    ]


def conv_rank_and_alpha(lora_cfg: Any) -> tuple[int, float]:
    """The conv layers' rank and alpha (``lora.conv_rank``, ``lora.conv_alpha``; 0 = derived)."""
    rank = getattr(lora_cfg, "conv_rank", 0) or lora_cfg.rank
    alpha = getattr(lora_cfg, "conv_alpha", 0.0) or lora_cfg.alpha * rank / lora_cfg.rank
    return rank, float(alpha)


def peft_config(lora_cfg: Any, conv_modules: list[str] | tuple[str, ...] = ()):
    """peft's ``LoraConfig``; ``conv_modules`` (full names) get the conv rank and alpha through
    ``rank_pattern`` / ``alpha_pattern`` when those differ."""
    from peft import LoraConfig

    rank, alpha = conv_rank_and_alpha(lora_cfg)
    return LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=list(lora_cfg.target_modules),
        rank_pattern={n: rank for n in conv_modules} if rank != lora_cfg.rank else {},
        alpha_pattern={n: alpha for n in conv_modules} if alpha != lora_cfg.alpha else {},
        use_dora=bool(getattr(lora_cfg, "use_dora", False)),
    )


def inject_lora(unet: torch.nn.Module, lora_cfg: Any) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add the LoRA adapter, keep the trainable LoRA parameters in fp32
    (fp16 optimizer updates underflow); return them."""
    check_target_modules(unet, lora_cfg.target_modules)
    targeted = targeted_modules(unet, lora_cfg.target_modules)
    dropped = [n for n in targeted if n in KOHYA_DROPPED]
    if dropped:
        from naruto_lora.util.console import console

        console.print(
            f"[yellow]Warning:[/] lora.target_modules includes {', '.join(dropped)}: kohya-format "
            "loaders (kohya's sd-scripts, AUTOMATIC1111, Forge) have no name for these top-level "
            "layers and drop them, so the LoRA acts differently there than in diffusers."
        )
    conv = [n for n, module in targeted.items() if isinstance(module, torch.nn.Conv2d)]
    unet.requires_grad_(False)
    unet.add_adapter(peft_config(lora_cfg, conv))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (the LoRA's after ``inject_lora``), by their module names."""
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' ``unet.`` prefix, detached, on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return {f"{UNET_PREFIX}{k}": v.detach().to("cpu", copy=True) for k, v in state.items()}


def adapter_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    config = unet.peft_config["default"].to_dict()
    return {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora(
    folder: Path | str,
    state_dict: Mapping[str, torch.Tensor],
    adapter_meta: Mapping[str, Any],
    extra_metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically, in diffusers' layout."""
    from naruto_lora.util.io import atomic_save_safetensors

    metadata = {
        "format": "pt",
        ADAPTER_METADATA_KEY: json.dumps(dict(adapter_meta), indent=2, sort_keys=True, default=str),
    }
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in state_dict.items()}
    path = Path(folder) / WEIGHT_NAME
    atomic_save_safetensors(path, tensors, metadata)
    return path


def find_lora_file(path: Path | str, ema: bool = False) -> Path:
    """A training output folder, a checkpoint folder, or a ``.safetensors`` file -> the weights file."""
    path = Path(path).expanduser()
    if path.is_file():
        if ema:
            raise UserError(
                f"--ema needs a training output folder, but '{path}' is a single file.",
                hint=f"Point --lora at the folder that holds {EMA_SUBFOLDER}/.",
            )
        if path.suffix != ".safetensors":
            raise UserError(
                f"'{path}' is not a .safetensors file; only safetensors LoRA files are loaded."
            )
        return path
    if not path.is_dir():
        raise UserError(
            f"LoRA path '{path}' does not exist.",
            hint="Give a training output folder, a checkpoint folder or a .safetensors file.",
        )
    if ema:
        candidate = path / EMA_SUBFOLDER / WEIGHT_NAME
        if not candidate.is_file():
            raise UserError(
                f"'{path}' has no EMA weights ({EMA_SUBFOLDER}/{WEIGHT_NAME} is missing).",
                hint="That run trained without the ema plugin; drop --ema, or retrain with --enable ema.",
            )
        return candidate
    candidate = path / WEIGHT_NAME
    if candidate.is_file():
        return candidate
    others = sorted(path.glob("*.safetensors"))
    if len(others) == 1:
        return others[0]
    raise UserError(
        f"No LoRA weights in '{path}': expected {WEIGHT_NAME}.",
        hint="Point --lora at a training output folder, a checkpoint folder or a .safetensors file.",
    )


def read_lora_file(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a damaged file is a user error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(
            f"'{path}' is not a readable safetensors file: {exc}.",
            hint="The file may be truncated; re-export or re-train it.",
        ) from exc
    return tensors, metadata
