"""Faults a run survives or explains: Ctrl-C / SIGTERM, non-finite losses, CUDA out-of-memory."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from naruto_lora.util.console import err_console
from naruto_lora.util.errors import UserError


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop finishes the optimizer step it is in, writes a checkpoint
    and returns. A second signal stops at once (the default action)."""

    def __init__(self, announce: bool = True) -> None:
        self.signal_name: str | None = None
        self.announce = announce  # False on all but the main process of a multi-process run
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def request(self, signal_name: str) -> None:
        self.signal_name = signal_name

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.restore()
            raise KeyboardInterrupt(f"second {name}")
        self.request(name)
        if self.announce:
            err_console.print(
                f"[yellow]{name} received: finishing this step and writing a checkpoint "
                "(send it again to stop at once).[/]"
            )

    def install(self) -> None:
        # Signal handlers can only be set from the main thread (not, e.g., from a worker thread
        # that embeds the trainer); there the caller keeps its own handling.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@contextlib.contextmanager
def stop_on_signals(announce: bool = True) -> Iterator[StopRequest]:
    stop = StopRequest(announce)
    stop.install()
    try:
        yield stop
    finally:
        stop.restore()


NONFINITE_ADVICE = (
    "Common causes and fixes: a VAE that overflows in fp16 (use the fp16-fix VAE, "
    "model.vae = 'madebyollin/sdxl-vae-fp16-fix', and rebuild the latent cache); fp16 range "
    "(train.mixed_precision = 'bf16' on GPUs that support it); a learning rate too high "
    "(train.learning_rate = {lr:g} now; try a tenth of it)."
)


class NonFiniteGuard:
    """Counts optimizer updates skipped for a non-finite loss or gradient; too many in a row stop
    the run with advice instead of training on garbage. Every process of a multi-process run
    counts (the decisions are agreed); only the one with ``announce`` prints."""

    def __init__(self, max_in_row: int, learning_rate: float, announce: bool = True) -> None:
        self.max_in_row = max_in_row
        self.learning_rate = learning_rate
        self.announce = announce
        self.in_row = 0
        self.total = 0

    def skipped(self, step: int, what: str, items: list[str]) -> None:
        self.in_row += 1
        self.total += 1
        shown = "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")
        if self.announce:
            err_console.print(
                f"[yellow]step {step}: {what} is not finite; update skipped "
                f"({self.in_row} in a row, {self.total} in all). Items: {shown}[/]",
                soft_wrap=True,
            )
        if self.in_row >= self.max_in_row:
            raise UserError(
                f"Training stopped: {what} was not finite for {self.in_row} optimizer updates in a "
                f"row (train.max_nonfinite_in_row = {self.max_in_row}). Last items: {shown}.",
                hint=NONFINITE_ADVICE.format(lr=self.learning_rate),
            )

    def ok(self) -> None:
        self.in_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, saved: dict[str, int]) -> None:
        self.in_row = int(saved["in_row"])
        self.total = int(saved["total"])


def memory_plugin_advice(profile: Any) -> list[str]:
    """``--enable NAME (what it saves)`` for each installed plugin that says it saves memory
    (``memory_advice`` on its class) and is off in this profile."""
    from naruto_lora.plugins.manager import discover_plugins

    enabled = set(profile.enabled_plugins())
    return [
        f"--enable {name} ({cls.memory_advice})"
        for name, cls in discover_plugins().items()
        if getattr(cls, "memory_advice", None) and name not in enabled
    ]


def oom_advice(profile: Any, peak_gib: float, total_gib: float | None) -> tuple[str, str]:
    """(message, hint): the peak, then what would fit: the next smaller profile and the options
    that cut memory most."""
    smaller = {"14gb": "12gb", "12gb": "8gb"}.get(profile.name)
    advice = []
    if smaller:
        advice.append(f"the '{smaller}' profile (--profile {smaller})")
    advice += memory_plugin_advice(profile)
    if profile.cache.text != "disk":
        advice.append("--set cache.text='disk' (text encoders leave the GPU)")
    if profile.data.resolution > 512:
        advice.append(f"a lower --set data.resolution (now {profile.data.resolution})")
    if profile.train.batch_size > 1:
        advice.append("--set train.batch_size=1 with a larger train.gradient_accumulation_steps")
    of_total = f" of {total_gib:.1f} GiB" if total_gib else ""
    return (
        f"CUDA ran out of memory (peak allocated {peak_gib:.2f} GiB{of_total}, "
        f"profile '{profile.name}', {profile.data.resolution} px, rank {profile.lora.rank}).",
        "Try: " + "; ".join(advice or ["closing other programs that use the GPU"]) + ".",
    )


@contextlib.contextmanager
def explain_out_of_memory(profile: Any) -> Iterator[None]:
    """Turn CUDA out-of-memory into a UserError with the peak memory and what would fit."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        device = torch.cuda.current_device()
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.empty_cache()
        message, hint = oom_advice(profile, peak, total)
        raise UserError(message, hint=hint) from exc


# A trained LoRA factor far beyond this has diverged: healthy ones stay around 1e-3..1e1
# (kaiming/zero init, small learning rates), and ComfyUI or A1111 would render noise or black.
EXPLODED_ABS = 1e4


def weight_problems(weights: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Tensors of ``{subfolder: state dict}`` that are non-finite or exploded, by name."""
    problems = []
    for subfolder, state_dict in weights.items():
        for name, tensor in state_dict.items():
            where = f"{subfolder}/{name}" if subfolder else name
            values = tensor.detach().float()
            if not bool(torch.isfinite(values).all()):
                problems.append(f"{where} (not finite)")
            elif values.numel() and float(values.abs().max()) > EXPLODED_ABS:
                problems.append(f"{where} (|w| up to {float(values.abs().max()):.1e})")
    return problems


def check_final_weights(weights: dict[str, dict[str, torch.Tensor]], learning_rate: float) -> None:
    problems = weight_problems(weights)
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 6 else ""
        )
        raise UserError(
            f"Training diverged: the LoRA weights are not usable ({shown}). No final weights "
            "were written.",
            hint=NONFINITE_ADVICE.format(lr=learning_rate),
        )


# A run may end this share of its planned steps short (the data ran out because some updates
# were skipped) and still count as done, with a warning; beyond it, it failed.
SHORT_RUN_SHARE = 0.05


def check_ran_to_the_end(
    steps: int, total_steps: int, guard: NonFiniteGuard, checkpoint: Any
) -> None:
    """A run that ran out of data well before its last step (updates were skipped) is no
    success. (fp16's grad scaler skips a few steps early on; a shortfall within
    ``SHORT_RUN_SHARE`` is only a warning.)"""
    missing = total_steps - steps
    if missing <= 0:
        return
    if missing <= max(1, SHORT_RUN_SHARE * total_steps):
        if guard.announce:
            err_console.print(
                f"[yellow]warning: the data ran out {missing} step(s) before train.max_steps "
                f"({steps} of {total_steps}): {guard.total} update(s) were skipped.[/]"
            )
        return
    kept = f" The last checkpoint is '{checkpoint}'." if checkpoint else ""
    raise UserError(
        f"Training ended after {steps} of {total_steps} steps: the data ran out (train.epochs) "
        f"because updates were skipped ({guard.total} for non-finite losses or gradients). No "
        f"final weights were written.{kept}",
        hint=NONFINITE_ADVICE.format(lr=guard.learning_rate),
    )
