"""Training speed: steady-state seconds per optimizer step and images per second, split into data
wait, forward, backward and optimizer, with peak memory and achieved TFLOP/s; our loop against a
plain reference loop written here (VAE and both text encoders every step, no caches).

    python benchmarks/bench_train.py                      # tiny model on CPU (+ SDXL on a GPU)
    python benchmarks/bench_train.py --config sdxl        # full-size SDXL, random weights
    python benchmarks/bench_train.py --config sdxl --profile 12gb --variant channels_last
    python benchmarks/bench_train.py --json

Configs:
  tiny  the built-in tiny SDXL-architecture model with the ``tiny`` profile (CPU).
  sdxl  the published SDXL architecture with random weights (a model folder built once, ~7 GB)
        with the given GPU profiles at their resolutions; on a CPU only at --cpu-resolution with
        --cpu-steps steps (slow: minutes per step).

"Our loop" runs the training loop's own pieces (``setup_run``, ``micro_batches``,
``compute_loss``, ``accelerator.backward``, ``optimizer_update``, the after-step hooks) with a
clock around each; validation samples and checkpoints are off. Memory on a GPU is CUDA's max
allocated, shown beside the planner's prediction for the same configuration.

Speed variants (``--variant``, repeatable; each also a profile key the loop reads once it
supports them, see docs/plan-and-benchmarks.md): compile, channels_last, tf32, no_fused, bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, PeakMemory, device_peak_tflops, machine, random_sdxl_folder  # noqa: E402

VARIANTS = ("compile", "channels_last", "tf32", "no_fused", "bf16")
PHASES = ("data_wait_s", "forward_s", "backward_s", "optimizer_s")


@dataclass
class Timings:
    """Per optimizer update: the phases' seconds, summed over its micro-batches."""

    updates: list[dict[str, float]] = field(default_factory=list)

    def new_update(self) -> dict[str, float]:
        self.updates.append(dict.fromkeys(PHASES, 0.0))
        return self.updates[-1]

    def steady(self, warmup: int) -> list[dict[str, float]]:
        return self.updates[warmup:] or self.updates[-1:]

    def summary(self, warmup: int, images_per_update: int) -> dict[str, float]:
        rows = self.steady(warmup)
        out = {phase: statistics.median(r[phase] for r in rows) for phase in PHASES}
        out["step_s"] = statistics.median(sum(r[p] for p in PHASES) for r in rows)
        out["images_per_s"] = images_per_update / out["step_s"]
        out["updates_timed"] = len(rows)
        return out
