"""``nlora doctor``: this machine's facts, a profile's checks, and the recommended profile."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from naruto_lora.cli.common import load_profile_from_options, profile_options

if TYPE_CHECKING:
    from rich.console import Console

    from naruto_lora.doctor.checks import DoctorReport

# Without --profile, doctor looks at the default recipe's assets and paths but never fails.
DEFAULT_PROFILE = "14gb"
STATUS_STYLE = {
    "ok": "[green]ok[/]",
    "warn": "[yellow]warn[/]",
    "fail": "[bold red]fail[/]",
    "not_recommended": "[bold red]not recommended[/]",
}


def doctor_profile_options(func: Callable) -> Callable:
    """The phase commands' profile options, except that --profile is optional here."""
    func = profile_options(func)
    for param in func.__click_params__:  # type: ignore[attr-defined]
        if param.name == "profile_name":
            param.default = None
            param.show_default = False
            param.help = (
                f"Check this profile (name or .toml path): exit 0 when it can run here, "
                f"1 when it cannot. Without it: report on the {DEFAULT_PROFILE} "
                "defaults, recommend a profile, always exit 0."
            )
    return func


@click.command("doctor")
@doctor_profile_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document on stdout instead of tables.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="With --profile on a GPU machine: use the quick table estimate of the VRAM need "
    "instead of the planner's prediction (which takes 30-60 s the first time).",
)
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, quick: bool, **kwargs: Any) -> None:
    """Check this machine (Python, torch, CUDA, GPUs, RAM, disk, packages, model and data
    availability, hub access) and recommend a profile for its largest GPU."""
    from naruto_lora.doctor.checks import diagnose, gather_facts
    from naruto_lora.util.console import err_console

    explicit = kwargs["profile_name"] is not None
    if not explicit:
        kwargs["profile_name"] = DEFAULT_PROFILE
    profile = load_profile_from_options(kwargs)
    report = diagnose(
        profile, gather_facts(profile), explicit=explicit, use_planner=explicit and not quick
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    if explicit and not report.can_run:
        err_console.print(f"[bold red]Profile '{escape(report.profile)}' cannot run here:[/]")
        for row in report.failures:
            err_console.print(f"  {row.check}: {row.detail}", markup=False, soft_wrap=True)
        ctx.exit(1)


# --------------------------------------------------------------------------- tables


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f} GiB"


def _system_table(report: DoctorReport):
    from rich.table import Table

    f = report.facts
    table = Table("", "", title="system", show_header=False, title_justify="left")
    table.add_row("python", f.python)
    table.add_row("platform", escape(f.platform))
    table.add_row("torch", f.torch)
    table.add_row("CUDA runtime", f.cuda_runtime or "none (CPU-only torch build)")
    table.add_row("NVIDIA driver", f.driver or "not found")
    table.add_row("CPU cores", str(f.cpu_count))
    table.add_row("RAM", f"{_gib(f.ram_available_gib)} available of {_gib(f.ram_total_gib)}")
    for disk in f.disks:
        table.add_row(
            f"disk: {disk.role}", escape(f"{_gib(disk.free_gib)} free at {disk.checked_path}")
        )
    table.add_row("hub", escape(f"{f.hub.endpoint}: {f.hub.detail}"))
    return table


def _gpu_table(report: DoctorReport):
    from rich.table import Table

    table = Table(
        "#", "name", "total", "free", "compute", "bf16", title="GPUs", title_justify="left"
    )
    for gpu in report.facts.gpus:
        table.add_row(
            str(gpu.index),
            escape(gpu.name),
            _gib(gpu.total_vram_gib),
            _gib(gpu.free_vram_gib),
            gpu.compute_capability or "-",
            "yes" if gpu.bf16 else "no",
        )
    if not report.facts.gpus:
        table.add_row("-", "no CUDA GPU", "", "", "", "")
    return table


def _packages_table(report: DoctorReport):
    from rich.table import Table

    table = Table("package", "version", title="packages", title_justify="left")
    for name, version in report.facts.packages.items():
        table.add_row(name, version or "[dim]not installed[/]")
    return table


def _assets_table(report: DoctorReport):
    from rich.table import Table

    table = Table(
        "role",
        "source",
        "kind",
        "here",
        "detail",
        title=f"assets of profile {report.profile}",
        title_justify="left",
    )
    table.columns[1].overflow = "fold"  # hub ids and paths are read whole
    for asset in report.facts.assets:
        table.add_row(
            asset.role,
            escape(asset.source or "-"),
            asset.kind,
            "[green]yes[/]" if asset.available else "[red]no[/]",
            escape(asset.detail),
        )
    return table


def _checks_table(report: DoctorReport):
    from rich.table import Table

    how = "" if report.explicit else " (default; give --profile to check another)"
    table = Table(
        "check",
        "status",
        "detail",
        title=f"checks for profile {report.profile}{how}",
        title_justify="left",
    )
    table.columns[0].no_wrap = True
    for row in report.checks:
        table.add_row(escape(row.check), STATUS_STYLE[row.status], escape(row.detail))
    return table


def render(report: DoctorReport, console: Console | None = None) -> None:
    from naruto_lora.util.console import console as default_console

    out = console or default_console
    for make in (_system_table, _gpu_table, _packages_table, _assets_table, _checks_table):
        out.print(make(report))
    rec = report.recommendation
    out.print(
        f"[bold]recommendation[/] ({STATUS_STYLE[rec.level]}): {escape(rec.message)}",
        soft_wrap=True,
    )
    if report.explicit:
        verdict = "[green]can run here[/]" if report.can_run else "[bold red]cannot run here[/]"
        out.print(f"[bold]profile {report.profile}:[/] {verdict}")
