"""``nlora cache latents``, ``nlora cache text [--to-disk]`` and ``nlora cache info DIR``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from naruto_lora.cli.common import load_profile_from_options, profile_options


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def build_options(default_batch: int) -> Callable:
    """--device, --batch-size, --strict and the column names, shared by the build commands."""

    def wrap(func: Callable) -> Callable:
        options = [
            click.option(
                "--device",
                default="auto",
                show_default=True,
                help="Where to encode: auto (CUDA if present), cpu, cuda, cuda:N.",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=default_batch,
                show_default=True,
                help="Items per encoder call.",
            ),
            click.option(
                "--strict",
                is_flag=True,
                help="Fail if any item is unusable, instead of skipping and listing it.",
            ),
            click.option(
                "--image-column",
                default=None,
                help="Image column of a hub / datasets data set (data.image_column).",
            ),
            click.option(
                "--caption-column",
                default=None,
                help="Caption column or metadata.jsonl field (data.caption_column).",
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return wrap


def _profile(kwargs: dict[str, Any]):
    import json

    overrides = list(kwargs.get("overrides", ()))
    for option, key in (
        ("image_column", "data.image_column"),
        ("caption_column", "data.caption_column"),
    ):
        value = kwargs.pop(option, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    kwargs["overrides"] = tuple(overrides)
    return load_profile_from_options(kwargs)


def _print_report(report: Any, label: str) -> None:
    from rich.markup import escape

    from naruto_lora.cache import manifest
    from naruto_lora.util.console import console

    console.print(
        f"[bold]{label}[/] [green]ready[/] in {escape(str(report.folder))}: {report.reused} reused, "
        f"{report.encoded} encoded, {report.removed} removed, {report.repacked} moved "
        f"({report.seconds:.1f} s; {_human_bytes(manifest.size_on_disk(report.folder))} on disk)."
    )
    for name, problem in report.corrupt.items():
        console.print(f"[yellow]rebuilt[/] damaged shard {escape(name)} ({escape(problem)})")
    if report.skipped:
        console.print(
            f"[yellow]skipped {len(report.skipped)} item(s)[/] (listed in "
            f"{escape(str(report.folder / manifest.SKIPPED))}):"
        )
        for s in report.skipped[:10]:
            console.print(f"  {escape(s.source)}: {escape(s.reason)}")
        if len(report.skipped) > 10:
            console.print(f"  ... and {len(report.skipped) - 10} more")


@click.group("cache")
def cache() -> None:
    """Pre-encode the data set once: VAE latents and CLIP text embeddings."""


@cache.command("latents")
@profile_options
@build_options(default_batch=8)
def latents(device: str, batch_size: int, strict: bool, **kwargs: Any) -> None:
    """Encode every image through the profile's VAE into the latent cache.

    Re-running reuses what is valid, encodes what is new or changed, removes what no longer
    belongs, and resumes an interrupted run. Bad images are skipped and listed.
    """
    from naruto_lora.cache import ensure_latent_cache
    from naruto_lora.util.console import console

    profile = _profile(kwargs)
    if not profile.cache.latents:
        console.print(
            "[yellow]note:[/] this profile has cache.latents = false: training "
            "encodes images on the fly and will not read this cache."
        )
    result = ensure_latent_cache(profile, device=device, batch_size=batch_size, strict=strict)
    _print_report(result.report, f"Latent cache ({len(result)} entries)")


@cache.command("text")
@profile_options
@build_options(default_batch=16)
@click.option(
    "--to-disk",
    is_flag=True,
    help="Build the cache. Without it: only say what would be cached, and how big.",
)
def text(device: str, batch_size: int, strict: bool, to_disk: bool, **kwargs: Any) -> None:
    """Encode every distinct caption with both CLIP encoders into the text cache."""
    from naruto_lora.cache import ensure_text_cache
    from naruto_lora.util.console import console

    profile = _profile(kwargs)
    if profile.cache.text != "disk":
        console.print(
            "[yellow]note:[/] this profile has cache.text = 'memory': training "
            "encodes captions on the fly; add --set cache.text=disk to train from "
            "this cache without loading the text encoders."
        )
    if not to_disk:
        _describe_text(profile)
        return
    result = ensure_text_cache(profile, device=device, batch_size=batch_size, strict=strict)
    _print_report(result.report, f"Text cache ({len(result)} captions)")


@cache.command("info")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--item", "item", type=int, default=None, help="Show item N (0-based, training order)."
)
@click.option(
    "--dump",
    type=click.Path(path_type=Path),
    default=None,
    help="With --item: write its tensors and metadata to this .safetensors file.",
)
def info(folder: Path, item: int | None, dump: Path | None) -> None:
    """Show what the cache FOLDER holds (cache.dir, or its latents/ or text/ subfolder)."""
    from naruto_lora.cache.info import find_caches, summarize
    from naruto_lora.util.errors import UserError

    folders = find_caches(folder)
    if dump is not None and item is None:
        raise UserError("--dump needs --item N: which item to write.")
    if item is not None:
        if len(folders) > 1:
            raise UserError(
                f"'{folder}' holds several caches; give one: "
                + ", ".join(str(f) for f in folders)
                + "."
            )
        _show_item(folders[0], item, dump)
        return
    for f in folders:
        _print_summary(summarize(f))


def _describe_text(profile: Any) -> None:
    from rich.markup import escape

    from naruto_lora.cache.text import plan_text_cache
    from naruto_lora.util.console import console

    plan = plan_text_cache(profile)
    seq, dim = plan.facts.prompt_shape
    console.print(
        f"Would cache {plan.captions} distinct caption(s) of {plan.items} item(s) to "
        f"{escape(str(plan.folder))}: prompt_embeds {seq} x {dim} and pooled_embeds "
        f"{plan.facts.pooled_size} per caption, fp16, about {_human_bytes(plan.bytes_total)} "
        f"({plan.cached} already cached and valid, {_human_bytes(plan.bytes_to_encode)} to encode)."
    )
    console.print("Nothing written. Add --to-disk to build it.")


def _print_summary(summary: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from naruto_lora.util.console import console

    table = Table(
        title=f"{summary.kind} cache {summary.folder}", show_header=False, title_justify="left"
    )
    table.add_row("kind", summary.kind)
    table.add_row("state", summary.state)
    table.add_row(
        "items", str(summary.items) + (f" ({summary.flips} mirrored)" if summary.flips else "")
    )
    for (name, shape), count in sorted(summary.shapes.items()):
        dtypes = [d for (n, d) in summary.dtypes if n == name]
        table.add_row(
            f"  {name}", f"{' x '.join(map(str, shape))} {'/'.join(sorted(set(dtypes)))} x {count}"
        )
    table.add_row(
        "size on disk", f"{_human_bytes(summary.bytes_on_disk)} in {summary.shards} shard(s)"
    )
    for key, value in sorted(summary.common.items()):
        table.add_row(f"fingerprint: {key}", escape(str(value)))
    integrity = "ok (every shard's checksum verified)"
    if summary.damaged:
        integrity = f"{len(summary.damaged)} damaged shard(s): re-run the cache command"
    table.add_row("integrity", integrity)
    table.add_row("skipped", str(len(summary.skipped)))
    console.print(table)
    for name, problem in summary.damaged.items():
        console.print(f"  [red]damaged[/] {escape(name)}: {escape(problem)}")
    for s in summary.skipped[:20]:
        console.print(f"  skipped {escape(str(s.get('source')))}: {escape(str(s.get('reason')))}")


def _show_item(folder: Path, number: int, dump: Path | None) -> None:
    import json
    import tempfile

    from rich.markup import escape

    from naruto_lora.cache.info import dump_item
    from naruto_lora.util.console import console

    with tempfile.TemporaryDirectory() as tmp:
        target = dump if dump is not None else Path(tmp) / "item.safetensors"
        metadata = dump_item(folder, number, target)
    entry = json.loads(metadata["entry"])
    console.print(f"item {number}: key {escape(metadata['key'])}")
    for key, value in sorted(entry.items()):
        console.print(f"  {key}: {escape(str(value))}")
    if dump is not None:
        console.print(f"[green]wrote[/] {escape(str(dump))}")
