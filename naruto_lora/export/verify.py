"""Load an exported LoRA back the way its users will, and compare it with the training output.

A LoRA's effect on a layer is its delta, ``W_fused = W + scale * delta``; the base weights are the
same on both sides, so two LoRAs give the same fused UNet exactly when every module's delta
matches. The check therefore loads the file onto a weightless copy of the UNet
(``weightless_unet``: SDXL costs no memory), reads each loaded module's delta from peft and
compares it with the training output's. Every module must load (no key left unmatched, no module
missing) and agree within the rounding of the export dtype. A DoRA module's magnitude vector is
compared as it was loaded too; diffusers drops ``dora_scale`` from kohya files (it loads them as
plain LoRA), so for those the magnitudes are read back from the file by naruto-lora's reader.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from naruto_lora.lora.weights import PEFT_PREFIX, LoraWeights, weightless_unet
from naruto_lora.util.errors import UserError

VERIFY_ADAPTER = "nlora_verify"


def _bug(message: str, path: Path) -> UserError:
    # Reaching this means the converter is wrong, not the user's input: say so, keep nothing.
    return UserError(
        f"Export check failed for '{path}': {message}. Nothing was written.",
        hint="This is a bug in naruto-lora; please report it with the command you ran.",
    )


def load_with_diffusers(path: Path, unet: torch.nn.Module) -> None:
    """What ``StableDiffusionXLPipeline.load_lora_weights(path)`` does for the UNet: convert the
    keys (kohya included) with the UNet's config, then load them into the UNet."""
    from diffusers import StableDiffusionXLPipeline

    state_dict, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(path.parent), weight_name=path.name, unet_config=unet.config, return_lora_metadata=True
    )
    other = sorted(k for k in state_dict if not k.startswith("unet."))
    if other:
        raise _bug(f"diffusers reads keys outside the UNet ({', '.join(other[:3])})", path)
    StableDiffusionXLPipeline.load_lora_into_unet(
        state_dict, network_alphas=alphas, unet=unet, metadata=metadata, adapter_name=VERIFY_ADAPTER
    )


def load_with_diffusers_model(folder: Path, weight_name: str, unet: torch.nn.Module) -> None:
    """diffusers' model-level loader on a peft folder (keys and config under ``base_model.model``)."""
    unet.load_lora_adapter(
        str(folder),
        weight_name=weight_name,
        prefix=PEFT_PREFIX.rstrip("."),
        adapter_name=VERIFY_ADAPTER,
    )


def load_with_peft(folder: Path, unet: torch.nn.Module) -> torch.nn.Module:
    """``PeftModel.from_pretrained``: reads adapter_config.json and adapter_model.safetensors."""
    from peft import PeftModel

    return PeftModel.from_pretrained(unet, str(folder), adapter_name=VERIFY_ADAPTER)


def loaded_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Module path -> the peft layer holding the verification adapter (no delta computed yet)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and VERIFY_ADAPTER in module.lora_A
    }


def compare_deltas(
    layers: Mapping[str, Any],
    weights: LoraWeights,
    tolerance: float,
    path: Path,
    loader: str,
    with_magnitude: bool = True,
) -> float:
    """Every module present on both sides, each within ``tolerance`` (relative to the module's
    largest delta entry); returns the largest relative difference.

    One module at a time: a full-size fp32 delta of every module at once would be gigabytes
    (3.6 GiB for SDXL's default targets, whatever the rank)."""
    missing = sorted(set(weights.modules) - set(layers))
    extra = sorted(set(layers) - set(weights.modules))
    if missing or extra:
        raise _bug(
            f"{loader} matched {len(layers)} of {len(weights.modules)} modules "
            f"(not loaded: {', '.join(missing[:3]) or '-'}; unexpected: {', '.join(extra[:3]) or '-'})",
            path,
        )
    worst = 0.0
    for name, lora in weights.modules.items():
        with torch.no_grad():
            reference = lora.delta()
            loaded = layers[name].get_delta_weight(VERIFY_ADAPTER).float()
            error = _relative_error(loaded, reference)
        del reference, loaded
        worst = max(worst, error)
        if error > tolerance:
            raise _bug(
                f"{loader} gives module {name} a weight update off by {error:.2e} (relative), "
                f"more than the {tolerance:.0e} rounding allows",
                path,
            )
        if with_magnitude and lora.magnitude is not None:
            vectors = getattr(layers[name], "lora_magnitude_vector", None) or {}
            if VERIFY_ADAPTER not in vectors:
                raise _bug(f"{loader} loaded module {name} without its DoRA magnitude", path)
            magnitude = vectors[VERIFY_ADAPTER].weight.detach().float().reshape(-1)
            error = _relative_error(magnitude, lora.magnitude.float())
            worst = max(worst, error)
            if error > tolerance:
                raise _bug(
                    f"{loader} gives module {name} a DoRA magnitude off by {error:.2e}", path
                )
    return worst


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return (got - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)


