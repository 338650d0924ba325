"""A LoRA as a plain map of UNet modules to (down, up, alpha), read from any of the file formats
naruto-lora writes or meets, checked against the base UNet, and put into a UNet.

Formats recognised by their keys:

* diffusers (the training output): ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, with the
  adapter config (rank, alpha, patterns) as JSON in the ``lora_adapter_metadata`` metadata key;
* peft: ``base_model.model.<module>.lora_A.weight`` with ``adapter_config.json`` beside it;
* kohya: ``lora_unet_<name>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha`` (sgm or diffusers
  module names, see ``naruto_lora.lora.kohya``).

Throughout, ``alpha`` follows kohya's convention: the weight update is ``alpha / rank * up @ down``.

DoRA (weight-decomposed LoRA, peft's ``use_dora``) adds a magnitude per output channel: the
layer's weight becomes ``m * V / ||V||`` with ``V = W + alpha / rank * up @ down`` and the norm
taken over each output row. Its files carry the magnitude as ``lora_magnitude_vector`` (diffusers,
peft: shape ``(out,)`` for Linear, ``(1, out, 1, 1)`` for Conv2d) or ``dora_scale`` (kohya:
``(out, 1)`` / ``(out, 1, 1, 1)``, the output-axis layout ComfyUI and Forge recognise).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from naruto_lora.lora.inject import ADAPTER_METADATA_KEY, UNET_PREFIX, read_lora_file
from naruto_lora.util.errors import UserError

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass(frozen=True)
class LoraModule:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA: (out,), the norm of each output row

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The fp32 weight update this module adds at LoRA scale 1, shaped like the layer's weight."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        return (product * self.scale).reshape(up.shape[0], *down.shape[1:])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def fused(self, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The fp32 layer weight with this module applied at LoRA ``scale`` (diffusers' and
        peft's meaning of the scale: for DoRA it scales the update inside the normalisation)."""
        combined = weight.float() + scale * self.delta()
        if self.magnitude is None:
            return combined
        return combined * self.dora_factor(combined)

    def dora_factor(self, combined: torch.Tensor) -> torch.Tensor:
        """``m / ||V||`` per output row of the combined weight ``V``, shaped to broadcast over it."""
        assert self.magnitude is not None
        norm = combined.flatten(1).norm(dim=1)
        shape = (-1,) + (1,) * (combined.dim() - 1)
        return (self.magnitude.float() / norm).reshape(shape)

    def peft_magnitude(self) -> torch.Tensor:
        """The magnitude in peft's shape: ``(out,)`` for Linear, ``(1, out, 1, 1)`` for Conv2d."""
        assert self.magnitude is not None
        return self.magnitude.reshape(1, -1, 1, 1) if self.is_conv else self.magnitude

    def kohya_magnitude(self) -> torch.Tensor:
        """``dora_scale`` on the output axis: ``(out, 1)`` / ``(out, 1, 1, 1)``. A 1-D vector
        would broadcast against ComfyUI's and Forge's ``(out, 1)`` norm into an ``(out, out)``
        matrix (ComfyUI issue #12938)."""
        assert self.magnitude is not None
        return self.magnitude.reshape(-1, *([1] * (self.down.dim() - 1)))


@dataclass
class LoraWeights:
    modules: dict[str, LoraModule]  # diffusers UNet module path -> weights
    path: Path
    source_format: str
    metadata: dict[str, str] = field(default_factory=dict)

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())

    def alphas(self) -> Counter:
        return Counter(m.alpha for m in self.modules.values())

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())


# --------------------------------------------------------------------------- reading


