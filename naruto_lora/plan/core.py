"""The planner's machinery shared by its simulations: what a phase's peak is, what the simulated
step stands for, and the modes it runs under (fake tensors, CUDA's autocast policy, the
allocation tracker, FLOP counting).

The fake tensors are CPU tensors standing in for CUDA ones (fake CUDA tensors cannot run
autograd in a CPU build of torch): autocast gets CUDA's cast policy
(``memtrack.cuda_autocast_policy``) and the optimizer is built as for a CUDA device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from naruto_lora.config.profile import Profile
from naruto_lora.plan.memtrack import HOST_PREFIX, AllocationTracker, cuda_autocast_policy

SIM_DEVICE = torch.device("cpu")  # fake CPU tensors stand in for the GPU's
WEIGHTS, LORA, GRADS, OPTIMIZER = "weights", "lora", "lora_grads", "optimizer"
TEXT_ENCODERS, VAE, ACTIVATIONS = "text_encoders", "vae", "activations"
PLUGIN_PREFIX = "plugin:"


@dataclass
class PhasePeak:
    """The peak bytes of one phase (what ``torch.cuda.max_memory_allocated`` would report for
    it) and how they split by category at that moment."""

    name: str
    peak_bytes: int
    split: dict[str, int]
    where: str = ""
    host: dict[str, int] = field(default_factory=dict)  # kept in host memory (not counted)

    @classmethod
    def of(cls, name: str, tracker: AllocationTracker) -> PhasePeak:
        peak = tracker.peak
        host = {
            k[len(HOST_PREFIX) :]: v
            for k, v in tracker.live.items()
            if k.startswith(HOST_PREFIX) and v
        }
        return cls(name, peak.total_bytes, dict(peak.by_label), peak.where, host)


@dataclass(frozen=True)
class SimTarget:
    """What the simulated step stands for: a CUDA GPU (``cuda``) or this CPU (``cpu``)."""

    device_type: str = "cuda"
    fake: bool = True

    @property
    def emulate_cuda(self) -> bool:
        return self.device_type == "cuda"


def weight_dtype_for(profile: Profile, target: SimTarget) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the frozen weights, autocast dtype or None) as the training setup chooses them."""
    from naruto_lora.train.setup import precision_for

    mode, dtype = precision_for(profile, torch.device(target.device_type))
    return dtype, (None if mode == "no" else dtype)


@contextlib.contextmanager
def tracking(target: SimTarget) -> Iterator[AllocationTracker]:
    """Fake mode (when simulating), the CUDA cast policy (for a CUDA target) and the tracker."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = AllocationTracker()
    with contextlib.ExitStack() as stack:
        if target.emulate_cuda:
            # Active for the whole run, not just the forward: checkpointed blocks recompute their
            # forward inside backward and must cast the same way.
            stack.enter_context(cuda_autocast_policy())
        if target.fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(tracker)
        yield tracker


def autocast_for(target: SimTarget, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(SIM_DEVICE.type, dtype=dtype)


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs with ``torch.utils.flop_counter``'s formulas (matmuls, convolutions,
    attention; 2 per multiply-add), plus the CPU flash-attention kernels the fake CPU tensors
    dispatch to. Unlike ``FlopCounterMode`` it installs no module hooks: those keep
    checkpointed blocks' activations alive and would change the memory being measured."""

    def __init__(self) -> None:
        # The module's sdpa formulas are registered (and so already shape-wrapped) for the
        # CUDA kernels; the CPU kernels take the same leading arguments.
        from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

        super().__init__()
        aten = torch.ops.aten
        self.registry = {
            **flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
        }
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out
