"""``nlora doctor``'s decisions: which profile suits this machine, and can a given profile run here.

Facts are gathered in ``naruto_lora.doctor.facts``; everything here is a pure function of those
facts and a profile, so each decision is tested with faked devices (8, 12, 16, 24 GB, none).

Card sizes. torch reports a card's usable memory, a little under the size it is sold as (an 8 GB
RTX 3070 reports 7.79 GiB, a 12 GB RTX 3060 11.76 GiB, a 24 GB RTX 4090 23.65 GiB). The decision
matrix speaks of sold sizes, so a card counts as N GB when torch reports at least
N - ``REPORTED_VRAM_SLACK_GIB``; otherwise every 8 GB card would be told it is below 8 GB.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from naruto_lora.doctor.facts import Facts, GpuFacts, gather_facts

if TYPE_CHECKING:
    from naruto_lora.config.profile import Profile

__all__ = [
    "Facts",
    "gather_facts",
    "recommend_profile",
    "estimated_vram_gib",
    "check_profile",
    "diagnose",
    "CheckRow",
    "Recommendation",
    "VramEstimate",
    "DoctorReport",
]

Status = Literal["ok", "warn", "fail"]
STATUSES = ("ok", "warn", "fail")
REPORTED_VRAM_SLACK_GIB = 0.5
_IDLE_CONTEXT_GIB = 1.0
CPU_TRIAL_PROFILE = "tiny"


def card_gb(reported_vram_gib: float) -> float:
    """The sold size a reported capacity stands for, for comparing with the matrix's GB."""
    return reported_vram_gib + REPORTED_VRAM_SLACK_GIB


@dataclass(frozen=True)
class CheckRow:
    check: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Recommendation:
    profile: str
    level: Literal["ok", "warn", "not_recommended"]
    message: str


# --------------------------------------------------------------------------- the decision matrix


def recommend_profile(largest_vram_gib: float | None) -> Recommendation:
    """The reference decision matrix, applied to the largest GPU (``None``: no CUDA GPU).

    16 GB and up -> 14gb; 12 GB -> 14gb with a warning (12gb is safer); 10-11 GB -> 12gb;
    8-9 GB -> 8gb (the matrix's "12gb or 8gb" for 8-11 GB, split where 12gb's 768 px stops
    fitting); 6-7 GB -> 6gb (1024 px on an int8 base, beyond the reference matrix); under 6 GB
    or none -> not recommended, with ``tiny`` offered as a CPU trial.
    """
    if largest_vram_gib is None:
        return Recommendation(
            CPU_TRIAL_PROFILE,
            "not_recommended",
            "No CUDA GPU: training SDXL here is not recommended. Try the whole "
            "pipeline on CPU with the built-in tiny model: --profile tiny.",
        )
    size = f"{largest_vram_gib:.1f} GiB"
    card = card_gb(largest_vram_gib)
    if card >= 16:
        return Recommendation("14gb", "ok", f"{size}: 14gb (1024 px, rank 16) fits with headroom.")
    if card >= 12:
        return Recommendation(
            "14gb",
            "warn",
            f"{size}: 14gb (1024 px) fits only just and may run "
            "out of memory; 12gb (768 px, text cached on disk) is safer.",
        )
    if card >= 10:
        return Recommendation(
            "12gb",
            "ok",
            f"{size}: 12gb (768 px, text cached on disk); use 8gb if it runs out of memory.",
        )
    if card >= 8:
        return Recommendation("8gb", "ok", f"{size}: 8gb (512 px, rank 4).")
    if card >= 6:
        return Recommendation(
            "6gb",
            "ok",
            f"{size}: 6gb (1024 px, rank 16 on an int8 frozen base, 8-bit AdamW; needs "
            "pip install 'naruto-lora[quantize,bnb]').",
        )
    return Recommendation(
        CPU_TRIAL_PROFILE,
        "not_recommended",
        f"{size} is under 6 GB: training SDXL is not recommended. Try the whole "
        "pipeline on CPU with the built-in tiny model: --profile tiny.",
    )


# --------------------------------------------------------------------------- VRAM estimate


@dataclass(frozen=True)
class VramEstimate:
    """An ESTIMATE of the card a profile needs, in the matrix's GB: ``need_gb`` runs with
    headroom, ``minimum_gb`` runs with care (a warning), below it training fails."""

    need_gb: float
    minimum_gb: float
    basis: str