def detect_format(keys: list[str], path: Path) -> str:
    if not keys:
        raise UserError(f"'{path}' holds no tensors: it is not a LoRA file.")
    if any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder")) for k in keys):
        raise UserError(
            f"'{path}' has text-encoder LoRA weights; naruto-lora trains and handles UNet LoRAs only.",
            hint="Use a UNet-only LoRA (what `nlora train` writes).",
        )
    if all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if all(k.startswith(UNET_PREFIX) for k in keys):
        return "diffusers"
    if all(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    raise UserError(
        f"'{path}' is not a LoRA file naruto-lora can read (first keys: {', '.join(keys[:3])}).",
        hint="Expected diffusers keys (unet....lora_A.weight), peft keys (base_model.model....) "
        "or kohya keys (lora_unet_....lora_down.weight).",
    )


def peek_format(path: Path) -> str:
    """The format from the file's keys alone (no tensors read): a quick check before big loads."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(f"'{path}' is not a readable safetensors file: {exc}.") from exc
    return detect_format(keys, path)


def _split_peft_keys(
    tensors: Mapping[str, torch.Tensor], prefix: str, path: Path
) -> dict[str, dict]:
    """``<prefix><module>.lora_A.weight`` etc. -> {module: {"A": t, "B": t, "alpha": x}}."""
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name = key[len(prefix) :]
        for suffix, slot in PEFT_SLOTS:
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[slot] = tensor
                break
        else:
            raise UserError(
                f"'{path}' has a key naruto-lora cannot use: '{key}'.",
                hint="Only LoRA and DoRA weights (lora_A/lora_B, lora_magnitude_vector) are "
                "supported: no biases or other adapter types.",
            )
    return parts


PEFT_SLOTS = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".alpha", "alpha"),
    (".lora_magnitude_vector", "M"),
    (".lora_magnitude_vector.weight", "M"),
)


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """peft's rule for rank/alpha patterns: a pattern matches a module path suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _peft_alpha(config: Mapping[str, Any], module: str, rank: int) -> float:
    """A module's alpha in kohya's convention from a peft LoraConfig dict."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
    alpha = float(config.get("lora_alpha", rank) if alpha is None else alpha)
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(rank); express that as an alpha over rank.
        return alpha / math.sqrt(rank) * rank
    return alpha


def _modules_from_peft(
    parts: dict[str, dict], config: Mapping[str, Any] | None, path: Path, layout: str = "peft"
) -> dict:
    modules = {}
    for name, slots in parts.items():
        if "A" not in slots or "B" not in slots:
            raise UserError(f"'{path}': module '{name}' lacks its lora_A or lora_B weight.")
        rank = int(slots["A"].shape[0])
        if "alpha" in slots:
            alpha = float(slots["alpha"].item())
        elif config is not None:
            alpha = _peft_alpha(config, name, rank)
        else:
            alpha = float(rank)  # diffusers' and peft's convention without a config: scale 1
        magnitude = slots.get("M")
        if magnitude is not None:
            magnitude = _output_axis_magnitude(magnitude, slots["B"], name, path, layout)
        modules[name] = LoraModule(down=slots["A"], up=slots["B"], alpha=alpha, magnitude=magnitude)
    dora = [name for name, module in modules.items() if module.magnitude is not None]
    if dora and len(dora) != len(modules):
        plain = sorted(set(modules) - set(dora))
        raise UserError(
            f"'{path}' mixes DoRA and plain LoRA modules ({len(dora)} with a magnitude, "
            f"{len(plain)} without, e.g. {plain[0]}); naruto-lora handles one kind per file.",
            hint="Re-export the LoRA from its training output.",
        )
    return modules


def _output_axis_magnitude(
    magnitude: torch.Tensor, up: torch.Tensor, name: str, path: Path, layout: str
) -> torch.Tensor:
    """A DoRA magnitude as a flat ``(out,)`` vector from the file's ``layout`` (peft's
    ``(out,)`` / ``(1, out, 1, 1)``, or kohya's ``(out, 1, ...)``, where a 1-D vector also reads as
    one value per output channel); refuses an input-axis magnitude (LyCORIS's ``wd_on_out =
    False``: one value per input channel), which decomposes the weight differently and has no
    peft DoRA equivalent."""
    out = int(up.shape[0])
    shape = tuple(magnitude.shape)
    flat = magnitude.reshape(-1)
    if layout == "peft":
        on_output = shape == ((1, out, 1, 1) if up.dim() == 4 else (out,))
    else:
        on_output = shape == (out,) or (shape[0] == out and shape[1:] == (1,) * (up.dim() - 1))
    if not on_output:
        raise UserError(
            f"'{path}': module '{name}' has a DoRA magnitude of shape {shape}, which is not one "
            f"value per output channel ({out}).",
            hint="Input-axis DoRA (LyCORIS with wd_on_out = false) is not supported; naruto-lora "
            "reads output-axis DoRA, what peft and `nlora train` with lora.use_dora write.",
        )
    return flat


def _diffusers_config(metadata: Mapping[str, str], prefix: str) -> dict[str, Any] | None:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    table = json.loads(raw)
    return {k[len(prefix) :]: v for k, v in table.items() if k.startswith(prefix)}


def _peft_file_config(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    config_path = path.parent / PEFT_CONFIG_NAME
    if config_path.is_file():
        try:
            return json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"'{config_path}' is not valid JSON: {exc}.") from exc
    config = _diffusers_config(metadata, PEFT_PREFIX)
    if config:
        return config
    raise UserError(
        f"'{path}' has peft keys but no {PEFT_CONFIG_NAME} beside it, so its alpha is unknown.",
        hint=f"Keep {PEFT_CONFIG_NAME} in the same folder as the weights.",
    )


KOHYA_SLOTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", "dora_scale": "M"}


def _modules_from_kohya(
    tensors: Mapping[str, torch.Tensor], lookup: Mapping[str, str], path: Path
) -> dict:
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        slot = KOHYA_SLOTS.get(suffix)
        if slot is None:
            raise UserError(
                f"'{path}' has a key naruto-lora cannot use: '{key}'.",
                hint="Only LoRA and DoRA (lora_down/lora_up/alpha/dora_scale) are supported: no "
                "LoCon mid weights, LoHa or LoKr.",
            )
        parts.setdefault(name, {})[slot] = tensor
    unknown = sorted(name for name in parts if name not in lookup)
    if unknown:
        raise UserError(
            f"{len(unknown)} LoRA module(s) in '{path}' name no layer of the base UNet "
            f"(first: {', '.join(unknown[:3])}).",
            hint="The LoRA was made for another architecture (e.g. SD 1.5 or a different SDXL "
            "variant); use it with the model it was trained on.",
        )
    renamed = {lookup[name]: slots for name, slots in parts.items()}
    return _modules_from_peft(renamed, None, path, layout="kohya")


def read_lora(path: Path, unet: torch.nn.Module) -> LoraWeights:
    """Read a LoRA file of any supported format and check it fits ``unet`` (real or weightless)."""
    from naruto_lora.lora.kohya import kohya_lookup

    tensors, metadata = read_lora_file(path)
    fmt = detect_format(list(tensors), path)
    if fmt == "kohya":
        lookup = kohya_lookup(lora_target_names(unet), unet.config)
        modules = _modules_from_kohya(tensors, lookup, path)
    elif fmt == "diffusers":
        config = _diffusers_config(metadata, UNET_PREFIX)
        modules = _modules_from_peft(_split_peft_keys(tensors, UNET_PREFIX, path), config, path)
    else:
        config = _peft_file_config(path, metadata)
        modules = _modules_from_peft(_split_peft_keys(tensors, PEFT_PREFIX, path), config, path)
    weights = LoraWeights(modules=modules, path=path, source_format=fmt, metadata=metadata)
    check_fits(weights, unet)
    check_finite(weights)
    return weights


def check_finite(weights: LoraWeights) -> None:
    """A LoRA with NaN or inf in it renders black or noise everywhere: refuse it, by module."""
    bad = [
        name
        for name, lora in sorted(weights.modules.items())
        if not all(
            bool(torch.isfinite(t).all())
            for t in (lora.down, lora.up, lora.magnitude)
            if t is not None
        )
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise UserError(
            f"'{weights.path}' holds non-finite weights (NaN or inf) in {len(bad)} of "
            f"{len(weights.modules)} LoRA module(s): {shown}. It would produce black or noise "
            "images, so it is not used.",
            hint="The training that wrote it diverged: use an earlier checkpoint "
            "(OUTPUT/checkpoints/step-N) or train again with a lower learning rate.",
        )


# --------------------------------------------------------------------------- the base UNet


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # a peft-wrapped layer keeps the original inside


def lora_target_names(unet: torch.nn.Module) -> list[str]:
    """Every module path a LoRA can attach to (Linear and Conv2d layers)."""
    names = []
    for name, module in unet.named_modules():
        if ".base_layer" in name or ".lora_" in name:
            continue
        if isinstance(_base_layer(module), LORA_LAYER_TYPES):
            names.append(name)
    return names


def _expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


def check_fits(weights: LoraWeights, unet: torch.nn.Module) -> None:
    """Every LoRA module names a layer of ``unet`` and has shapes that fit it; else a UserError
    naming the mismatches (the usual cause: a LoRA trained on another architecture)."""
    layers = {name: _base_layer(m) for name, m in unet.named_modules()}
    missing = sorted(n for n in weights.modules if not isinstance(layers.get(n), LORA_LAYER_TYPES))
    if missing:
        raise UserError(
            f"{len(missing)} LoRA module(s) in '{weights.path}' name no layer of the base UNet "
            f"(first: {', '.join(missing[:3])}).",
            hint="The LoRA was made for another architecture; use it with the model it was trained on.",
        )
    bad = []
    for name, module in sorted(weights.modules.items()):
        want_down, want_up = _expected_shapes(layers[name], module.rank)
        if tuple(module.down.shape) != want_down or tuple(module.up.shape) != want_up:
            bad.append(
                f"{name}: LoRA down {tuple(module.down.shape)} / up {tuple(module.up.shape)}, "
                f"the base layer needs {want_down} / {want_up}"
            )
        elif module.magnitude is not None and module.magnitude.numel() != want_up[0]:
            bad.append(
                f"{name}: DoRA magnitude of {module.magnitude.numel()} values, the base layer "
                f"has {want_up[0]} output channels"
            )
    if bad:
        raise UserError(
            f"The LoRA '{weights.path}' does not fit the base UNet: {len(bad)} module(s) have "
            f"shapes of another architecture. {'; '.join(bad[:3])}.",
            hint="Use the base model the LoRA was trained on (--model, or the run's profile).",
        )


def weightless_unet(config: Mapping[str, Any]):
    """The UNet's architecture with no weights in memory, for checking and loading LoRAs.

    Built on the meta device, then every parameter becomes a zero expanded to its shape (one
    float of storage): peft needs a real device to create LoRA layers on, and a LoRA's delta
    never reads the base weight, so SDXL's 2.6 B parameters cost nothing here.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    for module in unet.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            zero = torch.zeros((), dtype=param.dtype).expand(param.shape)
            setattr(module, name, torch.nn.Parameter(zero, requires_grad=False))
    return unet


