"""What the plugins cost per step: ``nlora train`` with the ``tiny`` profile's plugins (EMA,
Min-SNR, offset noise, SDPA) against the same run with none, on a tiny SDXL-architecture model.

    python benchmarks/bench_plugins.py                 # 128 px, rank 16, batch 1, fp32, CPU
    python benchmarks/bench_plugins.py --repeat 3 --short 20 --long 60

Two measurements, both in process CPU seconds (the least disturbed clock on a shared machine):

* ``--method marginal`` (issue 12's): each run is a whole ``nlora train`` process; the marginal
  step (T(long) - T(short)) / (long - short) cancels start-up, loading and writing; the two
  settings run interleaved and the least of ``--repeat`` runs counts. Start-up varies by
  seconds on a busy machine, so this needs long runs to resolve a few per cent.
* ``--method steps`` (default): the training loop's own pieces in a worker process
  (``bench_train.time_our_loop``), the median CPU seconds of ``--long`` updates after warm-up;
  the two settings alternate ``--repeat`` times and the median of the runs counts. No start-up
  in the figure at all.

The goal (issue 12): the plugins add at most 10 % to the plain step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_cpu_s, machine, marginal_steps  # noqa: E402

PLUGINS = ("ema", "min_snr", "offset_noise", "sdpa")


def train_command(args: argparse.Namespace, tmp: Path, steps: int, plugins: bool) -> list[str]:
    out = tempfile.mkdtemp(prefix="out-", dir=tmp)
    cmd = [sys.executable, "-m", "naruto_lora", "train", "-p", "smoke", "--device", "cpu"]
    cmd += ["--output", out, "--cache-dir", str(tmp / "cache")]
    for setting in (
        f"data.resolution={args.resolution}",
        f"lora.rank={args.rank}",
        f"lora.alpha={args.rank}",
        "train.batch_size=1",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={steps}",
        "train.epochs=100000",
        "validation.every_steps=0",
        "train.checkpoint_every=0",
        *args.set,
    ):
        cmd += ["--set", setting]
    for name in PLUGINS:
        cmd += ["--enable" if plugins else "--disable", name]
    return cmd


def loop_settings(args: argparse.Namespace, tmp: Path, plugins: bool) -> list[str]:
    settings = [
        f"data.resolution={args.resolution}",
        f"lora.rank={args.rank}",
        f"lora.alpha={args.rank}",
        "train.batch_size=1",
        "train.gradient_accumulation_steps=1",
        "validation.every_steps=0",
        "train.checkpoint_every=0",
        f'train.output_dir="{tmp / ("out-" + str(plugins))}"',
        f'cache.dir="{tmp / "cache"}"',
        f"train.max_steps={args.long + 20}",
        "train.epochs=100000",
        *args.set,
    ]
    return settings + [f"plugins.{name}.enabled={str(plugins).lower()}" for name in PLUGINS]


def in_process_steps(args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    import statistics

    from bench_train import run_worker

    runs: dict[str, list[float]] = {"no plugins": [], "tiny's plugins": []}
    for _ in range(args.repeat):
        for name, plugins in (("no plugins", False), ("tiny's plugins", True)):
            spec = {
                "profile": "smoke",
                "overrides": loop_settings(args, tmp, plugins),
                "loop": "ours",
                "device": "cpu",
                "updates": args.long,
                "warmup": 5,
                "variants": [],
            }
            runs[name].append(run_worker(spec)["step_s"])
            print(f"  {name}: median {runs[name][-1]:.4f} s/step", flush=True)
    return {k: {"step_s": statistics.median(v), "runs": v} for k, v in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra profile setting")
    parser.add_argument("--method", choices=("steps", "marginal"), default="steps")
    args = parser.parse_args(argv)
    env = {**os.environ, "NLORA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="nlora-bench-plugins-") as name:
        tmp = Path(name)
        child_cpu_s(train_command(args, tmp, 1, True), env)  # build the caches once

        def runner(plugins: bool):
            return lambda steps: child_cpu_s(train_command(args, tmp, steps, plugins), env)

        if args.method == "steps":
            result = in_process_steps(args, tmp)
        else:
            result = marginal_steps(
                {"no plugins": runner(False), "tiny's plugins": runner(True)},
                args.short,
                args.long,
                args.repeat,
            )
    plain, full = result["no plugins"]["step_s"], result["tiny's plugins"]["step_s"]
    how = "marginal step (least" if args.method == "marginal" else "step (median"
    print(
        f"{how} of {args.repeat} runs), process CPU s: no plugins {plain:.4f}, "
        f"tiny's plugins ({', '.join(PLUGINS)}) {full:.4f}: overhead {100 * (full / plain - 1):+.1f} %"
    )
    print(f"runs: {result}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