# The shipped GPU recipes, told apart by resolution: (name, resolution, rank, text, need, minimum).
# Need/minimum are the decision matrix's: 14gb on 16 GB+ (with care on 12 GB), 12gb on 10 GB+,
# 8gb on 8 GB. All three use gradient checkpointing, batch 1 and fp16/bf16.
_RECIPES = (
    ("8gb", 512, 4, "disk", 8.0, 8.0),
    ("12gb", 768, 8, "disk", 10.0, 10.0),
    ("14gb", 1024, 16, "memory", 16.0, 12.0),
)
# The 6gb recipe (an int8 frozen base: model.base_weights), the basis for any 8-bit base; its
# planner prediction is 4.7 GiB with the CUDA context (benchmarks/RESULTS.md), on a 6 GB card.
_QUANTIZED_RECIPE = ("6gb", 1024, 16, "disk", 6.0, 6.0)
# SDXL-size constants for adjusting a recipe (what a config would say; the model may not be here):
_TEXT_ENCODERS_GIB = 1.5  # CLIP ViT-L + OpenCLIP ViT-bigG, ~818M parameters in fp16
_LORA_GIB_PER_RANK = 0.022  # ~1.45M attention-LoRA parameters per rank, fp32 weight+grad+Adam
_UNET_FP32_EXTRA_GIB = 4.8  # 2.6B UNet parameters at 4 instead of 2 bytes
_ACTIVATIONS_GIB_PER_MEGAPIXEL = 2.0  # per sample, with gradient checkpointing: a rough guess


def estimated_vram_gib(profile: Profile) -> VramEstimate:
    """ESTIMATE of the VRAM a profile's training needs: the nearest shipped recipe at or above
    the profile's resolution, adjusted for text caching, rank, batch size and precision.

    A rough table, not a measurement; to be replaced by a planner that traces the real model.
    It assumes gradient checkpointing is on, as in every shipped GPU recipe.
    """
    if profile.model.pretrained.startswith("nlora:"):
        return VramEstimate(1.0, 1.0, "built-in tiny model: well under 1 GB")
    resolution = profile.data.resolution
    _, base_res, rank, text, need, minimum = (
        _QUANTIZED_RECIPE
        if profile.model.base_weights != "full"
        else next((r for r in _RECIPES if r[1] >= resolution), _RECIPES[-1])
    )
    megapixels = resolution**2 / 2**20
    extra = (profile.lora.rank - rank) * _LORA_GIB_PER_RANK
    extra += (
        profile.train.batch_size * megapixels - base_res**2 / 2**20
    ) * _ACTIVATIONS_GIB_PER_MEGAPIXEL
    if profile.cache.text != text:
        extra += _TEXT_ENCODERS_GIB if profile.cache.text == "memory" else -_TEXT_ENCODERS_GIB
    if profile.train.mixed_precision == "no":
        extra += _UNET_FP32_EXTRA_GIB
    basis = (
        f"{resolution} px, rank {profile.lora.rank}, batch {profile.train.batch_size}, "
        f"text {profile.cache.text}, {profile.train.mixed_precision}: the {base_res} px "
        f"recipe {extra:+.1f} GB"
    )
    return VramEstimate(round(need + extra, 1), round(minimum + extra, 1), basis)


# Sampling an SDXL model (reference: ~8 GB in half precision; ~5-6 GB with offload and VAE tiling).
_SAMPLE_HALF_GB, _SAMPLE_FP32_GB, _SAMPLE_LOW_VRAM_GB = 8.0, 15.0, 6.0


def estimated_sampling_vram_gb(profile: Profile) -> dict[str, float]:
    """ESTIMATE of what ``nlora sample`` needs: whole pipeline in half precision, in fp32, and
    with ``--low-vram`` (components offloaded to the CPU in turn, VAE tiled)."""
    if profile.model.pretrained.startswith("nlora:"):
        return {"half": 0.5, "fp32": 0.5, "low_vram": 0.5}
    return {"half": _SAMPLE_HALF_GB, "fp32": _SAMPLE_FP32_GB, "low_vram": _SAMPLE_LOW_VRAM_GB}


# --------------------------------------------------------------------------- checks


def runs_on_cpu(profile: Profile) -> bool:
    """A CPU profile: a built-in tiny model in fp32 (fp16/bf16 mixed precision needs a GPU)."""
    return profile.model.pretrained.startswith("nlora:") and profile.train.mixed_precision == "no"


