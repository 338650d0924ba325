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

Speed variants (``--variant``, repeatable; each is the profile setting in VARIANT_SETTINGS, which
the loop applies): the compile, channels_last and tf32 plugins, bf16.
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

VARIANTS = ("compile", "channels_last", "tf32", "bf16")


def wall_clock() -> bool:
    """Workers time in wall-clock seconds when asked to (``--wall-clock``), else CPU time on a
    CPU (see ``common.Clock``)."""
    return os.environ.get("NLORA_BENCH_WALL") == "1"


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


# ------------------------------------------------------------------------------ our loop


VARIANT_SETTINGS = {
    "compile": "plugins.compile.enabled=true",
    "channels_last": "plugins.channels_last.enabled=true",
    "tf32": "plugins.tf32.enabled=true",
    "bf16": 'train.mixed_precision="bf16"',
}


def with_variants(overrides: list[str], variants: list[str]) -> list[str]:
    """Each speed variant is a profile setting that the training loop applies itself."""
    return overrides + [VARIANT_SETTINGS[v] for v in variants]


def time_our_loop(profile: Any, device: str, updates: int, warmup: int) -> dict[str, Any]:
    """The body of ``train.loop.train_loop`` with a clock around each phase (no logging,
    validation samples or checkpoints)."""
    from naruto_lora.train.loop import start
    from naruto_lora.train.setup import TrainOptions, setup_run

    run = setup_run(profile, TrainOptions(device=device))
    memory = PeakMemory(run.state.device)
    start(run)
    timings = Timings()
    clock = Clock(run.state.device, wall=wall_clock())
    skipped = timed_updates(run, timings, warmup + updates, clock, memory)
    images = profile.train.batch_size * profile.train.gradient_accumulation_steps
    out = timings.summary(warmup, images)
    out.update(memory.report(), skipped_updates=skipped, clock=clock.kind)
    return out


def timed_updates(run: Any, timings: Timings, total: int, clock: Clock, memory: PeakMemory) -> int:
    """Run ``total`` optimizer updates; return how many were skipped (non-finite)."""
    from naruto_lora.train.loop import Window, compute_loss, micro_batches, optimizer_update

    skipped, current, window = 0, timings.new_update(), Window()
    with contextlib.closing(micro_batches(run)) as batches:
        for _position, batch, _wait in batches:
            current["data_wait_s"] += clock.lap()
            with run.accelerator.accumulate(run.model):
                loss = compute_loss(run, batch)
                current["forward_s"] += clock.lap()
                window.record(loss, batch)
                if run.accelerator.sync_gradients and hasattr(window, "agree"):
                    window.agree(run.accelerator)
                if window.finite:
                    run.accelerator.backward(loss)
                current["backward_s"] += clock.lap()
            memory.sample()
            if not run.accelerator.sync_gradients:
                continue
            update = optimizer_update(run, window)
            if update.applied:
                run.pm.hook.nlora_after_optimizer_step(state=run.state)
            skipped += not update.applied
            current["optimizer_s"] += clock.lap()
            if len(timings.updates) >= total:
                return skipped
            current, window = timings.new_update(), Window()
    return skipped


# ------------------------------------------------------------------------------ reference loop


@dataclass
class Reference:
    """A plain SDXL LoRA training setup: every model on the device, no caches."""

    tokenizers: tuple[Any, Any]
    encoders: tuple[Any, Any]
    vae: Any
    unet: Any
    scheduler: Any
    optimizer: Any
    params: list[torch.nn.Parameter]
    images: list[Any]
    captions: list[str]
    device: torch.device
    dtype: torch.dtype
    autocast: torch.dtype | None


