"""The VRAM planner: a PREDICTION of the GPU memory a profile's training and ``nlora sample`` need,
made on this machine without a GPU and without downloading weights.

``plan_profile`` runs the profile's real training step on fake tensors (see ``plan_sim``) for the
full-size model built from its configs, and reports the peak split into UNet weights, LoRA
weights/gradients/optimizer state, plugin state (EMA), text encoders, VAE and activations, plus
a stated allowance for what torch's allocator does not see. ``estimate_peak_vram_gib`` is the
one number ``nlora doctor`` needs.

What the numbers mean:

* *tracked peak*: the bytes of live tensors at the worst moment, as
  ``torch.cuda.max_memory_allocated`` counts them (blocks rounded to 512 bytes);
* *allowance*: ``CUDA_CONTEXT_GIB`` for the CUDA context (cuBLAS/cuDNN handles, kernels: not
  allocated through torch) plus ``ALLOCATOR_OVERHEAD`` of the tracked peak for the caching
  allocator's reserve (fragmentation, 2 MiB segments) and kernel workspaces. These two are
  stated assumptions, to be calibrated against GPU measurements (``benchmarks/RESULTS.md``);
* *need*: tracked peak + allowance: what the card must have free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from naruto_lora.config.profile import Profile
from naruto_lora.plan.core import PLUGIN_PREFIX, PhasePeak, SimTarget
from naruto_lora.plan.memtrack import GIB
from naruto_lora.plan.models import ModelConfigs, load_model_configs
from naruto_lora.plugins.manager import optimizer_name

PLANNER_VERSION = 3  # 2: one steady-state traced step; 3: quantized base weights
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_OVERHEAD = 0.10
# A card sold as N GB reports N minus 0.2-0.35 GiB to torch (8 GB: 7.79, 12 GB: 11.76, 24 GB:
# 23.65); --vram/--fit take the sold size.
CARD_RESERVED_GIB = 0.3
TIGHT_HEADROOM = 0.05  # under 5% of the card left: "fits, only just"

CATEGORY_NAMES = {
    "weights": "UNet weights",
    "lora": "LoRA weights",
    "lora_grads": "LoRA gradients",
    "optimizer": "optimizer state",
    "text_encoders": "text encoders",
    "vae": "VAE",
    "activations": "activations and temporaries",
}
CATEGORY_ORDER = ("weights", "lora", "lora_grads", "optimizer", "text_encoders", "vae")


def category_name(label: str) -> str:
    if label.startswith(PLUGIN_PREFIX):
        return f"{label[len(PLUGIN_PREFIX) :]} plugin state"
    return CATEGORY_NAMES.get(label, label)


def ordered_labels(labels: set[str]) -> list[str]:
    plugins = sorted(label for label in labels if label.startswith(PLUGIN_PREFIX))
    known = [label for label in CATEGORY_ORDER if label in labels]
    rest = sorted(labels - set(known) - set(plugins) - {"activations"})
    return known + plugins + rest + (["activations"] if "activations" in labels else [])


def allowance_bytes(peak_bytes: int) -> int:
    return int(CUDA_CONTEXT_GIB * GIB + ALLOCATOR_OVERHEAD * peak_bytes)


def need_gib(phase: PhasePeak) -> float:
    return (phase.peak_bytes + allowance_bytes(phase.peak_bytes)) / GIB


def usable_gib(card_gb: float) -> float:
    """What torch will report for a card sold as ``card_gb`` GB."""
    return card_gb - CARD_RESERVED_GIB


@dataclass
class Plan:
    """A prediction for one profile (see the module docstring for what each number means)."""

    profile: str
    model_source: str
    settings: dict[str, Any]
    training: PhasePeak
    validation: PhasePeak | None
    sampling: list[PhasePeak]
    flops_per_micro_step: float
    lora_parameters: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def run_peak(self) -> PhasePeak:
        """The worse of a training step and a validation sample (both happen in a run)."""
        phases = [p for p in (self.training, self.validation) if p is not None]
        return max(phases, key=lambda p: p.peak_bytes)

    @property
    def need_gib(self) -> float:
        return need_gib(self.run_peak)

    @property
    def flops_per_update(self) -> float:
        return self.flops_per_micro_step * self.settings["gradient_accumulation_steps"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prediction"] = True
        out["run_peak_phase"] = self.run_peak.name
        out["tracked_peak_gib"] = round(self.run_peak.peak_bytes / GIB, 3)
        out["allowance_gib"] = round(allowance_bytes(self.run_peak.peak_bytes) / GIB, 3)
        out["need_gib"] = round(self.need_gib, 3)
        out["allowance"] = {
            "cuda_context_gib": CUDA_CONTEXT_GIB,
            "allocator_overhead_fraction": ALLOCATOR_OVERHEAD,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["training"] = PhasePeak(**data["training"])
        values["validation"] = PhasePeak(**data["validation"]) if data["validation"] else None
        values["sampling"] = [PhasePeak(**p) for p in data["sampling"]]
        return cls(**values)


def profile_settings(profile: Profile) -> dict[str, Any]:
    """The settings that decide memory, for the report."""
    train = profile.train
    settings = {
        "resolution": profile.data.resolution,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "rank": profile.lora.rank,
        "use_dora": profile.lora.use_dora,
        "target_modules": list(profile.lora.target_modules),
        "mixed_precision": train.mixed_precision,
        "optimizer": optimizer_name(profile),
        "cache_latents": profile.cache.latents,
        "cache_text": profile.cache.text,
        "validation_every_steps": profile.validation.every_steps,
        "plugins": profile.enabled_plugins(),
    }
    for name in profile.enabled_plugins():
        device = getattr(profile.plugins[name].config, "device", None)
        if device is not None:
            settings[f"{name}_device"] = device
    return settings


# ------------------------------------------------------------------------------ planning


def _sampling_worker(name: str, raw: dict[str, Any], configs: ModelConfigs) -> list[PhasePeak]:
    """``nlora sample`` with and without ``--low-vram`` (run in a second process)."""
    from naruto_lora.plan.pipeline import simulate_sampling
    from naruto_lora.plugins.manager import validate_profile

    profile = validate_profile(name, raw)
    return [simulate_sampling(profile, configs, low_vram=low) for low in (False, True)]


def _start_sampling(profile: Profile, configs: ModelConfigs, parallel: bool) -> Callable[[], list]:
    """Start the sampling simulation beside the training one (a second process: it needs no
    more than a second CPU core), or defer it; return how to get its result."""
    raw = profile.to_dict()
    raw.pop("name", None)
    if parallel:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            future = pool.submit(_sampling_worker, profile.name, raw, configs)
        except (OSError, RuntimeError):  # no process support here: run it afterwards
            parallel = False
        else:

            def result() -> list[PhasePeak]:
                try:
                    return future.result()
                finally:
                    pool.shutdown()

            return result
    return lambda: _sampling_worker(profile.name, raw, configs)


def plan_profile(
    profile: Profile,
    *,
    model: str | None = None,
    sampling: bool = True,
    parallel: bool = True,
    use_cache: bool = True,
    on_phase: Callable[[str], None] | None = None,
) -> Plan:
    """Predict the profile's peak memory (see the module docstring); ``model`` reads the configs
    of another model folder than the profile's ``model.pretrained``."""
    from naruto_lora.plan.sim import simulate_training

    configs = load_model_configs(profile.model, model)
    key = _cache_key(profile, configs, sampling)
    if use_cache:
        # A full plan (with sampling) answers a training-only question too.
        for candidate in {_cache_key(profile, configs, True), key}:
            cached = _read_cache(candidate)
            if cached is not None:
                return cached
    started = time.perf_counter()
    sample_result = _start_sampling(profile, configs, parallel) if sampling else None
    sim = simulate_training(profile, configs, target=SimTarget(), on_phase=on_phase)
    if sample_result is not None and on_phase is not None:
        on_phase("nlora sample")
    plan = Plan(
        profile=profile.name,
        model_source=configs.source,
        settings=profile_settings(profile),
        training=sim.training,
        validation=sim.validation,
        sampling=sample_result() if sample_result is not None else [],
        flops_per_micro_step=sim.flops_per_micro_step,
        lora_parameters=sim.lora_parameters,
        elapsed_s=time.perf_counter() - started,
        notes=list(configs.notes),
    )
    _write_cache(key, plan)
    return plan


