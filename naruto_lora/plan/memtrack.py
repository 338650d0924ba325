"""Counting the bytes of live tensor storages, by label, and their peak; emulating CUDA autocast.

The planner runs real training code on fake tensors (``FakeTensorMode``: shapes and dtypes, no
data), so no GPU's allocator can be asked. ``AllocationTracker`` is a ``TorchDispatchMode`` that
sees every tensor an operator returns, notes each new storage once (rounded as the CUDA caching
allocator rounds it) and learns of its release through a weak reference, so at every moment it
knows the bytes alive and keeps the peak with its split by label. It does what
``torch.distributed._tools.mem_tracker.MemTracker`` does for the total, without its per-module
and per-parameter hooks: those fail on frozen parameters and took over 15 minutes on the SDXL UNet,
while this takes seconds. The same tracker also runs on real tensors (the tests compare the
prediction on fake tensors with a real run of the tiny model).

Fake CUDA tensors cannot go through autograd in a CPU-only build of torch, so the planner's
tensors are fake *CPU* tensors. CPU autocast casts differently from CUDA autocast (CUDA runs
group_norm, layer_norm, upsampling, softmax ... in fp32, CPU keeps them in the low precision), and
that changes activation memory a lot; ``cuda_autocast_policy`` registers, for as long as it is
active, AutocastCPU kernels that apply CUDA's fp32 policy to those operators.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from naruto_lora.models.quantize import is_wrapper, wrapped_tensors

# The CUDA caching allocator hands out blocks in multiples of 512 bytes.
CUDA_BLOCK_BYTES = 512
GIB = 1024**3
# Storages under a label with this prefix are tracked but live in host memory, not the device's
# (e.g. EMA weights kept on the CPU): they do not count toward the total.
HOST_PREFIX = "host:"


def _rounded(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block if block > 1 else nbytes


@dataclass
class Peak:
    """The largest total seen, and how it was split by label at that moment."""

    total_bytes: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    where: str = ""


class AllocationTracker(TorchDispatchMode):
    """Live storage bytes by label, and the peak (see the module docstring).

    New storages get the current ``label`` (``with tracker.labelled("weights"): ...``);
    ``relabel`` moves storages that turn out to be something else (gradients, optimizer state).
    ``phase`` names the part of the step, recorded with the peak.
    """

    def __init__(self, block_bytes: int = CUDA_BLOCK_BYTES) -> None:
        super().__init__()
        self.block_bytes = block_bytes
        self.label = "activations"
        self.phase = ""
        self.live: Counter[str] = Counter()
        self.total = 0
        self.peak = Peak()
        # storage -> [label, bytes]; a weak key so tracking never keeps memory alive.
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}

    # -- bookkeeping -------------------------------------------------------------------------

    def _add(self, label: str, nbytes: int) -> None:
        self.live[label] += nbytes
        if label.startswith(HOST_PREFIX):
            return
        self.total += nbytes
        if self.total > self.peak.total_bytes:
            self.peak = Peak(self.total, self.device_split(), self.phase)

    def _remove(self, label: str, nbytes: int) -> None:
        self.live[label] -= nbytes
        if not label.startswith(HOST_PREFIX):
            self.total -= nbytes

    def device_split(self) -> dict[str, int]:
        """Live bytes by label, device labels only."""
        return {k: v for k, v in self.live.items() if v and not k.startswith(HOST_PREFIX)}

    def _released(self, key: int, info: list) -> None:
        self._refs.pop(key, None)
        self._remove(info[0], info[1])

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage if it is new (or grew); a tensor subclass that wraps others
        (torchao's quantized weights) by the storages of the tensors inside."""
        if is_wrapper(tensor):
            for inner in wrapped_tensors(tensor):
                self.track(inner)
            return
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        nbytes = _rounded(storage.nbytes(), self.block_bytes)
        info = self._info.get(storage)
        if info is not None:
            if info[1] != nbytes:  # resized in place
                self._remove(info[0], info[1])
                info[1] = nbytes
                self._add(info[0], nbytes)
            return
        info = [self.label, nbytes]
        self._info[storage] = info
        key = id(info)
        self._refs[key] = weakref.ref(storage, lambda _r, k=key, i=info: self._released(k, i))
        self._add(self.label, nbytes)

    def track_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.track(tensor)

    def relabel(self, tensors: Iterable[torch.Tensor | None], label: str) -> None:
        """Move the storages of ``tensors`` (tracking them first if needed) to ``label``."""
        for tensor in tensors:
            if tensor is None:
                continue
            if is_wrapper(tensor):
                self.relabel(wrapped_tensors(tensor), label)
                continue
            self.track(tensor)
            info = self._info.get(tensor.untyped_storage())
            if info is not None and info[0] != label:
                self._remove(info[0], info[1])
                info[0] = label
                self._add(label, info[1])

    def reset_peak(self) -> None:
        self.peak = Peak(self.total, self.device_split(), self.phase)

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    # -- the dispatch hook -------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and metadata queries (most dispatched calls: .device alone is a third of them
        # on fake tensors) never allocate; skipping them keeps tracking cheap.
        if func.is_view or func.namespace == "prim":
            return out
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


# ------------------------------------------------------------------------------ CUDA autocast

# Operators CUDA autocast runs in fp32 (ATen's AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE
# lists) that CPU autocast leaves alone, restricted to those diffusion models and their losses
# call. (The low-precision lists agree for everything these models use: conv2d, linear, matmul,
# bmm, baddbmm, addmm, scaled_dot_product_attention.)
CUDA_FP32_OPS = (
    "group_norm",
    "layer_norm",
    "native_layer_norm",
    "upsample_nearest2d.vec",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d.vec",
    "upsample_bilinear2d.vec",
    "exp",
    "log",
    "rsqrt",
    "reciprocal",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "softplus",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "logsumexp",
    "cosine_similarity",
)
CUDA_FP32_SET_DTYPE_OPS = ("softmax.int", "log_softmax.int", "cumsum", "sum", "sum.dim_IntList")

_LOW = (torch.float16, torch.bfloat16)


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _redispatch(op):
    def kernel(*args, **kwargs):
        excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    return kernel


def _redispatch_set_dtype(op):
    """fp32_set_opt_dtype: low-precision inputs get ``dtype=float32`` unless one was given."""

    def kernel(*args, **kwargs):
        excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            first = args[0] if args else None
            if (
                isinstance(first, torch.Tensor)
                and first.dtype in _LOW
                and kwargs.get("dtype") is None
                and "dtype" in {a.name for a in op._schema.arguments}
            ):
                kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While active, CPU autocast casts like CUDA autocast does (see the module docstring)."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in CUDA_FP32_OPS:
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, _redispatch(op), "AutocastCPU")
            for name in CUDA_FP32_SET_DTYPE_OPS:
                base, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, base), overload or "default")
                lib.impl(name, _redispatch_set_dtype(op), "AutocastCPU")
        yield
    finally:
        lib._destroy()
