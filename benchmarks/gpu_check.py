"""One-command GPU check: speed, memory against the planner, speed variants and the precision
paths of the shipped profiles, on the full-size SDXL architecture with random weights built
directly on the GPU (no download, nothing written but the report).

    python benchmarks/gpu_check.py --out gpu-check/            # on a lent H100/H200: < 8 min
    python benchmarks/gpu_check.py --out /tmp/smoke --cpu-smoke  # the same code, tiny model, CPU

For each of 14gb, 12gb, 8gb and 6gb (int8 frozen base) at their resolutions: steady-state seconds per optimizer update
(the median after warm-up updates) and images per second, ``torch.cuda.max_memory_allocated``
and ``max_memory_reserved`` against the planner's predicted training-step peak, the UNet FLOPs per
update (counted by the planner) as achieved TFLOP/s and a fraction of the card's dense bf16 peak.
Then the speed variants on one profile (``--variant-profile``, 14gb), each as a ratio to that
profile's default in the same run: torch.compile, channels-last, each SDPA kernel, bf16 against
fp16, foreach against fused AdamW, 8-bit AdamW when bitsandbytes is installed. Then the training
paths fp16 + grad scaler, bf16 and 8-bit AdamW for a few updates each, which must give finite
losses. And the work diffusers' ``train_text_to_image_lora_sdxl.py`` adds to each update (VAE
encode, fp32 and training precision; both text encoders), timed on the device: our update over
the script's. Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.

Every case runs the training loop's own pieces: the profile resolved as ``nlora train`` resolves
it, ``make_accelerator``, ``make_trainable`` (LoRA, ``nlora_prepare_unet`` hooks),
``make_optimizer``, ``accelerator.prepare``, ``nlora_wrap_model``, the plugins'
``nlora_train_start``, then ``train_micro_batch`` / ``optimizer_update`` /
``nlora_after_optimizer_step`` exactly as ``train_loop`` calls them. Only the weights (random,
built on the device) and the batches (the planner's ``make_batch``: cached latents and
embeddings of the profile's shapes, already on the device) differ from a real run; validation
samples and checkpoints are off. ``--cpu-smoke`` runs all of it on the tiny model on the CPU
(accumulation 2, a few updates) and skips what needs CUDA, saying so: CI runs it, so this script
cannot rot before a GPU appears.

Exit status: 0 when every case that ran finished with finite losses, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Clock,
    device_peak_tflops,
    encode_images_as_the_script,
    encode_prompts_as_the_script,
    machine,
)

PROFILES = ("14gb", "12gb", "8gb", "6gb")
SCRIPT_LABEL = "{}: the diffusers script's extra work"
SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"


@dataclass
class Case:
    """One measured configuration: a profile with ``--set`` settings."""

    label: str
    kind: str  # "profile" | "variant" | "path" | "script"
    profile: str
    settings: list[str] = field(default_factory=list)
    baseline: str | None = None  # the label this variant is a ratio to
    needs: list[str] = field(default_factory=list)  # "cuda", "bitsandbytes", "gpu-time"
    min_budget_s: float = 0.0  # not started with less time left than this


def sdpa_settings(kernel: str) -> list[str]:
    return ["plugins.sdpa.enabled=true", f'plugins.sdpa.backend="{kernel}"']


def other_precision(profile_name: str) -> str:
    from naruto_lora.plugins.manager import load_profile

    return "bf16" if load_profile(profile_name).train.mixed_precision == "fp16" else "fp16"


def plan_cases(args: argparse.Namespace) -> list[Case]:
    """Profiles first (the headline), then the precision paths, then the variants, compile last
    (its compilation takes the longest)."""
    cases = [profile_case(name, args) for name in args.profiles]
    path = args.path_profile
    cases += [
        Case("fp16 + grad scaler", "path", path, ['train.mixed_precision="fp16"'], needs=["cuda"]),
        Case("bf16", "path", path, ['train.mixed_precision="bf16"'], needs=["cuda"]),
        Case(
            "8-bit AdamW",
            "path",
            path,
            ["plugins.adamw8bit.enabled=true"],
            needs=["cuda", "bitsandbytes"],
        ),
    ]
    base = args.variant_profile
    base_case = profile_case(base, args)
    if base not in args.profiles:
        cases.append(base_case)
    own = base_case.settings  # e.g. AdamW where 8-bit AdamW cannot run
    cases.append(Case(SCRIPT_LABEL.format(base), "script", base, own, baseline=base_case.label))
    variants = [
        Case(
            f"{base} + channels_last", "variant", base, [*own, "plugins.channels_last.enabled=true"]
        ),
        *(
            Case(
                f"{base} + sdpa {kernel}",
                "variant",
                base,
                [*own, *sdpa_settings(kernel)],
                needs=[f"sdpa:{kernel}"],
            )
            for kernel in SDPA_KERNELS
        ),
        Case(f"{base} + sdpa auto", "variant", base, [*own, *sdpa_settings("auto")]),
        Case(
            f"{base} + {other_precision(base)}",
            "variant",
            base,
            [*own, f'train.mixed_precision="{other_precision(base)}"'],
            needs=["cuda"],
        ),
        Case(
            f"{base} + 8-bit AdamW",
            "variant",
            base,
            ["plugins.adamw8bit.enabled=true"],
            needs=["cuda", "bitsandbytes"],
        ),
        Case(
            f"{base} + compile",
            "variant",
            base,
            [*own, "plugins.compile.enabled=true"],
            needs=["gpu-time"],
            min_budget_s=150.0,
        ),
    ]
    for variant in variants:
        variant.baseline = base_case.label
    return cases + variants


def profile_case(name: str, args: argparse.Namespace) -> Case:
    """A shipped profile as it is; one that uses 8-bit AdamW runs with AdamW where bitsandbytes
    cannot (the CPU smoke mode, or not installed), saying so in its label."""
    import importlib.util

    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(name)
    needs = ["torchao"] if profile.model.base_weights != "full" else []
    if "adamw8bit" in profile.enabled_plugins() and (
        args.cpu_smoke or importlib.util.find_spec("bitsandbytes") is None
    ):
        return Case(f"{name} (AdamW, not 8-bit)", "profile", name,
                    ["plugins.adamw8bit.enabled=false"], needs=needs)  # fmt: skip
    return Case(name, "profile", name, needs=needs)


def base_settings(args: argparse.Namespace, out_dir: Path) -> list[str]:
    """Every case: no validation samples or checkpoints, its own output folder; the smoke
    mode's tiny model and small sizes."""
    settings = [
        "validation.every_steps=0",
        "train.checkpoint_every=0",
        f'train.output_dir="{out_dir / "train-output"}"',
        "train.max_steps=100000",
    ]
    if args.cpu_smoke:
        settings += [
            'model.pretrained="nlora:tiny"',
            'model.vae=""',
            "data.resolution=64",
            "train.gradient_accumulation_steps=2",
        ]
    return settings + list(args.set)


