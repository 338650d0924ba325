"""A frozen base in 8 bits (``model.base_weights = "int8" | "fp8"``): the UNet's (and resident text
encoders') weights stored in one byte per value with a scale per output channel, computed in the
training dtype, while the LoRA layers stay full precision and get exact gradients for the
quantized function.

* Linear layers (87 % of SDXL's UNet weights, all of CLIP's) go through torchao: ``quantize_``
  with ``Int8WeightOnlyConfig`` or ``Float8WeightOnlyConfig``. peft wraps such a layer in its
  ``TorchaoLoraLinear``, so LoRA on a quantized Linear is peft's own code path.
* Conv2d layers (13 %) are ``QuantizedConv2d`` below: torchao 0.18 has no int8 convolution
  (``aten.convolution`` is not implemented for its ``Int8Tensor``) and its fp8 one needs the
  mslk CUDA kernels; optimum-quanto's ``QConv2d`` breaks peft's conv LoRA (peft builds the LoRA's
  down convolution with the base layer's class). The weight is kept as int8 (or float8 e4m3) with
  a scale per output channel and upcast for the one layer being computed. Convolutions the LoRA
  targets (LoCon) stay in the training dtype.

Rounding is deterministic, so a resumed run quantizes to the same weights. The LoRA itself is a
normal LoRA: it was fitted to the quantized base but loads on the full-precision base everywhere.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from naruto_lora.config.profile import BASE_WEIGHTS
from naruto_lora.util.console import quiet_torchao_logs
from naruto_lora.util.errors import UserError

# torchao's symmetric int8 mapping: scale = absmax / ((127 - (-128)) / 2), values in [-128, 127]
INT8_HALF_RANGE = 127.5
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class QuantizedSummary:
    """What ``quantize_frozen`` did, for the console and the model card."""

    kind: str
    linear: int
    conv: int
    kept_conv: int  # convolutions the LoRA targets, left in the training dtype
    bytes_before: int
    bytes_after: int


def _torchao(kind: str):
    quiet_torchao_logs()
    try:
        with _quiet():
            from torchao.quantization import (
                Float8WeightOnlyConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
    except ImportError as exc:
        raise UserError(
            f'model.base_weights = "{kind}" needs torchao, which is not installed.',
            hint="pip install 'naruto-lora[quantize]' (or torchao), or set "
            'model.base_weights = "full".',
        ) from exc
    return quantize_, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()


class QuantizedConv2d(torch.nn.Module):
    """A frozen ``Conv2d`` whose weight is stored in 8 bits with one scale per output channel,
    dequantized to the scale's dtype (the training dtype) when the layer runs."""

    def __init__(self, conv: torch.nn.Conv2d, kind: str) -> None:
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "groups", "padding_mode"):  # fmt: skip
            setattr(self, name, getattr(conv, name))
        if conv.padding_mode != "zeros":
            raise UserError(f"Cannot quantize a Conv2d with padding_mode={conv.padding_mode!r}.")
        weight = conv.weight.detach()
        qweight, scale = quantize_per_channel(weight, kind)
        self.kind = kind
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = None
        if conv.bias is not None:
            self.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what the layer computes with)."""
        return dequantize_per_channel(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {self.kind}"
        )


def quantize_per_channel(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit values, fp32 scale per output channel) with ``weight ~ values * scale``: symmetric
    absmax scaling, round to nearest for int8, the float8 e4m3 cast (round to nearest even) for
    fp8; the mappings torchao uses for its Linear weights (a test checks they agree)."""
    flat = weight.float().flatten(1)
    top = INT8_HALF_RANGE if kind == "int8" else FP8_MAX
    scale = (flat.abs().amax(dim=1) / top).clamp(min=torch.finfo(torch.float32).tiny)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scaled = weight.float() * (1.0 / scale).reshape(shape)  # as torchao rounds it
    if kind == "int8":
        values = scaled.round().clamp(-128, 127).to(torch.int8)
    else:
        values = scaled.to(torch.float8_e4m3fn)
    return values, scale


def dequantize_per_channel(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (values.dim() - 1)
    return values.to(scale.dtype) * scale.reshape(shape)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def describe_quantized(what: str, summary: QuantizedSummary) -> str:
    kept = f" ({summary.kept_conv} LoRA-targeted convolutions kept)" if summary.kept_conv else ""
    return (
        f"Base {what} in {summary.kind}: {summary.linear} Linear and {summary.conv} Conv2d "
        f"layers, {_size(summary.bytes_before)} -> {_size(summary.bytes_after)}{kept}."
    )


def is_wrapper(tensor: torch.Tensor) -> bool:
    """A tensor subclass whose storage is in the tensors it wraps (torchao's quantized weights:
    the 8-bit values and their scales)."""
    return hasattr(type(tensor), "__tensor_flatten__") and hasattr(tensor, "tensor_data_names")


def wrapped_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    names, _ = tensor.__tensor_flatten__()
    return [getattr(tensor, name) for name in names]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, quantized ones counted by what they store."""
    tensors = [*module.parameters(), *module.buffers()]
    stored = [inner for t in tensors for inner in (wrapped_tensors(t) if is_wrapper(t) else [t])]
    return sum(t.numel() * t.element_size() for t in stored)


def quantize_frozen(
    module: torch.nn.Module, kind: str, keep: Iterable[str] = (), convolutions: bool = True
) -> QuantizedSummary:
    """Quantize ``module``'s Linear and (with ``convolutions``) Conv2d weights in place, before
    a LoRA goes in; ``keep`` names Conv2d modules to leave alone (the LoRA's conv targets)."""
    if kind not in BASE_WEIGHTS or kind == "full":
        raise ValueError(kind)
    quantize_, config = _torchao(kind)
    before = module_bytes(module)
    keep = set(keep)
    linear = [n for n, m in module.named_modules() if type(m) is torch.nn.Linear]
    with _quiet():
        quantize_(module, config, filter_fn=lambda m, fqn: type(m) is torch.nn.Linear)
    convs = 0
    if convolutions:
        for name, conv in list(module.named_modules()):
            if type(conv) is torch.nn.Conv2d and name not in keep:
                parent_name, _, leaf = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, leaf, QuantizedConv2d(conv, kind))
                convs += 1
    return QuantizedSummary(kind, len(linear), convs, len(keep), before, module_bytes(module))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def quiet_peft_torchao() -> Iterator[None]:
    """peft warns once per quantized layer that merging needs transformers' TorchAoConfig;
    the trainer never merges the quantized base (exports use the full-precision one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        yield