# --------------------------------------------------------------------------- writing


def peft_config_dict(weights: LoraWeights) -> dict[str, Any]:
    """LoraConfig keyword arguments reproducing ``weights`` exactly: the most common rank and
    alpha, patterns (full module paths) for the rest, every module named in ``target_modules``."""
    rank = weights.ranks().most_common(1)[0][0]
    alpha = weights.alphas().most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {n: m.rank for n, m in weights.modules.items() if m.rank != rank},
        "alpha_pattern": {n: m.alpha for n, m in weights.modules.items() if m.alpha != alpha},
        "target_modules": sorted(weights.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": weights.use_dora,
        "init_lora_weights": True,
    }


def peft_state_dict(weights: LoraWeights, prefix: str, dtype: torch.dtype | None = None) -> dict:
    """``<prefix><module>.lora_A.weight`` / ``lora_B.weight`` tensors (and DoRA's
    ``lora_magnitude_vector``), contiguous, on the CPU."""
    out = {}
    for name, module in sorted(weights.modules.items()):
        slots = [("lora_A.weight", module.down), ("lora_B.weight", module.up)]
        if module.magnitude is not None:
            slots.append(("lora_magnitude_vector", module.peft_magnitude()))
        for slot, tensor in slots:
            value = tensor.to(dtype) if dtype is not None else tensor
            out[f"{prefix}{name}.{slot}"] = value.detach().contiguous().cpu()
    return out


def load_into_unet(unet: torch.nn.Module, weights: LoraWeights, adapter_name: str) -> None:
    """Attach ``weights`` to ``unet`` as an unfused adapter, through diffusers' own LoRA loader
    (the call ``pipeline.load_lora_weights`` makes for the UNet)."""
    state = peft_state_dict(weights, prefix=UNET_PREFIX)
    metadata = {f"{UNET_PREFIX}{k}": v for k, v in peft_config_dict(weights).items()}
    unet.load_lora_adapter(state, prefix="unet", metadata=metadata, adapter_name=adapter_name)