def missing_needs(case: Case, device: torch.device, args: argparse.Namespace) -> str | None:
    import importlib.util

    for need in case.needs:
        if need == "cuda" and device.type != "cuda":
            return "needs a CUDA GPU"
        if need == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed"
        if need == "torchao" and importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (pip install 'naruto-lora[quantize]')"
        if need == "gpu-time" and args.cpu_smoke:
            return "compiling takes minutes on a CPU; GPU runs only"
        if need.startswith("sdpa:"):
            from nlora_plugins.sdpa import kernel_runs

            from naruto_lora.plugins.manager import load_profile
            from naruto_lora.util.devices import DTYPES

            kernel = need.split(":", 1)[1]
            precision = load_profile(case.profile).train.mixed_precision
            dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
            if not kernel_runs(kernel, str(device), dtype, 64):
                return f"the {kernel} kernel does not run on {device.type} {dtype}"
    return None


# ------------------------------------------------------------------------------ the planner


def predict(profile_name: str, settings: list[str]) -> dict[str, Any]:
    """The planner's training-step prediction for a case (fake tensors, CUDA's policies): its
    tracked peak, the UNet FLOPs per optimizer update and the LoRA's parameter count."""
    from naruto_lora.plan.core import SimTarget
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plan.sim import simulate_training
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(profile_name, overrides=settings)
    sim = simulate_training(
        profile, load_model_configs(profile.model), target=SimTarget("cuda"), validation=False
    )
    return {
        "predicted_peak_gib": sim.training.peak_bytes / 2**30,
        "predicted_split_gib": {k: v / 2**30 for k, v in sim.training.split.items()},
        "flops_per_update": sim.flops_per_micro_step * profile.train.gradient_accumulation_steps,
        "planned_lora_parameters": sim.lora_parameters,
        "planner_s": sim.elapsed_s,
    }


