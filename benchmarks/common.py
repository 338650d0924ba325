"""Helpers shared by the benchmark scripts: the machine, device clocks and memory, peak FLOP
rates, and a full-size SDXL model folder with random weights (no download)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

# Dense fp16/bf16 tensor-core rates with fp32 accumulation (what PyTorch's matmuls use), TFLOP/s,
# from the vendors' data sheets; matched against torch.cuda.get_device_name() in this order.
GPU_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("A10G", 70.0),
    ("T4", 65.0),
    ("V100", 125.0),
)


def machine() -> dict[str, Any]:
    """What ran the benchmark, for the results file."""
    import diffusers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "omp_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gpu": None,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 2),
            "capability": f"{props.major}.{props.minor}",
        }
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds between marks. On a GPU: wall-clock, the device synchronised at each mark so GPU
    work is charged to the phase that queued it. On a CPU: this process's CPU time, so that other
    jobs on a shared machine do not count (``wall=True`` for wall-clock there too)."""

    def __init__(self, device: torch.device, wall: bool = False) -> None:
        self.device = device
        self.read = time.perf_counter if wall or device.type == "cuda" else time.process_time
        self.last = self.read()

    @property
    def kind(self) -> str:
        return "wall" if self.read is time.perf_counter else "process CPU"

    def lap(self) -> float:
        sync(self.device)
        now = self.read()
        elapsed, self.last = now - self.last, now
        return elapsed


class PeakMemory:
    """CUDA max allocated (and reserved) on a GPU; the largest sampled RSS on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if self.device.type != "cuda":
            import psutil

            self.rss = max(self.rss, psutil.Process().memory_info().rss)

    def report(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {
                "kind": "cuda_max_allocated",
                "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30,
            }
        self.sample()
        return {"kind": "rss", "peak_gib": self.rss / 2**30}


def device_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(TFLOP/s, what it is): the data-sheet rate of a known GPU, or on a CPU the fp32 GEMM rate
    measured here (a practical peak: there is no data sheet for a shared CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops, f"{name} data sheet, dense fp16/bf16"
        return None, f"{name}: peak unknown"
    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    runs = 16
    started = time.process_time()  # CPU time, like the CPU runs' clock
    for _ in range(runs):
        a @ b
    seconds = time.process_time() - started
    rate = 2 * size**3 * runs / seconds / 1e12
    return rate, f"measured fp32 GEMM on {torch.get_num_threads()} thread(s), per CPU second"


# ------------------------------------------------------------------------------ full-size SDXL

RANDOM_SDXL_VERSION = "1"


def random_sdxl_folder(root: Path) -> Path:
    """A diffusers folder with the published SDXL architecture and random weights in fp16 (the
    tiny model's tokenizer files stand in for CLIP's): built once, about 7 GB on disk."""
    from naruto_lora.util.io import atomic_dir

    folder = root / f"sdxl-random-v{RANDOM_SDXL_VERSION}"
    if (folder / ".complete").is_file():
        return folder
    with atomic_dir(folder) as tmp:
        _random_pipeline().save_pretrained(tmp, safe_serialization=True)
        (tmp / ".complete").write_text(RANDOM_SDXL_VERSION)
    return folder


def _initialised(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Materialise a meta module one submodule at a time with PyTorch's default initialisation,
    then cast it: only one layer is ever in fp32, so the 2.6 B UNet needs ~5 GB of RAM, not 15."""
    for sub in module.modules():
        sub.to_empty(device="cpu", recurse=False)
        own = list(sub.parameters(recurse=False))
        if own and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        else:
            for p in own:
                torch.nn.init.normal_(p, std=0.02)
        for p in own:
            p.data = p.data.to(dtype)
    return module


def _random_pipeline() -> Any:
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from naruto_lora.demo.tiny import write_tokenizer
    from naruto_lora.models import sdxl_configs

    configs = sdxl_configs.published_configs(fp16_fix_vae=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    modules = [_initialised(m, torch.float16) for m in (unet, vae, te1, te2)]
    for encoder in modules[2:]:
        # CLIP's position ids are a buffer that to_empty leaves uninitialised.
        for name, ids in encoder.named_buffers():
            if name.endswith("position_ids"):
                ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizers = [
            CLIPTokenizer(
                f"{tmp}/vocab.json",
                f"{tmp}/merges.txt",
                model_max_length=sdxl_configs.TOKENIZER_MAX_LENGTH,
            )
            for _ in range(2)
        ]
    return StableDiffusionXLPipeline(
        vae=modules[1],
        text_encoder=modules[2],
        text_encoder_2=modules[3],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=modules[0],
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
        add_watermarker=False,
    )


# ------------------------------------------------------------------------------ marginal step


def child_cpu_s(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    """Process CPU seconds (user + system) of one command and everything it waited for: on a
    shared machine the least disturbed measure of work done."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:6])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def marginal_steps(
    commands: dict[str, Any], short: int, long: int, repeat: int
) -> dict[str, dict[str, Any]]:
    """For each named command (a function of the step count returning its CPU seconds): the
    marginal seconds per step, (T(long) - T(short)) / (long - short), which cancels start-up,
    model loading and writing; runs interleaved (A short, A long, B short, B long, then again),
    so load from other jobs hits all alike; the least of ``repeat`` runs is reported."""
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, run in commands.items():
            t_short, t_long = run(short), run(long)
            runs[name].append((t_long - t_short) / (long - short))
            print(
                f"  {name}: T({short})={t_short:.2f} s, T({long})={t_long:.2f} s, "
                f"marginal {runs[name][-1]:.4f} s/step",
                flush=True,
            )
    return {name: {"step_s": min(values), "runs": values} for name, values in runs.items()}


# ------------------------------------------------------------------------------ the diffusers script's extra work


@torch.no_grad()
def encode_images_as_the_script(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """What diffusers' ``train_text_to_image_lora_sdxl.py`` does with every batch's images on
    every step (our latent cache holds the result)."""
    return vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts_as_the_script(encoders: Any, batch_size: int, device: Any = None) -> None:
    """Both text encoders on a full-length prompt, as the script runs them on every step (our
    text cache holds the result); which token ids does not change the work."""
    for encoder in encoders:
        length = encoder.config.max_position_embeddings
        ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        encoder(ids, output_hidden_states=True)