def _fitting_recipe(card: float) -> str:
    """The heaviest shipped recipe that runs with headroom on a card of ``card`` GB."""
    fitting = [name for name, *_, need, _minimum in (_QUANTIZED_RECIPE, *_RECIPES) if need <= card]
    return f"--profile {fitting[-1]}" if fitting else f"--profile {CPU_TRIAL_PROFILE} on CPU"


def check_device(profile: Profile, facts: Facts) -> CheckRow:
    gpu = facts.training_gpu()
    if runs_on_cpu(profile):
        return CheckRow("device", "ok", "CPU profile (built-in tiny model, fp32): no GPU needed")
    if gpu is None:
        if facts.cuda_runtime is None:
            why = f"torch {facts.torch} is a CPU-only build"
        else:
            why = f"torch {facts.torch} (CUDA {facts.cuda_runtime}) finds no device"
            why += f", driver {facts.driver}" if facts.driver else ", no NVIDIA driver found"
        fix = (
            "set --set train.mixed_precision=no to run the tiny model on CPU"
            if profile.model.pretrained.startswith("nlora:")
            else f"for a CPU trial use --profile {CPU_TRIAL_PROFILE}"
        )
        return CheckRow(
            "device",
            "fail",
            f"no CUDA GPU: {why}. Profile '{profile.name}' trains "
            f"in {profile.train.mixed_precision} and needs one; {fix}.",
        )
    detail = f"GPU {gpu.index}: {gpu.name}"
    if gpu.index != 0:  # training uses the first visible device
        detail += f" (the largest; select it with CUDA_VISIBLE_DEVICES={gpu.index})"
    return CheckRow("device", "ok", detail)


def check_precision(profile: Profile, facts: Facts) -> CheckRow | None:
    precision = profile.train.mixed_precision
    gpu = facts.training_gpu()
    if precision == "no":
        return CheckRow("precision", "ok", "fp32 (train.mixed_precision = 'no')")
    if gpu is None:
        return None  # the device row already says that a GPU is needed
    if precision == "bf16" and not gpu.bf16:
        return CheckRow(
            "precision",
            "fail",
            f"train.mixed_precision = 'bf16' but {gpu.name} (compute capability "
            f"{gpu.compute_capability or '?'}) has no native bf16 (needs 8.0, Ampere, "
            "or newer); use --set train.mixed_precision=fp16.",
        )
    return CheckRow("precision", "ok", f"{precision} on {gpu.name}")


def check_vram(profile: Profile, facts: Facts, estimate: VramEstimate) -> CheckRow | None:
    gpu = facts.training_gpu()
    if gpu is None:
        return None
    card = card_gb(gpu.total_vram_gib)
    detail = (
        f"{gpu.name} has {gpu.total_vram_gib:.1f} GiB; '{profile.name}' needs ~"
        f"{estimate.need_gb:g} GB, at least ~{estimate.minimum_gb:g} GB (estimate: "
        f"{estimate.basis})"
    )
    if card < estimate.minimum_gb:
        return CheckRow("VRAM", "fail", f"{detail}. Too small: try {_fitting_recipe(card)}.")
    if card < estimate.need_gb:
        return CheckRow(
            "VRAM",
            "warn",
            f"{detail}. Fits only just and may run out of memory; "
            f"{_fitting_recipe(card)} is safer.",
        )
    held = 0.0 if gpu.free_vram_gib is None else gpu.total_vram_gib - gpu.free_vram_gib
    # Free memory on an idle card is short of the total by the CUDA contexts (doctor's own too).
    if card - max(0.0, held - _IDLE_CONTEXT_GIB) < estimate.minimum_gb:
        return CheckRow(
            "VRAM",
            "warn",
            f"{detail}. Only {gpu.free_vram_gib:.1f} GiB free now: "
            f"other processes hold {held:.1f} GiB.",
        )
    return CheckRow("VRAM", "ok", detail)