def estimate_peak_vram_gib(profile: Profile) -> float:
    """PREDICTED GPU memory (GiB) a training run of ``profile`` needs: the worse of a training
    step and a validation sample, plus the CUDA context and allocator allowance. For
    ``nlora doctor``; cached, so only the first call for a profile takes its ~30-60 s."""
    return plan_profile(profile, sampling=False).need_gib


# ------------------------------------------------------------------------------ cache


def _cache_key(profile: Profile, configs: ModelConfigs, sampling: bool) -> str:
    """Everything the prediction depends on: the planner, the libraries, the model configs and
    the profile (its name, description and paths aside)."""
    import diffusers
    import peft
    import torch
    import transformers

    raw = profile.to_dict()
    for key in ("name", "description"):
        raw.pop(key, None)
    raw["train"].pop("output_dir", None)
    raw["cache"].pop("dir", None)
    material = {
        "planner": PLANNER_VERSION,
        "versions": [
            torch.__version__,
            diffusers.__version__,
            transformers.__version__,
            peft.__version__,
        ],
        "configs": dataclasses.asdict(configs),
        "profile": raw,
        "sampling": sampling,
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_file(key: str) -> Path:
    from naruto_lora.util.home import nlora_home

    return nlora_home() / "plans" / f"{key}.json"


def _read_cache(key: str) -> Plan | None:
    path = _cache_file(key)
    try:
        return Plan.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or from another planner version: plan afresh


def _write_cache(key: str, plan: Plan) -> None:
    import contextlib

    from naruto_lora.util.io import atomic_write_text

    # A read-only cache folder only costs the next run its time.
    with contextlib.suppress(OSError):
        atomic_write_text(_cache_file(key), json.dumps(dataclasses.asdict(plan)))


# ------------------------------------------------------------------------------ cards


def detected_vram_gib() -> tuple[str, float] | None:
    """(name, GiB torch reports) of this machine's largest CUDA GPU, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = max(
        (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())),
        key=lambda p: p.total_memory,
    )
    return props.name, props.total_memory / GIB


def verdict(need: float, capacity_gib: float) -> tuple[str, str]:
    """("fits" | "tight" | "does not fit", a sentence) for a need against a card's capacity."""
    headroom = capacity_gib - need
    if headroom < 0:
        return "does not fit", f"needs {need:.1f} GiB, {-headroom:.1f} GiB more than the card has"
    if headroom < TIGHT_HEADROOM * capacity_gib:
        return "tight", f"fits with only {headroom:.2f} GiB to spare: expect out-of-memory risk"
    return "fits", f"fits with {headroom:.1f} GiB ({headroom / capacity_gib:.0%}) to spare"
