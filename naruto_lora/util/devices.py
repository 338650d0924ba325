"""One place that turns ``--device`` and ``--dtype`` into torch objects, for every command."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from naruto_lora.util.errors import UserError

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(
    name: str | torch.device, supported: Sequence[str] | None = None
) -> torch.device:
    """``auto`` -> CUDA when this torch sees a GPU, else the CPU; a named device is checked
    (a CUDA device on a machine without one, or a kind the command cannot use, is a user error)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(
            f"--device {str(name)!r} is not a torch device; use auto, cpu, cuda or cuda:N."
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name}: this torch sees no CUDA GPU.",
            hint="Use --device cpu, or install a CUDA build of torch.",
        )
    if supported is not None and device.type not in supported:
        raise UserError(f"--device {name}: this command supports {', '.join(supported)} devices.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"Unknown --dtype '{name}'.", hint="Choose auto, fp16, bf16 or fp32.")
    return DTYPES[name]
