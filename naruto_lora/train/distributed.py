"""What the processes of a multi-process run (``accelerate launch``, ``torchrun``) must agree on.

DDP all-reduces the gradients inside ``backward``: every process must call it at the same
micro-batch, or the others wait forever. So every decision that skips or ends work (a non-finite
loss on one process, a signal that reached one process first) is made together, from values
all-reduced across the processes. With one process every helper here is a plain local answer:
no collective, nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch

from naruto_lora.util.console import console
from naruto_lora.util.errors import UserError


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by torchrun and by
    ``accelerate launch``); 1 when run directly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_device_for_processes(device: torch.device, processes: int) -> None:
    """With several processes each takes its own GPU (``cuda:LOCAL_RANK``); a fixed index would
    put them all on one."""
    if processes > 1 and device.type == "cuda" and device.index is not None:
        raise UserError(
            f"--device {device} pins every one of the {processes} processes to the same GPU.",
            hint="Use --device auto (or cuda): each process takes the GPU of its local rank. "
            "Choose the GPUs with CUDA_VISIBLE_DEVICES or accelerate's --gpu_ids.",
        )


def process_seed(seed: int, rank: int) -> int:
    """The seed of one process's random streams (noise, timesteps, dropout): different on every
    process, so they do not draw the same noise for different images, and reproducible."""
    return seed + rank


def quiet_unless_main(accelerator: Any) -> None:
    """Only the main process reports progress on stdout; the others would repeat every line.
    Warnings and errors (stderr) stay on everywhere."""
    if not accelerator.is_main_process:
        console.quiet = True


def _all_reduce(accelerator: Any, values: list[float], op: str) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def agree_on_update(
    accelerator: Any, mean_loss: float, finite: bool, items: list[str]
) -> tuple[float, bool, list[str]]:
    """(mean loss over all processes, whether every process's loss was finite, the items of the
    processes whose loss was not) for the update about to happen. Called by every process at
    the last micro-batch of an update, before ``backward``."""
    processes = accelerator.num_processes
    if processes == 1:
        return mean_loss, finite, items
    loss_sum, bad = _all_reduce(
        accelerator, [mean_loss if finite else 0.0, 0.0 if finite else 1.0], "sum"
    )
    if bad == 0:
        return loss_sum / processes, True, items
    # Every process takes this branch together (``bad`` is the same everywhere), so gathering
    # here is safe; only the items that went wrong are worth printing.
    gathered = gather_objects(accelerator, [] if finite else items)
    return float("nan"), False, [item for part in gathered for item in part]


def agree_on_stop(accelerator: Any, signal_name: str | None) -> str | None:
    """The signal that asked any process to stop (None: none did). A signal reaches each process
    at its own moment; stopping only where it arrived would leave the others waiting in the next
    step's all-reduce."""
    if accelerator.num_processes == 1:
        return signal_name
    number = float(signal.Signals[signal_name].value) if signal_name else 0.0
    (largest,) = _all_reduce(accelerator, [number], "max")
    return signal.Signals(int(largest)).name if largest else None


def gather_objects(accelerator: Any, value: Any) -> list[Any]:
    """``value`` of every process, by rank (picklable values: RNG states, item lists)."""
    if accelerator.num_processes == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def local_main_first(accelerator: Any) -> Iterator[None]:
    """The main process of each machine runs the block first, the others after it: for quick
    one-time writes to a shared place (the built-in tiny model and data set). Not for long
    work: the others wait in a barrier, which times out (NCCL: 10 minutes). Long builds (the
    caches) use a file lock instead."""
    if accelerator.num_processes == 1:
        yield
        return
    with accelerator.local_main_process_first():
        yield
