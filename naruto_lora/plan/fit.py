"""``nlora plan --fit GB``: the fastest configuration of a profile predicted to fit a card.

The search varies the profile's memory options: resolution, LoRA rank, gradient checkpointing,
the frozen base's storage (``model.base_weights``: full or int8), where text embeddings come
from, where plugin state lives (a plugin whose config has a ``device`` that can be ``"cpu"``,
e.g. EMA), the 8-bit optimizer, validation samples (and
decoding them in tiles, the ``vae_tiling`` plugin), and the split of the effective batch into
micro-batch x accumulation (the product is kept).

How it decides:

1. Simulate the profile as given, and with gradient checkpointing switched the other way (two
   planner runs; each is cached).
2. Predict every combination from those: weights and text encoders as measured; LoRA weights,
   gradients, optimizer and plugin state from the LoRA's parameter count (linear in the rank);
   activations linear in micro-batch size and in pixels.
3. Keep the combinations predicted to fit with the same margin ``nlora plan`` uses. Quality
   first: the highest resolution, then the highest rank, then keeping validation samples; among
   those the fastest by a FLOP-count time model; ties go to the fewest changes.
4. Confirm the winner with a full planner run of it; if it does not fit after all, scale the
   model's predictions by how far off it was and try the next that still fits.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from naruto_lora.config.profile import Profile, apply_override
from naruto_lora.plan.core import PLUGIN_PREFIX
from naruto_lora.plan.memtrack import GIB
from naruto_lora.plan.planner import TIGHT_HEADROOM, Plan, allowance_bytes, plan_profile, usable_gib
from naruto_lora.plugins.manager import validate_profile
from naruto_lora.util.errors import UserError

# The memory options --fit searches are plugins that claim a role (``memory_role`` on the class);
# the planner knows the roles, not the plugins' names.
CHECKPOINTING_ROLE = "activation_checkpointing"  # recomputes activations in backward
TILING_ROLE = "tiled_decode"  # the validation decode goes tile by tile (``config.tile_px``)
EIGHT_BIT_ROLE = "optimizer_8bit"  # an optimizer with 8-bit moments
MIN_RESOLUTION, RESOLUTION_STEP = 512, 128
MIN_RANK = 4
MAX_MICRO_BATCH = 8
CONFIRMATIONS = 3

# The time model (relative; only the ranking is used). Assumed, to be calibrated by benchmarks.
ASSUMED_FLOPS_PER_S = 30e12  # achieved on a mid-range card in fp16/bf16
PCIE_BYTES_PER_S = 12e9  # host <-> device copies of plugin state kept on the CPU
CPU_ELEMENTS_PER_S = 1e9  # the CPU's update of that state
# Per-image cost of a micro-batch of n relative to n = 1: bigger batches use the GPU better.
BATCH_EFFICIENCY = {1: 1.0, 2: 0.93}
LARGE_BATCH_EFFICIENCY = 0.9
OPTIMIZER_8BIT_COST = 1.01  # its (de)quantisation; a tie-breaker toward plain AdamW
QUANTIZED_BASE_COST = 1.05  # dequantizing each layer's weights as it runs (assumed)
EIGHT_BIT_BASE = "int8"  # the 8-bit base the search tries (int8 keeps more precision than fp8)


@dataclass(frozen=True)
class Candidate:
    resolution: int
    rank: int
    checkpointing: bool
    text: str
    plugin_devices: tuple[tuple[str, str], ...]
    optimizer: str
    batch_size: int
    accumulation: int
    validation: bool
    tiled_decode: bool = False
    base_weights: str = "full"

    def assignments(self, base: Profile) -> dict[str, Any]:
        """Profile keys -> values for this candidate (every searched key)."""
        alpha_per_rank = base.lora.alpha / base.lora.rank
        values: dict[str, Any] = {
            "data.resolution": self.resolution,
            "lora.rank": self.rank,
            "lora.alpha": float(self.rank * alpha_per_rank),
            "cache.text": self.text,
            "train.batch_size": self.batch_size,
            "train.gradient_accumulation_steps": self.accumulation,
            "model.base_weights": self.base_weights,
        }
        if role_plugin(CHECKPOINTING_ROLE) in base.plugins:
            values[f"plugins.{role_plugin(CHECKPOINTING_ROLE)}.enabled"] = self.checkpointing
        if role_plugin(EIGHT_BIT_ROLE) in base.plugins:
            values[f"plugins.{role_plugin(EIGHT_BIT_ROLE)}.enabled"] = (
                self.optimizer == role_plugin(EIGHT_BIT_ROLE)
            )
        for name, device in self.plugin_devices:
            values[f"plugins.{name}.device"] = device
        if not self.validation:
            values["validation.every_steps"] = 0
        elif self.tiled_decode:
            values[f"plugins.{role_plugin(TILING_ROLE)}.enabled"] = True
        return values


def profile_with(base: Profile, assignments: dict[str, Any]) -> Profile:
    """``base`` (fully resolved) with ``key.path = value`` assignments applied and validated."""
    raw = base.to_dict()
    raw.pop("name", None)
    for key, value in assignments.items():
        raw = apply_override(raw, key.split("."), value)
    return validate_profile(base.name, raw)


def changed_keys(base: Profile, profile: Profile) -> dict[str, Any]:
    """Dotted keys whose resolved value differs between two profiles."""
    old, new = _flatten(base.to_dict()), _flatten(profile.to_dict())
    return {k: v for k, v in new.items() if old.get(k) != v and k not in ("name", "description")}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------ the space


def device_plugins(profile: Profile) -> list[str]:
    """Enabled plugins whose state can live on the CPU (a ``device`` that accepts "cpu")."""
    names = []
    for name in profile.enabled_plugins():
        config = profile.plugins[name].config
        hints = typing.get_type_hints(type(config))
        if "device" in hints and "cpu" in typing.get_args(hints["device"]):
            names.append(name)
    return names


def batch_splits(profile: Profile) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs with the profile's effective batch."""
    effective = profile.train.batch_size * profile.train.gradient_accumulation_steps
    return [
        (b, effective // b)
        for b in range(1, min(effective, MAX_MICRO_BATCH) + 1)
        if effective % b == 0
    ]


def candidates(profile: Profile) -> Iterator[Candidate]:
    top = profile.data.resolution
    resolutions = [r for r in range(top, 0, -RESOLUTION_STEP) if r == top or r >= MIN_RESOLUTION]
    ranks = [profile.lora.rank]
    while ranks[-1] // 2 >= MIN_RANK:
        ranks.append(ranks[-1] // 2)
    checkpointing = (
        [True, False]
        if role_plugin(CHECKPOINTING_ROLE) in profile.plugins
        else [_checkpointing(profile)]
    )
    devices = [[(n, d) for d in ("same", "cpu")] for n in device_plugins(profile)]
    validation = [True, False] if profile.validation.every_steps > 0 else [False]
    tiled = _tiled(profile)
    tilings = [tiled] if tiled or role_plugin(TILING_ROLE) not in profile.plugins else [False, True]
    bases = [profile.model.base_weights]
    if bases[0] == "full" and _quantization_available():
        bases.append(EIGHT_BIT_BASE)
    for res, rank, ckpt, text, devs, opt, (batch, accum), val, tile, base in itertools.product(
        resolutions,
        ranks,
        checkpointing,
        ("memory", "disk"),
        itertools.product(*devices),
        optimizer_choices(profile),
        batch_splits(profile),
        validation,
        tilings,
        bases,
    ):
        if tile and not val:
            continue  # tiles only matter for validation samples
        yield Candidate(res, rank, ckpt, text, tuple(devs), opt, batch, accum, val, tile, base)


def _quantization_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


@functools.cache
def _roles() -> dict[str, str]:
    from naruto_lora.plugins.manager import discover_plugins

    return {
        cls.memory_role: name
        for name, cls in discover_plugins().items()
        if isinstance(getattr(cls, "memory_role", None), str)
    }


def role_plugin(role: str) -> str:
    """The installed plugin that claims a memory role ("" when none does)."""
    return _roles().get(role, "")


ADAMW_STATE_BYTES = 8.0  # the core AdamW: two fp32 moments per parameter


def _fixed_optimizer(profile: Profile) -> str:
    """An enabled optimizer plugin other than the 8-bit one (Prodigy, say): --fit keeps it."""
    from naruto_lora.plugins.manager import discover_plugins

    for name, cls in discover_plugins().items():
        if (
            getattr(cls, "optimizer_state_bytes", 0.0)
            and getattr(cls, "memory_role", "") != EIGHT_BIT_ROLE
            and _enabled(profile, name)
        ):
            return name
    return ""


def chosen_optimizer(profile: Profile) -> str:
    """The profile's optimizer: a plugin's name, or "adamw" for the core's default."""
    eight_bit = role_plugin(EIGHT_BIT_ROLE)
    return _fixed_optimizer(profile) or (eight_bit if _enabled(profile, eight_bit) else "adamw")


def optimizer_choices(profile: Profile) -> tuple[str, ...]:
    """The optimizers --fit may pick: AdamW or its 8-bit plugin; only the profile's own when
    it uses another optimizer plugin."""
    fixed = _fixed_optimizer(profile)
    if fixed:
        return (fixed,)
    eight_bit = role_plugin(EIGHT_BIT_ROLE)
    return ("adamw", eight_bit) if eight_bit in profile.plugins else ("adamw",)


@functools.cache
def optimizer_state_bytes(optimizer: str) -> float:
    """Optimizer state per LoRA parameter: the plugin's own figure, or the core AdamW's."""
    from naruto_lora.plugins.manager import discover_plugins

    cls = discover_plugins().get(optimizer)
    return float(getattr(cls, "optimizer_state_bytes", 0.0) or ADAMW_STATE_BYTES)


def _enabled(profile: Profile, plugin: str) -> bool:
    settings = profile.plugins.get(plugin)
    return bool(settings and settings.enabled)


def _tiled(profile: Profile) -> bool:
    return _enabled(profile, role_plugin(TILING_ROLE))


def _checkpointing(profile: Profile) -> bool:
    return _enabled(profile, role_plugin(CHECKPOINTING_ROLE))


# ------------------------------------------------------------------------------ the model


@dataclass
class MemoryModel:
    """What the candidates are predicted from (bytes, FLOPs), measured by two planner runs."""

    base: Profile
    weights: int
    text_encoders: int  # when resident (cache.text = "memory")
    vae: int  # resident when validation samples are drawn or latents are not cached
    lora_per_rank: float  # LoRA parameters per unit of rank
    plugin_bytes_per_param: dict[str, float]  # plugin state per LoRA parameter
    train_activations: dict[bool, int]  # by checkpointing, at the base resolution and batch
    validation_activations: int
    flops_per_image: dict[bool, float]
    text_flops_per_image: float
    # What an 8-bit base saves: (bytes per weight in the training dtype - 1) x the Linear and
    # Conv2d weights, for the UNet and the text encoders.
    unet_8bit_saving: int = 0
    text_8bit_saving: int = 0

    def weights_for(self, kind: str) -> float:
        return self.weights - self._saving(kind, self.unet_8bit_saving)

    def text_encoders_for(self, kind: str) -> float:
        return self.text_encoders - self._saving(kind, self.text_8bit_saving)

    def _saving(self, kind: str, saving: int) -> float:
        """Bytes to subtract from the measured size (at the base profile's kind) for ``kind``."""
        measured_8bit = self.base.model.base_weights != "full"
        return (kind != "full") * saving - measured_8bit * saving

    def lora_params(self, rank: int) -> float:
        return self.lora_per_rank * rank

    def lora_state(self, c: Candidate, training: bool) -> float:
        n = self.lora_params(c.rank)
        optimizer = optimizer_state_bytes(c.optimizer) * n
        plugins = sum(
            per_param * n
            for name, per_param in self.plugin_bytes_per_param.items()
            if dict(c.plugin_devices).get(name, "same") != "cpu"
        )
        return 4 * n + (4 * n if training else 0) + optimizer + plugins

    def peak_bytes(self, c: Candidate) -> float:
        scale = (c.resolution / self.base.data.resolution) ** 2
        resident = self.weights_for(c.base_weights) + (
            self.text_encoders_for(c.base_weights) if c.text == "memory" else 0
        )
        if c.validation or not self.base.cache.latents:
            resident += self.vae
        batch_scale = c.batch_size / self.base.train.batch_size
        train = (
            self.lora_state(c, True) + self.train_activations[c.checkpointing] * scale * batch_scale
        )
        peak = resident + train
        if c.validation:
            activations = self.validation_activations * scale
            if c.tiled_decode and not _tiled(self.base):
                # The decode's activations shrink to one tile's (the confirming planner run
                # checks: the denoising step may then be the larger part).
                tile_px = self.base.plugins[role_plugin(TILING_ROLE)].config.tile_px
                activations *= min(1.0, (tile_px / c.resolution) ** 2)
            sample = self.lora_state(c, False) + activations
            peak = max(peak, resident + sample)
        return peak

    def need_gib(self, c: Candidate) -> float:
        peak = int(self.peak_bytes(c))
        return (peak + allowance_bytes(peak)) / GIB

    def step_seconds(self, c: Candidate) -> float:
        """Predicted time per optimizer update (relative use only; see the constants)."""
        images = c.batch_size * c.accumulation
        scale = (c.resolution / self.base.data.resolution) ** 2
        efficiency = BATCH_EFFICIENCY.get(c.batch_size, LARGE_BATCH_EFFICIENCY)
        flops = images * self.flops_per_image[c.checkpointing] * scale * efficiency
        if c.text == "memory":
            flops += images * self.text_flops_per_image
        seconds = flops / ASSUMED_FLOPS_PER_S
        n = self.lora_params(c.rank)
        for name, device in c.plugin_devices:
            if device == "cpu" and name in self.plugin_bytes_per_param:
                seconds += 4 * n / PCIE_BYTES_PER_S + n / CPU_ELEMENTS_PER_S
        if c.base_weights != "full":
            seconds *= QUANTIZED_BASE_COST
        return seconds * (
            OPTIMIZER_8BIT_COST if c.optimizer == role_plugin(EIGHT_BIT_ROLE) else 1.0
        )


def current_candidate(profile: Profile) -> Candidate:
    devices = tuple((name, profile.plugins[name].config.device) for name in device_plugins(profile))
    return Candidate(
        profile.data.resolution,
        profile.lora.rank,
        _checkpointing(profile),
        profile.cache.text,
        devices,
        chosen_optimizer(profile),
        profile.train.batch_size,
        profile.train.gradient_accumulation_steps,
        profile.validation.every_steps > 0,
        profile.validation.every_steps > 0 and _tiled(profile),
        profile.model.base_weights,
    )


def _resident_bytes(plan: Plan, label: str, fallback: Callable[[], int]) -> int:
    return plan.training.split.get(label) or fallback()


def build_model(base: Profile, plans: dict[bool, Plan], configs: Any) -> MemoryModel:
    """The model from the planner runs with checkpointing on and off (keys of ``plans``)."""
    first = next(iter(plans.values()))
    n = first.lora_parameters
    plugin_bytes = {}
    for label, size in {**first.training.host, **first.training.split}.items():
        if label.startswith(PLUGIN_PREFIX):
            plugin_bytes[label[len(PLUGIN_PREFIX) :]] = size / n
    validation = first.validation.split.get("activations", 0) if first.validation else 0
    text_bytes, text_params = _text_encoder_size(base, configs)
    unet_saving, text_saving = _eight_bit_savings(base, configs)
    return MemoryModel(
        base=base,
        weights=first.training.split["weights"],
        text_encoders=_resident_bytes(first, "text_encoders", lambda: text_bytes),
        vae=_resident_bytes(first, "vae", lambda: _vae_bytes(base, configs)),
        lora_per_rank=n / base.lora.rank,
        plugin_bytes_per_param=plugin_bytes,
        train_activations={k: p.training.split.get("activations", 0) for k, p in plans.items()},
        validation_activations=validation,
        flops_per_image={
            k: p.flops_per_micro_step / base.train.batch_size for k, p in plans.items()
        },
        # A transformer forward: 2 FLOPs per parameter per token.
        text_flops_per_image=2.0 * text_params * 77,
        unet_8bit_saving=unet_saving,
        text_8bit_saving=text_saving,
    )


def _eight_bit_savings(profile: Profile, configs: Any) -> tuple[int, int]:
    """Bytes an 8-bit base saves on the UNet (Linear and Conv2d weights; the LoRA's conv targets
    stay as they are) and on the text encoders (their Linear weights)."""
    import torch

    from naruto_lora.lora.inject import targeted_convolutions
    from naruto_lora.plan.core import SimTarget, weight_dtype_for
    from naruto_lora.plan.models import meta_text_encoders, meta_unet

    dtype, _ = weight_dtype_for(profile, SimTarget())
    per_weight = torch.empty((), dtype=dtype).element_size() - 1
    unet = meta_unet(configs, dtype)
    kept = set(targeted_convolutions(unet, profile.lora.target_modules))
    unet_numel = sum(
        m.weight.numel()
        for n, m in unet.named_modules()
        if type(m) is torch.nn.Linear or (type(m) is torch.nn.Conv2d and n not in kept)
    )
    text_numel = sum(
        m.weight.numel()
        for e in meta_text_encoders(configs, dtype)
        for m in e.modules()
        if type(m) is torch.nn.Linear
    )
    return unet_numel * per_weight, text_numel * per_weight


def _text_encoder_size(profile: Profile, configs: Any) -> tuple[int, int]:
    from naruto_lora.plan.core import SimTarget, weight_dtype_for
    from naruto_lora.plan.models import meta_text_encoders

    dtype, _ = weight_dtype_for(profile, SimTarget())
    encoders = meta_text_encoders(configs, dtype)
    params = sum(p.numel() for e in encoders for p in e.parameters())
    size = sum(
        t.numel() * t.element_size() for e in encoders for t in [*e.parameters(), *e.buffers()]
    )
    return size, params


def _vae_bytes(profile: Profile, configs: Any) -> int:
    from naruto_lora.plan.core import SimTarget, weight_dtype_for
    from naruto_lora.plan.models import meta_vae

    dtype, _ = weight_dtype_for(profile, SimTarget())
    return sum(p.numel() * p.element_size() for p in meta_vae(configs, dtype).parameters())


# ------------------------------------------------------------------------------ the search


@dataclass
class FitResult:
    card_gb: float
    capacity_gib: float
    base: Profile
    profile: Profile  # the chosen configuration
    plan: Plan  # its confirming planner run
    predicted_need_gib: float  # what the model said before confirming
    relative_step_time: float  # vs the profile as given (1.0 = as fast)
    considered: int
    fitting: int
    rejected: list[tuple[dict[str, Any], float]]  # (changes, confirmed need) that did not fit

    @property
    def changes(self) -> dict[str, Any]:
        return changed_keys(self.base, self.profile)


def _quality_then_speed(model: MemoryModel, current: Candidate) -> Callable[[Candidate], tuple]:
    def key(c: Candidate) -> tuple:
        changes = sum(
            a != b
            for a, b in zip(dataclasses.astuple(c), dataclasses.astuple(current), strict=True)
        )
        return (
            -c.resolution,
            -c.rank,
            not c.validation,
            c.base_weights != "full",  # full precision when it fits as well
            round(model.step_seconds(c), 6),
            changes,
        )

    return key


def measure(
    profile: Profile, model: str | None, on_phase: Callable[[str], None] | None
) -> dict[bool, Plan]:
    """Planner runs of the profile as given and with checkpointing switched the other way."""

    def announce(prefix: str) -> Callable[[str], None] | None:
        return None if on_phase is None else (lambda phase: on_phase(f"{prefix}: {phase}"))

    as_given = _checkpointing(profile)
    plans = {
        as_given: plan_profile(profile, model=model, sampling=False, on_phase=announce("as given"))
    }
    if role_plugin(CHECKPOINTING_ROLE) in profile.plugins:
        switched = profile_with(
            profile, {f"plugins.{role_plugin(CHECKPOINTING_ROLE)}.enabled": not as_given}
        )
        plans[not as_given] = plan_profile(
            switched, model=model, sampling=False, on_phase=announce("checkpointing switched")
        )
    return plans


def fit_profile(
    profile: Profile,
    card_gb: float,
    *,
    model: str | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> FitResult:
    """The fastest configuration of ``profile`` predicted to fit a card sold as ``card_gb`` GB."""
    from naruto_lora.plan.models import load_model_configs

    capacity = usable_gib(card_gb)
    # "Fits" keeps the margin nlora plan asks for (below it the verdict is "tight").
    budget = capacity * (1 - TIGHT_HEADROOM)
    plans = measure(profile, model, on_phase)
    memory = build_model(profile, plans, load_model_configs(profile.model, model))
    current = current_candidate(profile)
    every = list(candidates(profile))
    fitting = sorted(
        (c for c in every if memory.need_gib(c) <= budget), key=_quality_then_speed(memory, current)
    )
    rejected: list[tuple[dict[str, Any], float]] = []
    correction = 1.0  # confirmed / predicted need of the candidates that did not fit
    queue = list(fitting)
    while queue and len(rejected) < CONFIRMATIONS:
        choice = queue.pop(0)
        chosen = profile_with(profile, choice.assignments(profile))
        if on_phase is not None:
            on_phase(f"confirming {len(rejected) + 1}")
        plan = plan_profile(chosen, model=model, sampling=False)
        if plan.need_gib <= budget:
            return FitResult(
                card_gb,
                capacity,
                profile,
                chosen,
                plan,
                memory.need_gib(choice),
                memory.step_seconds(choice) / memory.step_seconds(current),
                len(every),
                len(fitting),
                rejected,
            )
        rejected.append((changed_keys(profile, chosen), plan.need_gib))
        # The model was optimistic: scale what it says for the rest by what the planner found,
        # so the next confirmation is spent on a candidate that can still fit.
        correction = max(correction, plan.need_gib / memory.need_gib(choice))
        queue = [c for c in queue if memory.need_gib(c) * correction <= budget]
    smallest = min(every, key=memory.need_gib)
    raise UserError(
        f"No configuration of profile '{profile.name}' is predicted to fit a {card_gb:g} GB card "
        f"({capacity:.1f} GiB usable, {budget:.1f} with a {TIGHT_HEADROOM:.0%} margin): the "
        f"smallest needs about {memory.need_gib(smallest):.1f} "
        "GiB"
        + (f" and {len(rejected)} confirmed candidates did not fit" if rejected else "")
        + ".",
        hint="The UNet weights alone need "
        f"{min(memory.weights_for(c.base_weights) for c in every) / GIB:.1f} GiB"
        + (" even in 8 bits" if any(c.base_weights != "full" for c in every) else "")
        + "; a card this small cannot train this model.",
    )


# ------------------------------------------------------------------------------ output


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def set_line(changes: dict[str, Any]) -> str:
    """``--set key=value`` for each change (values in TOML, quoted for the shell)."""
    import shlex

    return " ".join(f"--set {shlex.quote(f'{k}={_toml_value(v)}')}" for k, v in changes.items())


def profile_toml(result: FitResult, extends: str) -> str:
    """A profile file: ``extends`` the profile as named, with every key that differs."""
    import tomli_w

    from naruto_lora.plugins.manager import load_profile

    named = load_profile(extends)
    table: dict[str, Any] = {
        "extends": extends,
        "description": (
            f"{extends} fitted to a {result.card_gb:g} GB card by `nlora plan --fit`: predicted "
            f"{result.plan.need_gib:.1f} GiB of {result.capacity_gib:.1f} usable (a prediction)."
        ),
    }
    for key, value in changed_keys(named, result.profile).items():
        node = table
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tomli_w.dumps(table)
