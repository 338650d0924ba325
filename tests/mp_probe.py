"""A plugin the multi-process tests install (through a real ``nlora`` entry point) into launched
training processes: it makes one process's loss NaN once, sends one process a signal, and has
every process write down its LoRA parameters and which latents it trained on, so a test can
compare the processes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naruto_lora.plugins.hookspecs import hookimpl


@dataclass(frozen=True)
class ProbeConfig:
    dump_dir: str = ""  # each process writes rank-R.safetensors / rank-R.json here
    nan_rank: int = -1  # this process's loss is NaN at its nan_call-th micro-batch (1-based)
    nan_call: int = 0
    signal_rank: int = -1  # this process alone gets SIGTERM right after step signal_step
    signal_step: int = 0


class Probe:
    name = "mp_probe"
    Config = ProbeConfig
    # It only records what training does (where to dump, when to signal): changing it on resume
    # does not change the run, so the resume-settings check lets it differ.
    changes_training = False

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.calls = 0
        self.seen: list[list[str]] = []  # per micro-batch: a digest of each item's latents

    @hookimpl(tryfirst=True)
    def nlora_sample_noise(self, state: Any, latents: torch.Tensor, generator: Any) -> None:
        digests = [hashlib.sha1(x.float().cpu().numpy().tobytes()).hexdigest() for x in latents]
        self.seen.append(digests)
        return None  # the noise itself is left to the other implementations

    @hookimpl
    def nlora_loss_weights(self, state: Any, timesteps: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        if _rank(state) == self.config.nan_rank and self.calls == self.config.nan_call:
            return torch.full((len(timesteps),), math.nan, device=timesteps.device)
        return None

    @hookimpl
    def nlora_after_optimizer_step(self, state: Any) -> None:
        self._dump(state)
        if _rank(state) == self.config.signal_rank and state.global_step == self.config.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)

    @hookimpl
    def nlora_train_end(self, state: Any) -> None:
        self._dump(state)

    def _dump(self, state: Any) -> None:
        """This process's trainable parameters as they are now, and who it is."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        if not self.config.dump_dir:
            return
        folder = Path(self.config.dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rank = _rank(state)
        params = {
            name: p.detach().cpu().contiguous()
            for name, p in state.unet.named_parameters()
            if p.requires_grad
        }
        save_file(params, str(folder / f"rank-{rank}.safetensors"))
        facts = {
            "rank": rank,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "step": state.global_step,
            "pid": os.getpid(),
            "seen": self.seen,
        }
        (folder / f"rank-{rank}.json").write_text(json.dumps(facts))


def _rank(state: Any) -> int:
    return state.accelerator.process_index
