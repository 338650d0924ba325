"""``nlora train`` against the diffusers example script ``train_text_to_image_lora_sdxl.py`` on
the same tiny SDXL-architecture model, data and settings, in the marginal step.

    git show HEAD:examples/text_to_image/train_text_to_image_lora_sdxl.py > /tmp/diffusers_lora_sdxl.py
    python benchmarks/bench_vs_diffusers.py --script /tmp/diffusers_lora_sdxl.py

The script is not vendored: take it from the diffusers repository (a release matching the
installed diffusers). It needs torchvision and datasets; ``--pythonpath DIR`` adds a folder
(e.g. a torchvision installed with ``pip install --target``) for its runs only.

Both sides: the built-in tiny model (``nlora:tiny``) and data set (``nlora:tiny-shapes``),
``--resolution`` px centre crops, LoRA rank ``--rank`` on the UNet's to_q/to_k/to_v/to_out.0,
batch 1, no accumulation, fp32 on the CPU, AdamW at lr 1e-4, gradient clipping at 1, Min-SNR 5
and offset noise 0.1, no EMA, no validation, no checkpoints. The diffusers script runs the VAE
and both text encoders on every step (that is how it works); ``nlora train`` reads the latent
and text caches, built once before timing (``nlora cache``, as a user would).

Each run is a whole process timed in process CPU seconds; the marginal step
(T(long) - T(short)) / (long - short) cancels start-up, loading and saving; the two run
interleaved and the least of ``--repeat`` runs counts. Prints ours / theirs (goal: <= 0.5).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_cpu_s, machine, marginal_steps  # noqa: E402


def ours(args: argparse.Namespace, tmp: Path, steps: int) -> list[str]:
    out = tempfile.mkdtemp(prefix="nlora-", dir=tmp)
    cmd = [sys.executable, "-m", "naruto_lora", "train", "-p", "smoke", "--device", "cpu"]
    cmd += ["--output", out, "--cache-dir", str(tmp / "cache")]
    for setting in (
        f"data.resolution={args.resolution}",
        "data.center_crop=true",
        "data.random_flip=false",
        f"lora.rank={args.rank}",
        f"lora.alpha={args.rank}",
        "train.batch_size=1",
        "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-4",
        'train.lr_scheduler="constant"',
        "train.lr_warmup_steps=0",
        "train.max_grad_norm=1.0",
        f"train.max_steps={steps}",
        "train.epochs=100000",
        "train.seed=0",
        "validation.every_steps=0",
        "train.checkpoint_every=0",
        "plugins.min_snr.gamma=5.0",
        "plugins.offset_noise.strength=0.1",
    ):
        cmd += ["--set", setting]
    cmd += ["--enable", "min_snr", "--enable", "offset_noise", "--disable", "ema"]
    # diffusers loads every attention processor as AttnProcessor2_0 (PyTorch's kernel choice):
    # the same without our sdpa plugin.
    return cmd + ["--disable", "sdpa", "--disable", "gradient_checkpointing"]


def theirs(args: argparse.Namespace, tmp: Path, steps: int, model: str, data: str) -> list[str]:
    out = tempfile.mkdtemp(prefix="diffusers-", dir=tmp)
    return [
        sys.executable,
        str(args.script),
        "--pretrained_model_name_or_path",
        model,
        "--train_data_dir",
        data,
        "--caption_column",
        "text",
        "--resolution",
        str(args.resolution),
        "--center_crop",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--max_train_steps",
        str(steps),
        "--rank",
        str(args.rank),
        "--snr_gamma",
        "5",
        "--noise_offset",
        "0.1",
        "--learning_rate",
        "1e-4",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--max_grad_norm",
        "1.0",
        "--checkpointing_steps",
        "1000000",
        "--dataloader_num_workers",
        "0",
        "--mixed_precision",
        "no",
        "--seed",
        "0",
        "--output_dir",
        out,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", type=Path, required=True, help="diffusers' example script")
    parser.add_argument("--pythonpath", default="", help="extra import path for the script")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.script.is_file():
        raise SystemExit(f"--script {args.script}: no such file")
    from naruto_lora.models.loading import resolve_data, resolve_model

    model, data = resolve_model("nlora:tiny"), resolve_data("nlora:tiny-shapes")
    env = {**os.environ, "NLORA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script_env = dict(env)
    if args.pythonpath:
        script_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (args.pythonpath, env.get("PYTHONPATH", "")) if p
        )
    with tempfile.TemporaryDirectory(prefix="nlora-vs-diffusers-") as name:
        tmp = Path(name)
        child_cpu_s(ours(args, tmp, 1), env)  # build our caches once, untimed
        result = marginal_steps(
            {
                "nlora train": lambda n: child_cpu_s(ours(args, tmp, n), env),
                "diffusers script": lambda n: child_cpu_s(
                    theirs(args, tmp, n, model, data), script_env
                ),
            },
            args.short,
            args.long,
            args.repeat,
        )
    mine, other = result["nlora train"]["step_s"], result["diffusers script"]["step_s"]
    print(
        f"marginal step, process CPU s (least of {args.repeat}): nlora train {mine:.4f}, "
        f"diffusers script {other:.4f}: ratio {mine / other:.2f} (goal <= 0.5)"
    )
    print(f"runs: {result}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