def check_assets(facts: Facts) -> list[CheckRow]:
    rows = []
    for asset in facts.assets:
        label = asset.source or "(from the model)"
        if asset.available:
            rows.append(CheckRow(asset.role, "ok", f"{label}: {asset.detail}"))
        elif asset.kind == "hub" and facts.hub.reachable:
            rows.append(
                CheckRow(
                    asset.role,
                    "ok",
                    f"{label}: {asset.detail}; downloaded from {facts.hub.endpoint} on first use",
                )
            )
        elif asset.kind == "hub":
            hub = "in offline mode" if facts.hub.offline else "unreachable"
            kind = " --repo-type dataset" if asset.role == "data" else ""
            rows.append(
                CheckRow(
                    asset.role,
                    "fail",
                    f"{label}: {asset.detail}, and the hub is "
                    f"{hub}. Fill the hub cache where there is network (hf "
                    f"download {asset.source}{kind}) and copy it here, or give "
                    f"--{asset.role} a local folder.",
                )
            )
        else:
            rows.append(CheckRow(asset.role, "fail", f"{label}: {asset.detail}"))
    return rows


# Rough download sizes (GB) for the hub cache check: SDXL base in fp32 / with the fp16 variant.
_DOWNLOAD_GB = {"model": 14.0, "vae": 0.4, "data": 1.0}


def _disk_need_gb(profile: Profile, facts: Facts, role: str) -> float:
    tiny = profile.model.pretrained.startswith("nlora:")
    if role == "hub cache":
        needed = [a for a in facts.assets if a.kind == "hub" and not a.available]
        halve = profile.model.variant == "fp16"
        return sum(_DOWNLOAD_GB[a.role] / (2 if halve and a.role == "model" else 1) for a in needed)
    if tiny:
        return 0.2
    # Latents and (for text = "disk") prompt embeddings; LoRA checkpoints and samples.
    return {"cache": 2.0, "output": 1.0}.get(role, 0.2)


def check_disks(profile: Profile, facts: Facts) -> list[CheckRow]:
    rows = []
    uses_hub = any(asset.kind == "hub" for asset in facts.assets)
    for disk in facts.disks:
        if disk.role == "hub cache" and not uses_hub:
            continue
        need = _disk_need_gb(profile, facts, disk.role)
        where = (
            f"{disk.path} (on {disk.checked_path})" if disk.path != disk.checked_path else disk.path
        )
        if disk.free_gib is None:
            rows.append(CheckRow(f"disk: {disk.role}", "warn", f"{where}: free space unknown"))
        elif disk.free_gib < need:
            rows.append(
                CheckRow(
                    f"disk: {disk.role}",
                    "warn",
                    f"{where}: {disk.free_gib:.1f} GiB free, ~{need:g} GB needed",
                )
            )
        else:
            rows.append(
                CheckRow(f"disk: {disk.role}", "ok", f"{where}: {disk.free_gib:.1f} GiB free")
            )
    return rows


def check_ram(profile: Profile, facts: Facts) -> CheckRow:
    # Loading SDXL's parts and caching through the VAE and both text encoders wants ~16 GiB.
    need = 2.0 if profile.model.pretrained.startswith("nlora:") else 16.0
    detail = f"{facts.ram_available_gib:.1f} of {facts.ram_total_gib:.1f} GiB available"
    if facts.ram_total_gib + 0.5 < need:  # the same allowance as for VRAM: 16 GB shows as 15.6
        return CheckRow("RAM", "warn", f"{detail}; ~{need:g} GB recommended")
    return CheckRow("RAM", "ok", detail)


def check_sampling(profile: Profile, facts: Facts) -> CheckRow:
    """What ``nlora sample`` needs here; a warning at most: sampling can move to another machine."""
    gb = estimated_sampling_vram_gb(profile)
    dtype = "fp32" if profile.train.mixed_precision == "no" else "half"
    gpu = facts.training_gpu()
    if profile.model.pretrained.startswith("nlora:"):
        return CheckRow("sampling", "ok", "tiny model: seconds on CPU or GPU")
    needs = (
        f"estimate: ~{gb['half']:g} GB in fp16/bf16, ~{gb['fp32']:g} GB in fp32, "
        f"~{gb['low_vram']:g} GB with --low-vram"
    )
    if gpu is None:
        return CheckRow(
            "sampling", "warn", f"no GPU: SDXL on CPU takes minutes per image ({needs})"
        )
    card = card_gb(gpu.total_vram_gib)
    if card >= gb[dtype]:
        return CheckRow("sampling", "ok", f"full pipeline on {gpu.name} ({needs})")
    if card >= gb["low_vram"]:
        return CheckRow("sampling", "warn", f"use nlora sample --low-vram on {gpu.name} ({needs})")
    return CheckRow("sampling", "warn", f"{gpu.name} is below even --low-vram's needs ({needs})")


