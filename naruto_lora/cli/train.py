"""``nlora train``: train the UNet LoRA of a profile."""

from __future__ import annotations

import shlex
import signal
from typing import Any

import click

from naruto_lora.cli.common import load_profile_from_options, profile_options


def _resume_command(profile_arg: str, profile: Any, processes: int = 1) -> str:
    args = ["nlora", "train", "--profile", profile_arg, "--output", profile.train.output_dir]
    if processes > 1:
        args += ["--num-processes", str(processes)]
    return " ".join(shlex.quote(a) for a in args) + " --resume latest"


def _launch(ctx: click.Context, num_processes: int, options: Any, kwargs: dict) -> int:
    """Re-run this command as N processes (see naruto_lora.train.launch)."""
    from naruto_lora.train.launch import check_process_count, forwarded_args, launch
    from naruto_lora.train.lock import output_lock_for
    from naruto_lora.train.setup import check_inputs
    from naruto_lora.util.console import console

    check_process_count(num_processes, options.device)
    # A bad --set, output folder or --resume fails here, once, rather than in every process.
    profile = load_profile_from_options(kwargs)
    with output_lock_for(profile):  # a folder in use by another run: said once, here
        check_inputs(profile, options, num_processes)
    train = profile.train
    console.print(
        f"Launching {num_processes} training processes through accelerate (effective batch "
        f"{num_processes} x {train.batch_size} x {train.gradient_accumulation_steps} = "
        f"{num_processes * train.batch_size * train.gradient_accumulation_steps})."
    )
    debug = ["--debug"] if (ctx.find_root().obj or {}).get("debug") else []
    args = [*debug, "train", *forwarded_args(ctx.command, ctx.params)]
    return launch(num_processes, args, options.device)


def _report_interrupted(result: Any, profile_arg: str, profile: Any, processes: int = 1) -> int:
    from rich.markup import escape

    from naruto_lora.util.console import err_console

    signum = (
        signal.Signals[result.interrupted]
        if result.interrupted in signal.Signals.__members__
        else signal.SIGINT
    )
    if not result.main_process:
        return 128 + int(signum)
    err_console.print(
        f"[yellow]Stopped by {result.interrupted} at step {result.global_step} "
        f"(epoch {result.epoch + 1}); checkpoint: {escape(str(result.checkpoint))}.[/]\n"
        "Resume with the same command plus --resume latest, e.g.\n"
        f"  {escape(_resume_command(profile_arg, profile, processes))}\n"
        "(repeat any --set / --enable / --disable options you gave, and launch with as many "
        "processes as before).",
        soft_wrap=True,
    )
    return 128 + int(signum)  # the shell's convention for "ended by signal N"


def _report_finished(result: Any) -> None:
    from rich.markup import escape

    from naruto_lora.util.console import console

    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    weights = ", ".join(str(p) for p in result.weights)
    console.print(
        f"[green]Trained {result.global_step} steps[/] (smoothed loss {loss}). "
        + escape(
            f"Weights: {weights}; model card: {result.output_dir / 'README.md'}; "
            f"loss curve: {result.output_dir / 'loss.png'}."
        ),
        soft_wrap=True,
    )


@click.command("train")
@profile_options
@click.option(
    "--resume",
    default=None,
    metavar="latest|PATH",
    help="Continue exactly from the newest checkpoint of the output folder, or from PATH.",
)
@click.option(
    "--resume-with-changes",
    is_flag=True,
    help="With --resume: apply settings that differ from the checkpoint's run (learning "
    "rate, steps, plugins, ...) from its step on, instead of refusing.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the naruto-lora run already in the output folder (its LoRA, checkpoints "
    "and samples).",
)
@click.option(
    "--no-auto-cache",
    is_flag=True,
    help="Fail if a cache is missing or stale instead of building it first.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N.",
)
@click.option(
    "--tensorboard", is_flag=True, help="Also log to OUTPUT/logs through accelerate's trackers."
)
@click.option(
    "--num-processes",
    "num_processes",
    type=int,
    default=1,
    show_default=True,
    metavar="N",
    help="Train as N processes on this machine (one per GPU; on a CPU, gloo), launched "
    "through accelerate. Effective batch: N x batch x accumulation.",
)
@click.pass_context
def train_cmd(
    ctx: click.Context,
    resume: str | None,
    resume_with_changes: bool,
    overwrite: bool,
    no_auto_cache: bool,
    device: str,
    tensorboard: bool,
    num_processes: int,
    **kwargs: Any,
) -> None:
    """Train the UNet LoRA of a profile: caches first (built if missing or stale), then the
    loop with the profile's plugins, checkpoints every train.checkpoint_every steps, and the
    LoRA in diffusers format, loss curve, samples and model card in the output folder.

    Ctrl-C or SIGTERM writes a checkpoint first; continue with --resume latest.
    Several GPUs: --num-processes N, or `accelerate launch -m naruto_lora train ...`.
    """
    from naruto_lora.train import TrainOptions, train

    profile_arg = kwargs["profile_name"]
    if resume_with_changes and not resume:
        from naruto_lora.util.errors import UserError

        raise UserError("--resume-with-changes needs --resume (latest or a checkpoint).")
    options = TrainOptions(
        resume=resume,
        auto_cache=not no_auto_cache,
        device=device,
        tensorboard=tensorboard,
        overwrite=overwrite,
        resume_with_changes=resume_with_changes,
    )
    if num_processes != 1:
        ctx.exit(_launch(ctx, num_processes, options, dict(kwargs)))
    profile = load_profile_from_options(kwargs)
    result = train(profile, options)
    if result.interrupted:
        ctx.exit(_report_interrupted(result, profile_arg, profile, result.processes))
    if result.main_process:
        _report_finished(result)
