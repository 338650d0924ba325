"""The ``nlora`` command line: one small module per subcommand."""

from __future__ import annotations

import os
import sys

import click

from naruto_lora import __version__
from naruto_lora.cli import cache, demo, doctor, export, plan, plugins_cmd, profiles, sample, train
from naruto_lora.cli.common import NloraGroup, run_guarded


@click.group(
    cls=NloraGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="nlora")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors too.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """naruto-lora: train SDXL LoRAs on small GPUs.

    \b
    Phases, in order:
      nlora doctor          check this machine and recommend a profile
      nlora cache latents   pre-encode images through the VAE
      nlora cache text      pre-encode captions through both CLIP encoders
      nlora train           train the UNet LoRA
      nlora sample          generate images with the LoRA
      nlora export          write the LoRA for ComfyUI / A1111 / diffusers, or merged

    Try it on a CPU with the built-in tiny model: nlora demo
    """
    from naruto_lora.util.console import quiet_torchao_logs

    quiet_torchao_logs()
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for command in (
    doctor.doctor,
    cache.cache,
    train.train_cmd,
    sample.sample_cmd,
    export.export_cmd,
    demo.demo,
    profiles.profiles,
    plugins_cmd.plugins,
    plan.plan,
):
    cli.add_command(command)


def _quiet_libraries(argv: list[str] | None) -> None:
    """diffusers/transformers log load bars and advisory warnings (e.g. about torchvision, which
    we do not use) that bury our own output; --debug keeps them."""
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        return
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ):
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries(argv)
    sys.exit(run_guarded(cli, argv))
