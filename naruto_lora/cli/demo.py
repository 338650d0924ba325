"""``nlora demo``: the whole pipeline on the built-in tiny default, on a CPU, in minutes."""

from __future__ import annotations

import time

import click

from naruto_lora.util.errors import UserError


def _phases(
    profile: str,
    output: str,
    cache_dir: str,
    steps: int,
    prompts: tuple[str, ...],
    sample_steps: int,
    guidance: float,
    overwrite: bool = False,
) -> list:
    common = ["--profile", profile, "--output", output, "--cache-dir", cache_dir]
    compare = ["sample", *common, "--lora", output, "--compare", "--out", f"{output}/compare"]
    compare += ["--steps", str(sample_steps), "--guidance", str(guidance)]
    compare += ["--overwrite"] if overwrite else []
    for prompt in prompts:
        compare += ["--prompt", prompt]
    return [
        ("cache latents", ["cache", "latents", *common]),
        ("cache text", ["cache", "text", "--to-disk", *common]),
        (
            "train",
            ["train", *common, "--set", f"train.max_steps={steps}"]
            + (["--overwrite"] if overwrite else []),
        ),
        ("sample --compare", compare),
    ]


@click.command("demo")
@click.option(
    "--profile",
    "-p",
    "profile_name",
    default="tiny",
    show_default=True,
    help="Profile to run (the built-in tiny default needs no download).",
)
@click.option(
    "--output", default="nlora-output/tiny", show_default=True, help="Training output folder."
)
@click.option("--cache-dir", default="nlora-output/cache", show_default=True, help="Cache folder.")
@click.option("--steps", default=None, type=int, help="Optimizer steps (default: the profile's).")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="Prompts for the comparison grid (default: the profile's validation prompts).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier demo run in the output folder (else a finished one is kept and "
    "the train phase stops).",
)
@click.pass_context
def demo(
    ctx: click.Context,
    profile_name: str,
    output: str,
    cache_dir: str,
    steps: int | None,
    prompts: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Run cache latents -> cache text -> train -> sample --compare on the tiny default.

    Everything (the tiny SDXL-architecture model and the generated data set) is created
    locally on first use; nothing is downloaded.
    """
    from naruto_lora.plugins.manager import load_profile
    from naruto_lora.util.console import console

    profile = load_profile(profile_name)
    steps = steps or profile.train.max_steps
    prompts = prompts or profile.validation.prompts
    started = time.perf_counter()
    for label, args in _phases(
        profile_name,
        output,
        cache_dir,
        steps,
        prompts,
        profile.validation.num_inference_steps,
        profile.validation.guidance_scale,
        overwrite,
    ):
        command = ctx.find_root().command.get_command(ctx, args[0])  # type: ignore[attr-defined]
        if args[0] in ("cache",):
            command = command.get_command(ctx, args[1]) if command else None  # type: ignore[union-attr]
            args = args[1:]
        if command is None:
            console.print(f"[yellow]skip[/] {label}: this phase is not available in this build")
            continue
        console.rule(f"[bold]nlora {label}")
        phase_started = time.perf_counter()
        try:
            code = command.main(
                args=args[1:], prog_name=f"nlora {label}", standalone_mode=False, obj=ctx.obj
            )
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        if isinstance(code, int) and code != 0:
            raise UserError(
                f"demo: phase '{label}' failed (exit code {code}); see the message above."
            )
        console.print(f"[green]done[/] {label} in {time.perf_counter() - phase_started:.1f} s")
    console.rule()
    console.print(
        f"Demo finished in {time.perf_counter() - started:.0f} s. Outputs in [bold]{output}[/]: "
        "pytorch_lora_weights.safetensors, loss.png, samples/, compare/."
    )