def compare_magnitudes(
    read: LoraWeights, weights: LoraWeights, tolerance: float, path: Path
) -> float:
    """The DoRA magnitudes of a file read back, against the training output's."""
    worst = 0.0
    for name, lora in weights.modules.items():
        if lora.magnitude is None:
            continue
        back = read.modules[name].magnitude if name in read.modules else None
        if back is None:
            raise _bug(f"module {name} was written without its DoRA magnitude", path)
        error = _relative_error(back.float(), lora.magnitude.float())
        worst = max(worst, error)
        if error > tolerance:
            raise _bug(f"module {name}'s DoRA magnitude is off by {error:.2e} once written", path)
    return worst


def verify_lora_file(
    fmt: str, path: Path, weights: LoraWeights, unet_config: Mapping[str, Any], tolerance: float
) -> tuple[tuple[str, ...], float]:
    """Load ``path`` through each loader of its format; returns (loaders, worst error)."""
    checks: list[tuple[str, Any]]
    if fmt == "peft":
        checks = [
            ("peft PeftModel.from_pretrained", lambda u: load_with_peft(path.parent, u)),
            (
                "diffusers load_lora_adapter",
                lambda u: load_with_diffusers_model(path.parent, path.name, u),
            ),
        ]
    else:
        checks = [("diffusers load_lora_weights", lambda u: load_with_diffusers(path, u))]
    # diffusers loads a kohya file's LoRA but drops its dora_scale keys (with a warning).
    magnitudes_loaded = fmt != "kohya"
    worst = 0.0
    for loader, load in checks:
        unet = weightless_unet(unet_config)
        with _quiet_diffusers():
            model = load(unet) or unet
        layers = loaded_layers(model)
        worst = max(
            worst, compare_deltas(layers, weights, tolerance, path, loader, magnitudes_loaded)
        )
    loaders = tuple(loader for loader, _ in checks)
    if weights.use_dora and not magnitudes_loaded:
        from naruto_lora.lora.weights import read_lora

        read = read_lora(path, weightless_unet(unet_config))
        worst = max(worst, compare_magnitudes(read, weights, tolerance, path))
        loaders += ("naruto-lora's kohya reader (dora_scale)",)
    return loaders, worst


class _quiet_diffusers:
    """diffusers logs unmatched keys as warnings; the set comparison reports them as errors."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


# --------------------------------------------------------------------------- merged


def probe_layers(
    unet: torch.nn.Module, weights: LoraWeights, scale: float, seed: int = 0
) -> dict[str, tuple]:
    """Before fusing: each LoRA layer's weight times a random vector, a bound for rounding, and
    for DoRA the row factor ``m / ||W + scale * delta||`` the fused weight must carry.

    Comparing ``W @ v`` (Freivalds' check) instead of keeping a copy of every base weight costs one
    vector per layer instead of gigabytes on SDXL, and a wrong fused weight is still caught.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = dict(unet.named_modules())
    probes = {}
    for name, lora in weights.modules.items():
        weight = layers[name].weight.detach().float()
        factor = None
        if lora.magnitude is not None:
            factor = lora.dora_factor(weight + scale * lora.delta()).flatten()
        weight = weight.flatten(1)
        vector = torch.randn(weight.shape[1], generator=generator)
        probes[name] = (vector, weight @ vector, weight.abs() @ vector.abs(), factor)
    return probes


def verify_merged(
    folder: Path,
    fused_unet: torch.nn.Module,
    probes: dict[str, tuple],
    weights: LoraWeights,
    scale: float,
    dtype: torch.dtype,
    tolerance: float,
) -> float:
    """Reload the saved UNet: it must equal the fused one in memory tensor for tensor, hold no
    LoRA layers, and each LoRA layer must be ``W + scale * delta`` (checked through the probes)."""
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtype)
    saved_state, fused_state = saved.state_dict(), fused_unet.state_dict()
    if set(saved_state) != set(fused_state) or any("lora" in k for k in saved_state):
        raise _bug("the saved UNet's parameters are not the base UNet's", folder)
    changed = [k for k, v in fused_state.items() if not torch.equal(saved_state[k], v)]
    if changed:
        raise _bug(f"{len(changed)} tensors differ after reloading (first: {changed[0]})", folder)
    layers = dict(saved.named_modules())
    worst = 0.0
    for name, (vector, base_product, bound, factor) in probes.items():
        delta = weights.modules[name].delta().flatten(1) * scale
        expected = base_product + delta @ vector
        got = layers[name].weight.detach().flatten(1).float() @ vector
        allowed = tolerance * (bound + delta.abs() @ vector.abs()) + 1e-6
        if factor is not None:  # DoRA: each row of W + scale * delta, rescaled to its magnitude
            expected, allowed = expected * factor, allowed * factor.abs()
        error = ((got - expected).abs() / allowed).max().item()
        worst = max(worst, error * tolerance)
        if error > 1:
            kind = "DoRA" if factor is not None else "LoRA"
            raise _bug(f"fused layer {name} is not base + {scale:g} x {kind}", folder)
    return worst