def load_reference(profile: Any, device: torch.device) -> Reference:
    """Every model from the profile's model folder onto the device, the LoRA on the UNet, and
    AdamW with the profile's settings (fused on CUDA, as ours)."""
    from diffusers import DDPMScheduler

    from naruto_lora.models.loading import resolve_model
    from naruto_lora.util.devices import DTYPES

    folder = resolve_model(profile.model.pretrained)
    mixed = profile.train.mixed_precision if device.type == "cuda" else "no"
    dtype = DTYPES[mixed]
    tokenizers, encoders, vae = reference_conditioning(folder, dtype, device)
    unet, params = reference_unet(profile, folder, dtype, device)
    t = profile.train
    optimizer = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
        fused=device.type == "cuda",
    )
    images, captions = read_imagefolder(profile)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    autocast = None if mixed == "no" else dtype
    return Reference(
        tokenizers,
        encoders,
        vae,
        unet,
        scheduler,
        optimizer,
        params,
        images,
        captions,
        device,
        dtype,
        autocast,
    )


def reference_conditioning(folder: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """Both tokenizers and text encoders, and the VAE (fp32 when it is not fp16-safe)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = tuple(
        CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")
    )
    encoders = (
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
        CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", torch_dtype=dtype
        ),
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    vae_dtype = torch.float32 if (dtype == torch.float16 and vae.config.force_upcast) else dtype
    for model in (*encoders, vae):
        model.requires_grad_(False)
        model.to(device)
    return tokenizers, encoders, vae.to(device, vae_dtype)


def reference_unet(profile: Any, folder: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """The frozen UNet with the profile's LoRA (fp32) and gradient checkpointing if it asks."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    unet.requires_grad_(False)
    lora = profile.lora
    unet.add_adapter(
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            init_lora_weights="gaussian",
            target_modules=list(lora.target_modules),
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    checkpointing = profile.plugins.get("gradient_checkpointing")
    if checkpointing is not None and checkpointing.enabled:
        unet.enable_gradient_checkpointing()
    return unet.to(device), params


def read_imagefolder(profile: Any) -> tuple[list[Any], list[str]]:
    """The images (decoded once, as PIL) and captions of an imagefolder data set."""
    from PIL import Image

    from naruto_lora.models.loading import resolve_data

    folder = Path(resolve_data(profile.data.source))
    rows = [
        json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line
    ]
    if profile.data.max_items:
        rows = rows[: profile.data.max_items]
    images = [Image.open(folder / r["file_name"]).convert("RGB") for r in rows]
    return images, [r[profile.data.caption_column] for r in rows]


def pixels(images: list[Any], size: int) -> torch.Tensor:
    """Resize the short side, centre-crop, scale to [-1, 1]: the usual SDXL preprocessing."""
    import numpy as np

    out = []
    for image in images:
        scale = size / min(image.size)
        image = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        )
        left, top = (image.width - size) // 2, (image.height - size) // 2
        array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
        out.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def reference_loss(
    ref: Reference, images: list[Any], captions: list[str], size: int
) -> torch.Tensor:
    """VAE and both text encoders on this batch, then the UNet: no caches anywhere."""
    with torch.no_grad():
        pixel_values = pixels(images, size).to(ref.device, ref.vae.dtype)
        latents = ref.vae.encode(pixel_values).latent_dist.sample().float()
        latents = latents * ref.vae.config.scaling_factor
        hidden, pooled = [], None
        for tokenizer, encoder in zip(ref.tokenizers, ref.encoders, strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(ref.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        embeds = torch.cat(hidden, dim=-1)
    noise = torch.randn_like(latents)
    steps = ref.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=ref.device)
    noisy = ref.scheduler.add_noise(latents, noise, timesteps)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * latents.shape[0], device=ref.device)
    autocast = (
        torch.autocast(ref.device.type, dtype=ref.autocast)
        if ref.autocast
        else contextlib.nullcontext()
    )
    with autocast:
        prediction = ref.unet(
            noisy.to(ref.dtype),
            timesteps,
            embeds.to(ref.dtype),
            added_cond_kwargs={
                "text_embeds": pooled.to(ref.dtype),
                "time_ids": time_ids.to(ref.dtype),
            },
        ).sample
    return torch.nn.functional.mse_loss(prediction.float(), noise.float())


def time_reference_loop(
    profile: Any, device_name: str, updates: int, warmup: int
) -> dict[str, Any]:
    from naruto_lora.util.devices import resolve_device

    device = resolve_device(device_name)
    torch.manual_seed(profile.train.seed)
    ref = load_reference(profile, device)
    memory, clock, timings = PeakMemory(device), Clock(device, wall=wall_clock()), Timings()
    batch, accumulation = profile.train.batch_size, profile.train.gradient_accumulation_steps
    order = torch.randperm(len(ref.images)).tolist()
    position = 0
    clock.lap()
    for _ in range(warmup + updates):
        current = timings.new_update()
        for _micro in range(accumulation):
            picks = [order[(position + i) % len(order)] for i in range(batch)]
            position += batch
            images, captions = [ref.images[i] for i in picks], [ref.captions[i] for i in picks]
            current["data_wait_s"] += clock.lap()
            loss = reference_loss(ref, images, captions, profile.data.resolution) / accumulation
            current["forward_s"] += clock.lap()
            loss.backward()
            current["backward_s"] += clock.lap()
            memory.sample()
        torch.nn.utils.clip_grad_norm_(ref.params, profile.train.max_grad_norm or float("inf"))
        ref.optimizer.step()
        ref.optimizer.zero_grad(set_to_none=True)
        current["optimizer_s"] += clock.lap()
    out = timings.summary(warmup, batch * accumulation)
    out.update(memory.report(), skipped_updates=0, clock=clock.kind)
    return out


# ------------------------------------------------------------------------------ the runs


def run_overrides(tmp: Path, label: str, updates: int) -> list[str]:
    """Every benchmark run: its own folders, no validation samples or checkpoints, data that
    does not run out."""
    return [
        "validation.every_steps=0",
        "train.checkpoint_every=0",
        f'train.output_dir="{tmp / ("out-" + label)}"',
        f'cache.dir="{tmp / ("cache-" + label)}"',
        f"train.max_steps={updates + 5}",
        "train.epochs=10000",
    ]


def planned(profile: Any, device: torch.device) -> tuple[float, float]:
    """(UNet TFLOP per optimizer update, predicted tracked peak GiB) from the planner."""
    from naruto_lora.plan.core import SimTarget
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plan.sim import simulate_training

    target = SimTarget("cuda" if device.type == "cuda" else "cpu", fake=True)
    sim = simulate_training(
        profile, load_model_configs(profile.model), target=target, validation=False
    )
    updates = profile.train.gradient_accumulation_steps
    return sim.flops_per_micro_step * updates / 1e12, sim.training.peak_bytes / 2**30


def bench_one(
    label: str,
    profile_name: str,
    overrides: list[str],
    args: argparse.Namespace,
    peak: float | None,
    updates: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Both loops for one configuration, each in a fresh process (clean memory statistics)."""
    from naruto_lora.plugins.manager import load_profile
    from naruto_lora.util.devices import resolve_device

    profile = load_profile(profile_name, overrides=overrides)
    device = resolve_device(args.device)
    tflop, predicted = planned(profile, device)
    loops = ["ours"] + ([] if args.no_reference else ["reference"])
    results: dict[str, list[dict[str, Any]]] = {loop: [] for loop in loops}
    for _ in range(args.repeat):  # alternating, so load from other processes hits both alike
        for loop in loops:
            spec = {
                "profile": profile_name,
                "overrides": overrides,
                "loop": loop,
                "device": args.device,
                "updates": updates,
                "warmup": warmup,
                "variants": args.variant,
            }
            results[loop].append(run_worker(spec))
    rows = []
    for loop in loops:
        result = median_run(results[loop])
        achieved = tflop / result["step_s"]
        rows.append(
            {
                "config": label,
                "profile": profile.name,
                "loop": loop,
                "variants": args.variant if loop == "ours" else [],
                "device": device.type,
                "resolution": profile.data.resolution,
                "batch_size": profile.train.batch_size,
                "accumulation": profile.train.gradient_accumulation_steps,
                "precision": profile.train.mixed_precision if device.type == "cuda" else "fp32",
                **result,
                "unet_tflop_per_update": tflop,
                "achieved_tflops": achieved,
                "fraction_of_peak": None if peak is None else achieved / peak,
                "predicted_peak_gib": predicted if device.type == "cuda" else None,
            }
        )
    return rows


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median step time, with the spread of all of them."""
    ordered = sorted(runs, key=lambda r: r["step_s"])
    out = dict(ordered[len(ordered) // 2])
    out["step_s_all"] = [round(r["step_s"], 5) for r in runs]
    return out


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"benchmark worker failed ({spec['loop']}, {spec['profile']}): exit {done.returncode}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(spec: dict[str, Any]) -> None:
    """One loop of one configuration; prints its result as the last line of stdout."""
    import transformers

    from naruto_lora.plugins.manager import load_profile

    transformers.utils.logging.disable_progress_bar()
    profile = load_profile(spec["profile"], overrides=spec["overrides"])
    with contextlib.redirect_stdout(sys.stderr):
        if spec["loop"] == "ours":
            result = time_our_loop(profile, spec["device"], spec["updates"], spec["warmup"])
        else:
            result = time_reference_loop(profile, spec["device"], spec["updates"], spec["warmup"])
    print(json.dumps(result))


def tiny_runs(tmp: Path, args: argparse.Namespace) -> list[tuple[str, str, list[str], int, int]]:
    updates, warmup = args.updates or 20, args.warmup if args.warmup is not None else 3
    overrides = with_variants(run_overrides(tmp, "smoke", updates + warmup), args.variant)
    return [("tiny", "tiny", overrides, updates, warmup)]


def sdxl_runs(
    tmp: Path, args: argparse.Namespace, home: Path
) -> list[tuple[str, str, list[str], int, int]]:
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    names = args.profile or (["14gb", "12gb", "8gb"] if on_gpu else ["8gb"])
    updates = args.updates or (10 if on_gpu else 2)
    warmup = (
        args.warmup
        if args.warmup is not None
        else ((5 if "compile" in args.variant else 3) if on_gpu else 1)
    )
    folder = random_sdxl_folder(home / "bench")
    runs = []
    for name in names:
        overrides = run_overrides(tmp, f"sdxl-{name}", updates + warmup) + [
            f'model.pretrained="{folder}"',
            'model.vae=""',
            'data.source="nlora:tiny-shapes"',
            f"data.max_items={args.max_items}",
        ]
        if not on_gpu:
            overrides.append(f"data.resolution={args.cpu_resolution}")
        label = f"sdxl-{'gpu' if on_gpu else 'cpu'}"
        runs.append((label, name, with_variants(overrides, args.variant), updates, warmup))
    return runs


# ------------------------------------------------------------------------------ output


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our loop's speed-up over the reference loop, per configuration (the headline number)."""
    out = []
    for ours in (r for r in rows if r["loop"] == "ours"):
        ref = next(
            (
                r
                for r in rows
                if r["loop"] == "reference"
                and r["config"] == ours["config"]
                and r["profile"] == ours["profile"]
            ),
            None,
        )
        if ref is not None:
            out.append(
                {
                    "config": ours["config"],
                    "profile": ours["profile"],
                    "speedup": ref["step_s"] / ours["step_s"],
                    "ours_runs": ours["step_s_all"],
                    "reference_runs": ref["step_s_all"],
                }
            )
    return out


def print_table(rows: list[dict[str, Any]], info: dict[str, Any], peak_note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    clocks = sorted({r.get("clock", "wall") for r in rows})
    table = Table(
        title="Training speed (steady state, medians per optimizer update; "
        f"seconds of {', '.join(clocks)} time)"
    )
    columns = "config profile loop px batch step_s img/s data_s fwd_s bwd_s opt_s peak_GiB "
    columns += "pred._GiB TFLOP/upd TFLOP/s %_peak"
    for name in columns.split():
        justify = "left" if name in ("config", "profile", "loop") else "right"
        table.add_column(name.replace("_", " "), justify=justify)
    for r in rows:
        frac = "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}"
        pred = "-" if r["predicted_peak_gib"] is None else f"{r['predicted_peak_gib']:.2f}"
        table.add_row(
            r["config"],
            r["profile"],
            r["loop"] + ("+" + ",".join(r["variants"]) if r["variants"] else ""),
            str(r["resolution"]),
            f"{r['batch_size']}x{r['accumulation']}",
            f"{r['step_s']:.3f}",
            f"{r['images_per_s']:.2f}",
            *(f"{r[p]:.3f}" for p in PHASES),
            f"{r['peak_gib']:.2f} ({'RSS' if r['kind'] == 'rss' else 'CUDA'})",
            pred,
            f"{r['unet_tflop_per_update']:.3f}",
            f"{r['achieved_tflops']:.3f}",
            frac,
        )
    console = Console(width=200)
    console.print(table)
    for s in speedups(rows):
        console.print(
            f"Speed-up of our loop over the reference loop ({s['config']}, {s['profile']}): "
            f"[bold]x{s['speedup']:.2f}[/] (step s of each run: ours {s['ours_runs']}, "
            f"reference {s['reference_runs']})"
        )
    console.print(f"Peak rate for '% peak': {peak_note}. Machine: {info}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        choices=("tiny", "sdxl"),
        help="default: tiny, plus sdxl when a GPU is present",
    )
    parser.add_argument(
        "--profile",
        action="append",
        help="sdxl profiles (default 14gb 12gb 8gb on a GPU, 8gb on a CPU)",
    )
    parser.add_argument("--updates", type=int, default=None, help="timed optimizer updates")
    parser.add_argument("--warmup", type=int, default=None, help="untimed updates first")
    parser.add_argument("--variant", action="append", default=[], choices=VARIANTS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-resolution", type=int, default=128)
    parser.add_argument("--max-items", type=int, default=16)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each loop (alternating); the median run is reported",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--wall-clock",
        action="store_true",
        help="on a CPU, time in wall-clock seconds instead of process CPU time",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from naruto_lora.util.devices import resolve_device
    from naruto_lora.util.home import nlora_home

    args = parse_args(argv)
    os.environ.setdefault("NLORA_NO_PROGRESS", "1")
    if args.wall_clock:
        os.environ["NLORA_BENCH_WALL"] = "1"  # inherited by the workers
    if args.worker:
        worker(json.loads(args.worker))
        return
    configs = args.config or (["tiny", "sdxl"] if torch.cuda.is_available() else ["tiny"])
    peak, peak_note = device_peak_tflops(resolve_device(args.device))
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="nlora-bench-") as tmp_name,
        contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout),
    ):
        tmp = Path(tmp_name)
        runs = (tiny_runs(tmp, args) if "tiny" in configs else []) + (
            sdxl_runs(tmp, args, nlora_home()) if "sdxl" in configs else []
        )
        for label, name, overrides, updates, warmup in runs:
            rows += bench_one(label, name, overrides, args, peak, updates, warmup)
    info = machine()
    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "device_peak_tflops": peak,
                    "device_peak_note": peak_note,
                    "runs": rows,
                    "speedups": speedups(rows),
                },
                indent=2,
            )
        )
    else:
        print_table(rows, info, peak_note)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    if "--worker" not in sys.argv:
        print(f"[bench_train took {time.perf_counter() - started:.0f} s]", file=sys.stderr)
