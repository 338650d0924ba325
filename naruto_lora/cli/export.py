"""``nlora export``: the LoRA for ComfyUI / AUTOMATIC1111 / Forge (kohya), diffusers, peft, or a
merged model, each file loaded back and checked before it is put in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from naruto_lora.cli.common import profile_options
from naruto_lora.cli.lora_source import lora_options, resolve_lora_source
from naruto_lora.export.writers import EXPORT_DTYPES, FORMATS


def _report(result: Any) -> None:
    from rich.table import Table

    from naruto_lora.util.console import console

    meta = result.metadata
    table = Table(show_header=False, box=None)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")  # hashes and paths in full
    rows = [
        ("written", str(result.path)),
        ("format", result.format),
        ("modules", str(result.modules)),
        ("rank / alpha", f"{meta.get('nlora.rank')} / {meta.get('nlora.alpha')}"),
        ("kind", "DoRA" if meta.get("nlora.use_dora") == "true" else "LoRA"),
        ("dtype", meta.get("nlora.dtype", "")),
        ("base model", meta.get("nlora.base_model", "")),
        ("weights sha256", meta.get("nlora.weights_sha256", "-")),
        ("checked with", ", ".join(result.loaders)),
        ("largest difference", f"{result.max_error:.1e} (relative)"),
    ]
    if result.format == "merged":
        rows.insert(2, ("LoRA scale", meta.get("nlora.lora_scale", "")))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(
        "[green]Exported and verified:[/] every LoRA module loaded and matches the training output."
    )
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]Note:[/] {note}")


@click.command("export")
@lora_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="kohya",
    show_default=True,
    help="kohya: one .safetensors for ComfyUI / A1111 / Forge / diffusers; diffusers: "
    "the training layout; peft: adapter folder; merged: a full pipeline folder.",
)
@click.option(
    "--out",
    required=True,
    metavar="PATH",
    help="A .safetensors file (kohya, diffusers) or a folder.",
)
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="LoRA strength fused in (--format merged).",
)
@click.option(
    "--dtype",
    "dtype_name",
    type=click.Choice(list(EXPORT_DTYPES)),
    default="fp16",
    show_default=True,
    help="Precision of the written weights.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace what is at --out (a file, or an earlier export folder of this format).",
)
@profile_options
@click.pass_context
def export_cmd(
    ctx: click.Context,
    fmt: str,
    out: str,
    scale: float,
    dtype_name: str,
    overwrite: bool,
    **kwargs: Any,
) -> None:
    """Write the trained LoRA in another format and verify it loads.

    \b
    nlora export --lora output/naruto --out naruto.safetensors            (ComfyUI, A1111)
    nlora export --lora output/naruto --ema --format diffusers --out naruto-diffusers
    nlora export --lora output/naruto --format merged --scale 0.8 --out naruto-sdxl
    """
    from naruto_lora.cli.sample import quiet_loading
    from naruto_lora.export.writers import export_lora

    lora_file, profile, run_profile = resolve_lora_source(ctx, kwargs)
    quiet_loading()
    result = export_lora(
        lora_file=lora_file,
        fmt=fmt,
        out=Path(out),
        model_cfg=profile.model,
        run_profile=run_profile,
        scale=scale,
        dtype_name=dtype_name,
        overwrite=overwrite,
    )
    _report(result)
