"""Attention kernels: which of PyTorch's scaled-dot-product attention kernels the UNet runs
(``torch.nn.attention.sdpa_kernel``: flash, memory-efficient, cuDNN or the math reference), or
xformers when asked for and installed.

``backend``:

* ``auto`` (default): the first kernel of ``AUTO_ORDER`` that runs on the device and dtype the
  attention actually sees (probed once with a tiny call, forward and backward), said on the
  console;
* ``flash``, ``efficient``, ``cudnn``, ``math``: that kernel only (an error names the kernels
  that do run there when it does not);
* ``sdpa``: PyTorch's own choice per call (diffusers' ``AttnProcessor2_0`` as it loads);
* ``xformers``: xformers' memory-efficient attention.

The kernel is chosen in the attention processor around each ``scaled_dot_product_attention``
call, so it holds for the backward (each kernel has its own backward) and for the forward that
gradient checkpointing recomputes, and it leaves the process-wide flags as they were.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError

KERNEL_NAMES = ("flash", "efficient", "cudnn", "math")
# Best first. Flash-attention 2 is PyTorch's own first choice for fp16/bf16 on CUDA and the
# best-tested backward; the memory-efficient kernel also takes fp32; cuDNN's is fast on Hopper
# but newer (benchmarks/gpu_check.py measures each: the order follows the measurement).
AUTO_ORDER = ("flash", "efficient", "cudnn", "math")


@dataclass(frozen=True)
class SDPAConfig:
    backend: Literal["auto", "sdpa", "flash", "efficient", "cudnn", "math", "xformers"] = "auto"


def sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


@functools.cache
def kernel_runs(
    name: str, device: str, dtype: torch.dtype, head_dim: int, backward: bool = True
) -> bool:
    """Whether the kernel runs a small attention call (and its backward) on this device and
    dtype. The probe runs in a thread of its own: autograd's saved-tensor hooks (gradient
    checkpointing's), fake-tensor modes (the planner's) and autocast are per thread, so it
    neither sees nor disturbs the caller's."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return False
    answer: list[bool] = []

    def probe() -> None:
        from torch.nn.attention import sdpa_kernel

        try:
            # Its own generator: drawing from the global one would shift every later draw, and
            # a resumed run (which probes at another moment) would not repeat the original.
            generator = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(
                    1, 2, 16, head_dim, generator=generator, device=device, dtype=dtype
                ).requires_grad_(backward)
                for _ in range(3)
            )
            with sdpa_kernel([sdpa_backend(name)]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                if backward:
                    out.sum().backward()
            answer.append(True)
        except RuntimeError:
            answer.append(False)

    thread = threading.Thread(target=probe, name=f"sdpa-probe-{name}")
    thread.start()
    thread.join()
    return bool(answer and answer[0])


def available_kernels(device: str, dtype: torch.dtype, head_dim: int = 64) -> list[str]:
    return [name for name in KERNEL_NAMES if kernel_runs(name, device, dtype, head_dim)]


def choose_kernel(backend: str, device: str, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel ``backend`` means for attention on this device and dtype."""
    order = AUTO_ORDER if backend == "auto" else (backend,)
    for name in order:
        if kernel_runs(name, device, dtype, head_dim):
            return name
    runs = ", ".join(available_kernels(device, dtype, head_dim)) or "none"
    raise UserError(
        f"plugins.sdpa.backend = '{backend}': that attention kernel does not run on "
        f"{device} with {str(dtype).removeprefix('torch.')} (head size {head_dim}); "
        f"kernels that do: {runs}.",
        hint="Set plugins.sdpa.backend = 'auto' to take the best that runs.",
    )


def _processor_base() -> type:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0


class KernelChoice:
    """The chosen kernel per (device, dtype, fake) the attention sees, decided on first sight.

    Under the planner's fake CPU tensors, which stand in for CUDA ones, the CPU's flash kernel
    stands in for every fused CUDA kernel (flash, memory-efficient, cuDNN: all keep O(tokens)
    memory), and ``math`` stays math (the O(tokens^2) attention matrix)."""

    def __init__(self, backend: str, announce: Any = None) -> None:
        self.backend = backend
        self.announce = announce or (lambda text: None)
        self.chosen: dict[tuple[str, torch.dtype, bool], list[Any]] = {}
        self.names: dict[tuple[str, torch.dtype, bool], str] = {}

    def backends_for(self, query: torch.Tensor, head_dim: int) -> list[Any]:
        key = (str(query.device), query.dtype, _is_fake(query))
        found = self.chosen.get(key)
        if found is None:
            found = self._decide(key, head_dim)
        return found

    @torch.compiler.disable
    def _decide(self, key: tuple[str, torch.dtype, bool], head_dim: int) -> list[Any]:
        device, dtype, fake = key
        if fake:
            name = "math" if self.backend == "math" else "flash"
        else:
            name = choose_kernel(self.backend, device, dtype, head_dim)
            how = "auto: the best that runs" if self.backend == "auto" else "as configured"
            self.announce(
                f"Attention: the {name} kernel on {device} "
                f"{str(dtype).removeprefix('torch.')} ({how})."
            )
        self.chosen[key], self.names[key] = [sdpa_backend(name)], name
        return self.chosen[key]


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def make_kernel_processor(choice: KernelChoice) -> Any:
    """diffusers' SDPA processor with its attention call inside ``sdpa_kernel``."""
    from torch.nn.attention import sdpa_kernel

    base = _processor_base()

    class KernelAttnProcessor(base):  # type: ignore[misc, valid-type]
        def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            backends = choice.backends_for(hidden_states, attn.inner_dim // attn.heads)
            with sdpa_kernel(backends):
                return super().__call__(attn, hidden_states, *args, **kwargs)

    processor = KernelAttnProcessor()
    processor.choice = choice
    return processor


def _announce(text: str) -> None:
    from naruto_lora.util.console import console

    with contextlib.suppress(Exception):
        console.print(f"[dim]{text}[/]")


class SDPA(Plugin):
    name = "sdpa"
    Config = SDPAConfig
    description = (
        "Chooses the attention kernel (flash, memory-efficient, cuDNN, math; auto), or xformers."
    )

    @hookimpl
    def nlora_prepare_unet(self, unet, profile, training: bool) -> None:
        backend = self.config.backend
        if backend == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise UserError(
                    "plugins.sdpa.backend = 'xformers' but xformers is not installed.",
                    hint="pip install xformers, or set plugins.sdpa.backend = 'auto'.",
                )
            unet.enable_xformers_memory_efficient_attention()
            return
        if backend == "sdpa":
            unet.set_attn_processor(_processor_base()())
            return
        unet.set_attn_processor(make_kernel_processor(KernelChoice(backend, _announce)))

    @hookimpl
    def nlora_doctor_checks(self, facts, profile):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32,)
        found, status = [], "ok"
        for dtype in dtypes:
            runs = available_kernels(device, dtype)
            auto = next((k for k in AUTO_ORDER if k in runs), "none")
            status = status if runs else "warn"
            found.append(
                f"{device} {str(dtype).removeprefix('torch.')}: {', '.join(runs) or 'none'} "
                f"(auto picks {auto})"
            )
        return [
            {
                "check": "attention (sdpa plugin)",
                "status": status,
                "detail": f"sdpa backend {self.config.backend}; torch {torch.__version__} "
                f"kernels that run: {'; '.join(found)}",
            }
        ]


PLUGIN = SDPA