def planned_vram_gib(profile: Profile) -> VramEstimate:
    """The VRAM need PREDICTED by the planner (``nlora plan``: the real training step traced on
    fake tensors); ~30-60 s on the first call for a profile, cached after."""
    from naruto_lora.plan.planner import CARD_RESERVED_GIB, TIGHT_HEADROOM, estimate_peak_vram_gib

    need = estimate_peak_vram_gib(profile)
    return VramEstimate(
        round(need / (1 - TIGHT_HEADROOM) + CARD_RESERVED_GIB, 1),
        round(need + CARD_RESERVED_GIB, 1),
        "predicted by nlora plan (training step traced on fake tensors)",
    )


def check_profile(
    profile: Profile, facts: Facts, estimate: VramEstimate | None = None
) -> list[CheckRow]:
    """Can ``profile`` train here? One row per check; any "fail" means it cannot."""
    estimate = estimate or estimated_vram_gib(profile)
    rows = [
        check_device(profile, facts),
        check_precision(profile, facts),
        check_vram(profile, facts, estimate),
        *check_assets(facts),
        *check_disks(profile, facts),
        check_ram(profile, facts),
        check_sampling(profile, facts),
    ]
    return [row for row in rows if row is not None]


def _plugin_row(item: Any) -> CheckRow:
    """A plugin's row, kept even when malformed: doctor is where a broken setup gets diagnosed."""
    if not isinstance(item, dict) or "check" not in item:
        return CheckRow("plugin", "warn", f"a plugin returned {item!r}, not a check row")
    status, detail = item.get("status"), str(item.get("detail", ""))
    if status not in STATUSES:
        detail += f" (unknown status {status!r})"
        status = "warn"
    return CheckRow(str(item["check"]), status, detail)


def plugin_checks(profile: Profile, facts: Facts) -> list[CheckRow]:
    """The rows the profile's enabled plugins add through ``nlora_doctor_checks``."""
    from naruto_lora.plugins.manager import build_plugin_manager

    pm = build_plugin_manager(profile)
    results = pm.hook.nlora_doctor_checks(facts=facts.to_dict(), profile=profile)
    return [_plugin_row(item) for result in results for item in (result or [])]


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class DoctorReport:
    facts: Facts
    profile: str
    explicit: bool  # --profile given: a failing check means exit code 1
    estimate: VramEstimate
    checks: tuple[CheckRow, ...]
    recommendation: Recommendation

    @property
    def failures(self) -> list[CheckRow]:
        return [row for row in self.checks if row.status == "fail"]

    @property
    def can_run(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        facts = self.facts.to_dict()
        system_keys = (
            "python",
            "platform",
            "torch",
            "cuda",
            "cuda_runtime",
            "driver",
            "cpu_count",
            "ram_total_gib",
            "ram_available_gib",
            "disks",
        )
        return {
            "system": {key: facts[key] for key in system_keys},
            "gpus": facts["gpus"],
            "packages": facts["packages"],
            "assets": facts["assets"],
            "hub": facts["hub"],
            "profile": {
                "name": self.profile,
                "explicit": self.explicit,
                "vram_estimate": dataclasses.asdict(self.estimate),
            },
            "checks": [dataclasses.asdict(row) for row in self.checks],
            "can_run": self.can_run,
            "recommendation": dataclasses.asdict(self.recommendation),
        }


def diagnose(
    profile: Profile, facts: Facts, explicit: bool = True, use_planner: bool = False
) -> DoctorReport:
    """Check ``profile`` against ``facts`` (core checks, then plugin rows) and recommend a profile.

    ``use_planner`` replaces the quick table estimate of the VRAM need by the planner's prediction
    when there is a GPU to check it against (the CLI does this for an explicit ``--profile``)."""
    gpu: GpuFacts | None = facts.training_gpu()
    planned = use_planner and gpu is not None and not profile.model.pretrained.startswith("nlora:")
    estimate = planned_vram_gib(profile) if planned else estimated_vram_gib(profile)
    return DoctorReport(
        facts=facts,
        profile=profile.name,
        explicit=explicit,
        estimate=estimate,
        checks=tuple(check_profile(profile, facts, estimate) + plugin_checks(profile, facts)),
        recommendation=recommend_profile(gpu.total_vram_gib if gpu else None),
    )