class Predictions:
    """The planner's predictions for the profile cases: in worker processes beside the GPU work
    (the planner runs on the CPU), or in this process (``jobs=0``, the smoke mode)."""

    def __init__(self, cases: list[Case], settings: list[str], jobs: int) -> None:
        self.pool = None
        self.futures: dict[str, Any] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.todo = {c.label: (c.profile, c.settings) for c in cases if c.kind == "profile"}
        self.settings = settings
        if jobs > 0:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=min(jobs, len(self.todo)) or 1,
                mp_context=multiprocessing.get_context("spawn"),  # before CUDA is touched
            )
            for label, (profile, own) in self.todo.items():
                self.futures[label] = self.pool.submit(predict, profile, [*settings, *own])

    def get(self, label: str) -> dict[str, Any]:
        if label not in self.done:
            try:
                if label in self.futures:
                    self.done[label] = self.futures[label].result()
                else:
                    profile, own = self.todo.get(label, (label, []))
                    self.done[label] = predict(profile, [*self.settings, *own])
            except Exception as exc:  # a planner failure must not lose the measurements
                self.done[label] = {"planner_error": f"{type(exc).__name__}: {exc}"}
        return self.done[label]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------------------ building a run


def random_unet(configs: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet from its config with PyTorch's default initialisation, built on the device."""
    from diffusers import UNet2DConditionModel

    from naruto_lora.plan.models import quiet_libraries

    with quiet_libraries(), torch.device(device):
        unet = UNet2DConditionModel.from_config(configs.unet)
    return torch.nn.Module.to(unet, dtype=dtype)


def random_vae(configs: Any, device: torch.device) -> Any:
    """The VAE from its config, random, frozen, in fp32 on the device."""
    from diffusers import AutoencoderKL

    from naruto_lora.plan.models import quiet_libraries

    with quiet_libraries(), torch.device(device):
        vae = AutoencoderKL.from_config(configs.vae)
    return vae.requires_grad_(False).eval()


def random_text_encoders(configs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Both CLIP encoders from their configs, random, on the device; token ids of the right
    shape stand in for the tokenizers (the speed does not depend on which ids)."""
    from naruto_lora.models.loading import TextEncoders
    from naruto_lora.plan.models import StandInTokenizer, clip_text_encoders, quiet_libraries

    with quiet_libraries(), torch.device(device):
        encoders = clip_text_encoders(configs, dtype)
    return TextEncoders(tokenizers=(StandInTokenizer(), StandInTokenizer()), encoders=encoders)


def build_run(profile: Any, configs: Any, device: torch.device, out_dir: Path) -> Any:
    """A ``train.run.Run`` from random weights on the device and without a data set (the batches
    come from ``device_batches``), through the trainer's ``make_trainable`` and
    ``prepare_training``."""
    from naruto_lora.plan.models import noise_scheduler
    from naruto_lora.plugins.manager import build_plugin_manager
    from naruto_lora.train.conditioning import Conditioner
    from naruto_lora.train.guard import NonFiniteGuard
    from naruto_lora.train.metrics import PeakMemory
    from naruto_lora.train.run import Run, TrainOptions
    from naruto_lora.train.setup import make_accelerator, make_trainable, prepare_training
    from naruto_lora.util.devices import DTYPES

    pm = build_plugin_manager(profile)
    options = TrainOptions(device=str(device))
    accelerator = make_accelerator(profile, device, options)
    device = accelerator.device
    weight_dtype = DTYPES[accelerator.mixed_precision]
    torch.manual_seed(profile.train.seed)  # the same random base model in every case
    unet, params = make_trainable(random_unet(configs, device, weight_dtype), profile, pm)
    generator = torch.Generator(device=device).manual_seed(profile.train.seed)
    conditioner = Conditioner(device=device, weight_dtype=weight_dtype, generator=generator)
    if profile.cache.text == "memory":
        torch.manual_seed(profile.train.seed + 1)
        conditioner.text_encoders = random_text_encoders(configs, device, weight_dtype)
    total_steps = profile.train.max_steps
    state, model = prepare_training(
        profile, pm, accelerator, unet, params, noise_scheduler(configs), out_dir, total_steps
    )
    run = Run(
        profile=profile,
        options=options,
        pm=pm,
        accelerator=accelerator,
        state=state,
        model=model,
        optimizer=state.optimizer,
        lr_scheduler=state.lr_scheduler,
        dataset=None,
        batches_per_epoch=0,
        total_steps=total_steps,
        conditioner=conditioner,
        generator=generator,
        guard=NonFiniteGuard(
            profile.train.max_nonfinite_in_row, profile.train.learning_rate, announce=False
        ),
        memory=PeakMemory(device),
        metrics=None,
        validation=None,
    )
    pm.hook.nlora_train_start(state=state)
    return run


def device_batches(profile: Any, configs: Any, run: Any, count: int = 4) -> list[dict[str, Any]]:
    """Micro-batches of the profile's shapes (the planner's ``make_batch``: cached latents,
    cached embeddings when the profile caches text), on the device before timing starts."""
    from naruto_lora.plan.sim import make_batch

    batches = []
    for i in range(count):
        batch = make_batch(profile, configs, run.conditioner)
        size = profile.train.batch_size
        batch["index"] = list(range(i * size, (i + 1) * size))
        batches.append(
            {
                k: v.to(run.state.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
            }
        )
    return batches


# ------------------------------------------------------------------------------ measuring


def timed_updates(run: Any, batches: list, warmup: int, updates: int) -> dict[str, Any]:
    """``train_loop``'s body for ``warmup + updates`` optimizer updates, a clock read at each
    update's end (the device synchronised first)."""
    from naruto_lora.train.loop import Window, optimizer_update, train_micro_batch

    clock = Clock(run.state.device)
    seconds, losses, applied = [], [], []
    window, done, i = Window(), 0, 0
    clock.lap()
    while done < warmup + updates:
        ends_window = train_micro_batch(run, window, batches[i % len(batches)])
        i += 1
        if not ends_window:
            continue
        update = optimizer_update(run, window)
        if update.applied:
            run.pm.hook.nlora_after_optimizer_step(state=run.state)
        elapsed = clock.lap()
        done += 1
        losses.append(window.loss)
        applied.append(update.applied)
        if done > warmup:
            seconds.append(elapsed)
        window = Window()
    scaler = run.accelerator.scaler
    return {
        "step_s": statistics.median(seconds),
        "step_s_all": [round(s, 5) for s in seconds],
        "losses": losses,
        "updates_applied": sum(applied),
        "updates_skipped": len(applied) - sum(applied),
        "grad_scale": None if scaler is None else float(scaler.get_scale()),
        "clock": clock.kind,
    }


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_report(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"max_allocated_gib": None, "max_reserved_gib": None}
    return {
        "max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def run_case(case: Case, args: argparse.Namespace, device: torch.device, out_dir: Path) -> dict:
    """Build, warm up, time; the models freed again before the next case."""
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(case.profile, overrides=base_settings(args, out_dir) + case.settings)
    configs = load_model_configs(profile.model)
    started = time.perf_counter()
    reset_memory(device)
    run = build_run(profile, configs, device, out_dir)
    batches = device_batches(profile, configs, run)
    reset_memory(device)  # the peak from here on: training, not the fp32 build of the weights
    build_s = time.perf_counter() - started
    compile_case = "compile" in profile.enabled_plugins()
    warmup = args.warmup + (2 if compile_case else 0)
    updates = args.path_updates if case.kind == "path" else args.updates
    result = timed_updates(run, batches, warmup, updates)
    result.update(memory_report(device))
    images = profile.train.batch_size * profile.train.gradient_accumulation_steps
    attention = getattr(next(iter(run.state.unet.attn_processors.values()), None), "choice", None)
    result.update(
        profile_name=profile.name,
        resolution=profile.data.resolution,
        batch_size=profile.train.batch_size,
        accumulation=profile.train.gradient_accumulation_steps,
        precision=str(run.state.weight_dtype).removeprefix("torch."),
        optimizer=type(run.optimizer.optimizer).__module__
        + "."
        + type(run.optimizer.optimizer).__name__,
        plugins=profile.enabled_plugins(),
        attention_kernels=sorted(set(attention.names.values())) if attention else None,
        lora_parameters=sum(p.numel() for p in run.state.lora_parameters),
        images_per_s=images / result["step_s"],
        build_s=build_s,
        case_s=time.perf_counter() - started,
        finite=all(
            isinstance(v, float) and v == v and abs(v) != float("inf") for v in result["losses"]
        ),
    )
    run.accelerator.free_memory()  # accelerate keeps the prepared model and optimizer
    if compile_case:
        torch._dynamo.reset()  # compiled graphs hold the model too
    del run, batches
    reset_memory(device)
    return result


def script_extra_work(
    case: Case, args: argparse.Namespace, device: torch.device, out_dir: Path
) -> dict:
    """What diffusers' ``train_text_to_image_lora_sdxl.py`` runs per optimizer update on top of
    the UNet step: the VAE encode of every image and both text encoders in the training
    precision, no gradients. Its default keeps the base's VAE in fp32 (outside autocast); with
    ``--pretrained_vae_model_name_or_path`` (an fp16-safe VAE) the VAE runs in the training
    precision, measured too on a GPU. Our caches remove exactly this work; the UNet step is the
    same computation on both sides, so our step / (our step + this) is the speed ratio."""
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plugins.manager import load_profile
    from naruto_lora.train.setup import precision_for

    profile = load_profile(case.profile, overrides=base_settings(args, out_dir) + case.settings)
    configs = load_model_configs(profile.model)
    _, train_dtype = precision_for(profile, device)
    started = time.perf_counter()
    reset_memory(device)
    torch.manual_seed(profile.train.seed)
    vae = random_vae(configs, device)
    text = random_text_encoders(configs, device, train_dtype)
    by_vae_dtype = {}
    for vae_dtype in dict.fromkeys((torch.float32, train_dtype)):
        size = profile.data.resolution
        pixels = torch.rand(profile.train.batch_size, 3, size, size, device=device) * 2 - 1
        work = (vae.to(vae_dtype), text.encoders, pixels.to(vae_dtype), profile.train)
        by_vae_dtype[str(vae_dtype).removeprefix("torch.")] = timed_encoding(work, args, device)
    result = {
        "by_vae_dtype": by_vae_dtype,
        "text_dtype": str(train_dtype).removeprefix("torch."),
        "clock": by_vae_dtype["float32"]["clock"],
        "finite": all(r["finite"] for r in by_vae_dtype.values()),
        "case_s": time.perf_counter() - started,
        **memory_report(device),
    }
    del vae, text, pixels, work  # freed before the next case
    reset_memory(device)
    return result


def encode_as_the_script(vae: Any, encoders: Any, pixels: torch.Tensor, train: Any) -> torch.Tensor:
    for _ in range(train.gradient_accumulation_steps):
        latents = encode_images_as_the_script(vae, pixels)
        encode_prompts_as_the_script(encoders, train.batch_size, pixels.device)
    return latents


def timed_encoding(work: tuple, args: argparse.Namespace, device: torch.device) -> dict:
    from naruto_lora.plan.core import FlopCounter

    with FlopCounter() as counter:
        latents = encode_as_the_script(*work)
    clock, seconds = Clock(device), []
    for i in range(args.warmup + args.updates):
        clock.lap()
        encode_as_the_script(*work)
        if i >= args.warmup:
            seconds.append(clock.lap())
    step_s = statistics.median(seconds)
    return {
        "step_s": step_s,
        "step_s_all": [round(v, 5) for v in seconds],
        "latents_shape": list(latents.shape),
        "tflop_per_update": counter.flops / 1e12,
        "achieved_tflops": counter.flops / step_s / 1e12,
        "clock": clock.kind,
        "finite": bool(torch.isfinite(latents).all()),
    }


def add_planner_figures(result: dict, prediction: dict, peak_tflops: float | None) -> None:
    result.update(prediction)
    flops = prediction.get("flops_per_update")
    if flops:
        result["achieved_tflops"] = flops / result["step_s"] / 1e12
        if peak_tflops:
            result["fraction_of_peak"] = result["achieved_tflops"] / peak_tflops
    predicted, measured = prediction.get("predicted_peak_gib"), result.get("max_allocated_gib")
    if predicted and measured:
        result["measured_over_predicted"] = measured / predicted


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case within the time budget; the report as a dict."""
    from naruto_lora.util.devices import resolve_device

    started = time.perf_counter()
    device = torch.device("cpu") if args.cpu_smoke else resolve_device(args.device)
    out_dir = Path(args.out)
    cases = plan_cases(args)
    work = Path(tempfile.mkdtemp(prefix="nlora-gpu-check-"))
    settings = base_settings(args, work)
    jobs = 0 if args.cpu_smoke else args.planner_jobs
    predictions = Predictions(cases, settings, jobs)
    peak_tflops, peak_note = device_peak_tflops(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: list[dict[str, Any]] = []
    try:
        for case in cases:
            entry: dict[str, Any] = {"case": asdict(case)}
            left = args.budget_s - (time.perf_counter() - started)
            reason = missing_needs(case, device, args)
            if reason is None and left < max(case.min_budget_s, 10.0):
                reason = f"time budget: {left:.0f} s left of --budget-s {args.budget_s:.0f}"
            if reason is not None:
                entry["skipped"] = reason
            else:
                print(f"[gpu_check] {case.label} ...", file=sys.stderr, flush=True)
                measure = script_extra_work if case.kind == "script" else run_case
                try:
                    entry["result"] = measure(case, args, device, work)
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                    entry["traceback"] = traceback.format_exc()
                    reset_memory(device)
            results.append(entry)
        for entry in results:
            if entry["case"]["kind"] == "profile" and "result" in entry:
                prediction = predictions.get(entry["case"]["label"])
                add_planner_figures(entry["result"], prediction, peak_tflops)
    finally:
        predictions.close()
    add_ratios(results, peak_tflops)
    report = {
        "machine": machine(),
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "device": str(device),
        "device_peak_tflops": peak_tflops,
        "device_peak_note": peak_note,
        "budget_s": args.budget_s,
        "elapsed_s": time.perf_counter() - started,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cases": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(markdown(report))
    return report


def add_ratios(results: list[dict[str, Any]], peak_tflops: float | None) -> None:
    """Each variant against its profile's default in the same run: the speed-up (default s per
    update / variant's) and, with the default's FLOPs, its own TFLOP/s."""
    by_label = {e["case"]["label"]: e for e in results}
    for entry in results:
        base = by_label.get(entry["case"]["baseline"] or "")
        if "result" not in entry or base is None or "result" not in base:
            continue
        mine, theirs = entry["result"], base["result"]
        if entry["case"]["kind"] == "script":
            # the script's update: the same UNet step plus the VAE and text encoders
            for extra in mine["by_vae_dtype"].values():
                extra["ours_step_s"] = theirs["step_s"]
                extra["script_step_s"] = theirs["step_s"] + extra["step_s"]
                extra["ours_over_script"] = theirs["step_s"] / extra["script_step_s"]
            continue
        mine["speedup_vs_default"] = theirs["step_s"] / mine["step_s"]
        mine["first_loss_vs_default"] = mine["losses"][0] - theirs["losses"][0]
        flops = theirs.get("flops_per_update")
        if flops:
            mine["achieved_tflops"] = flops / mine["step_s"] / 1e12
            if peak_tflops:
                mine["fraction_of_peak"] = mine["achieved_tflops"] / peak_tflops


def failed(report: dict[str, Any]) -> list[str]:
    bad = []
    for entry in report["cases"]:
        label = entry["case"]["label"]
        if "error" in entry:
            bad.append(f"{label}: {entry['error']}")
        elif "result" in entry and not entry["result"]["finite"]:
            bad.append(f"{label}: non-finite loss {entry['result']['losses']}")
    return bad


# ------------------------------------------------------------------------------ the report


def _f(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = m.get("gpu") or {}
    lines = [
        f"# GPU check ({report['mode']}), {m['date']}",
        "",
        f"Device: {gpu.get('name') or report['device']} ({gpu.get('memory_gib', '-')} GiB); "
        f"CPU {m['cpu']} x{m['cpu_cores']}; torch {m['torch']}, diffusers {m['diffusers']}. "
        f"Peak for '% peak': {_f(report['device_peak_tflops'], 1)} TFLOP/s "
        f"({report['device_peak_note']}). Took {report['elapsed_s']:.0f} s. "
        f"Clock: {_clock(report)}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "## Profiles (steady state, median seconds per optimizer update)",
        "",
        "| profile | px | batch x accum | dtype | s/update | images/s | max allocated GiB "
        "| max reserved GiB | predicted GiB | allocated / predicted | TFLOP/update | TFLOP/s "
        "| % of peak | LoRA params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["cases"]:
        if entry["case"]["kind"] != "profile":
            continue
        r = entry.get("result")
        if r is None:
            lines.append(f"| {entry['case']['label']} | {_why(entry)} |" + " |" * 12)
            continue
        lines.append(
            f"| {entry['case']['label']} | {r['resolution']} | {r['batch_size']} x "
            f"{r['accumulation']} | {r['precision']} | {_f(r['step_s'], 4)} | "
            f"{_f(r['images_per_s'], 2)} | {_f(r['max_allocated_gib'], 2)} | "
            f"{_f(r['max_reserved_gib'], 2)} | {_f(r.get('predicted_peak_gib'), 2)} | "
            f"{_f(r.get('measured_over_predicted'), 3)} | "
            f"{_f(r.get('flops_per_update'), 2, 1e-12)} | {_f(r.get('achieved_tflops'), 2)} | "
            f"{_f(r.get('fraction_of_peak'), 1, 100)} | {r['lora_parameters']:,} |"
        )
    lines += [
        "",
        "## Speed variants (ratio to the profile's default in this run; > 1 is faster)",
        "",
        "| variant | s/update | speed-up | TFLOP/s | % of peak | attention kernel "
        "| first loss - default's |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in report["cases"]:
        if entry["case"]["kind"] != "variant":
            continue
        r = entry.get("result")
        if r is None:
            lines.append(f"| {entry['case']['label']} | {_why(entry)} | | | | | |")
            continue
        lines.append(
            f"| {entry['case']['label']} | {_f(r['step_s'], 4)} | "
            f"x{_f(r.get('speedup_vs_default'), 3)} | {_f(r.get('achieved_tflops'), 2)} | "
            f"{_f(r.get('fraction_of_peak'), 1, 100)} | "
            f"{', '.join(r['attention_kernels'] or ['(default processor)'])} | "
            f"{_f(r.get('first_loss_vs_default'), 6)} |"
        )
    for entry in report["cases"]:
        if entry["case"]["kind"] != "script":
            continue
        r = entry.get("result")
        lines += [
            "",
            "## Against diffusers' train_text_to_image_lora_sdxl.py (its extra work measured)",
            "",
            "| case | script's VAE | VAE encode + text encoders s/update | TFLOP/update "
            "| TFLOP/s | our s/update | script's s/update | ours / script |",
            "|---|---|---|---|---|---|---|---|",
        ]
        if r is None:
            lines.append(f"| {entry['case']['label']} | {_why(entry)} | | | | | | |")
            continue
        for vae_dtype, x in r["by_vae_dtype"].items():
            how = "(its default)" if vae_dtype == "float32" else "(a separate fp16-safe VAE)"
            lines.append(
                f"| {entry['case']['label']} | {vae_dtype} {how} | {_f(x['step_s'], 4)} | "
                f"{_f(x['tflop_per_update'], 4)} | {_f(x['achieved_tflops'], 2)} | "
                f"{_f(x.get('ours_step_s'), 4)} | {_f(x.get('script_step_s'), 4)} | "
                f"{_f(x.get('ours_over_script'), 3)} |"
            )
        lines += [
            "",
            "The script encodes every image with the VAE and runs both text encoders (in "
            f"{r['text_dtype']}) every step; our caches hold both. Its UNet step is the same "
            "computation as ours, so its update is ours plus the measured extra work.",
        ]
    lines += [
        "",
        "## Training paths (a few updates each; losses must be finite)",
        "",
        "| path | profile | dtype | optimizer | updates applied / skipped | losses "
        "| grad scale | finite |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["cases"]:
        if entry["case"]["kind"] != "path":
            continue
        r = entry.get("result")
        if r is None:
            lines.append(f"| {entry['case']['label']} | {_why(entry)} | | | | | | |")
            continue
        losses = ", ".join(f"{v:.4f}" for v in r["losses"])
        lines.append(
            f"| {entry['case']['label']} | {r['profile_name']} | {r['precision']} | "
            f"{r['optimizer']} | {r['updates_applied']} / {r['updates_skipped']} | {losses} | "
            f"{_f(r['grad_scale'], 0)} | {'yes' if r['finite'] else '**no**'} |"
        )
    bad = failed(report)
    lines += ["", "Failures: " + ("; ".join(bad) if bad else "none"), ""]
    return "\n".join(lines)


def _why(entry: dict[str, Any]) -> str:
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    return f"error: {entry.get('error', '?')}"


def _clock(report: dict[str, Any]) -> str:
    clocks = {e["result"]["clock"] for e in report["cases"] if "result" in e}
    return ", ".join(sorted(clocks)) or "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and .md")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profiles", nargs="+", default=None, help=f"default {PROFILES}")
    parser.add_argument("--variant-profile", default="14gb")
    parser.add_argument("--path-profile", default="8gb")
    parser.add_argument("--updates", type=int, default=None, help="timed updates per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed updates first")
    parser.add_argument("--path-updates", type=int, default=None)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="no case starts after this many seconds (GPU 400: the whole check < 8 min)",
    )
    parser.add_argument("--planner-jobs", type=int, default=3, help="planner processes (GPU)")
    parser.add_argument("--set", action="append", default=[], help="extra setting, every case")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.profiles = args.profiles or list(PROFILES)
    args.updates = args.updates or (2 if smoke else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.path_updates = args.path_updates or (2 if smoke else 4)
    args.budget_s = args.budget_s or (110.0 if smoke else 400.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NLORA_NO_PROGRESS", "1")
    with contextlib.redirect_stdout(sys.stderr):  # the library's console lines
        report = check(args)
    print(markdown(report))
    bad = failed(report)
    for line in bad:
        print(f"[gpu_check] FAILED {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
