"""``nlora plan``: PREDICT a profile's peak GPU memory (no GPU, no weights needed), check it
against a card, or find the fastest configuration that fits one (``--fit GB``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from naruto_lora.cli.common import load_profile_from_options, profile_options

if TYPE_CHECKING:
    from naruto_lora.plan.fit import FitResult
    from naruto_lora.plan.planner import Plan

PHASES = ("building the models", "training step", "validation sample")


@click.command("plan")
@profile_options
@click.option(
    "--vram",
    type=float,
    default=None,
    metavar="GB",
    help="Check against a card of this size as sold (e.g. 12); default: this "
    "machine's largest GPU, if any.",
)
@click.option(
    "--fit",
    "fit_gb",
    type=float,
    default=None,
    metavar="GB",
    help="Find the fastest configuration of the profile predicted to fit a card "
    "of this size (takes a few planner runs, ~2-3 min on 2 cores).",
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --fit: also write the configuration found as a profile file.",
)
@click.option("--no-sample", is_flag=True, help="Skip the predictions for nlora sample (faster).")
@click.option("--no-cache", is_flag=True, help="Plan afresh even if this was planned before.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def plan(
    vram: float | None,
    fit_gb: float | None,
    save: Path | None,
    no_sample: bool,
    no_cache: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """PREDICT the peak GPU memory of a profile's training on the full-size model.

    Runs a real training step and a validation sample of the profile on fake tensors
    (shapes, no data) and counts every allocation; prints the peak split into weights,
    LoRA and optimizer state, plugin state, text encoders, VAE and activations, plus a
    stated allowance for the CUDA context and the allocator. Also predicts `nlora sample`
    with and without --low-vram. It is a prediction: benchmarks/RESULTS.md compares it
    with measurements.
    """
    from naruto_lora.util.errors import UserError

    profile_name = kwargs["profile_name"]
    profile = load_profile_from_options(kwargs)  # --model sets model.pretrained
    if save is not None and fit_gb is None:
        raise UserError("--save writes the configuration --fit finds; give --fit GB too.")
    for flag, size in (("--vram", vram), ("--fit", fit_gb)):
        if size is not None and not 1 <= size <= 1024:
            raise UserError(f"{flag} {size:g}: give the card's size in GB, e.g. {flag} 12.")
    if fit_gb is not None:
        result = _with_progress(as_json, lambda on: _fit(profile, fit_gb, on))
        _show_fit(result, profile_name, save, as_json)
        return
    from naruto_lora.plan.planner import plan_profile

    total = len(PHASES) + (0 if no_sample else 1)
    found = _with_progress(
        as_json,
        lambda on: plan_profile(
            profile, sampling=not no_sample, use_cache=not no_cache, on_phase=on
        ),
        total,
    )
    _show_plan(found, vram, as_json)


def _fit(profile: Any, fit_gb: float, on_phase: Any) -> FitResult:
    from naruto_lora.plan.fit import fit_profile

    return fit_profile(profile, fit_gb, on_phase=on_phase)


def _with_progress(quiet: bool, work: Any, total: int | None = None) -> Any:
    """Run ``work(on_phase)`` under a progress bar that advances at each planner phase."""
    from naruto_lora.util.console import progress

    bar = progress("phase")
    with bar:
        task = bar.add_task("planning", total=total)

        def on_phase(name: str) -> None:
            bar.update(task, description=name)
            bar.advance(task)

        return work(on_phase)


# ------------------------------------------------------------------------------ output


def _amount(value: float | None, unit: int) -> str:
    return "-" if value is None else f"{value / unit:.2f}"


def plan_table(plan: Plan) -> Any:
    from rich.table import Table

    from naruto_lora.plan.planner import allowance_bytes, category_name, ordered_labels

    phases = [p for p in (plan.training, plan.validation, *plan.sampling) if p is not None]
    # MiB for the tiny model, GiB for real ones.
    big = max(p.peak_bytes for p in phases) >= 2**30
    unit, unit_name = (2**30, "GiB") if big else (2**20, "MiB")
    table = Table(title=f"PREDICTED GPU memory ({unit_name}) for profile '{plan.profile}'")
    table.add_column("")
    for phase in phases:
        table.add_column(phase.name, justify="right")
    labels = ordered_labels({label for p in phases for label in p.split})
    for label in labels:
        table.add_row(category_name(label), *(_amount(p.split.get(label), unit) for p in phases))
    table.add_row(
        "[bold]tracked peak[/] (= CUDA max allocated)",
        *(f"[bold]{_amount(p.peak_bytes, unit)}[/]" for p in phases),
    )
    table.add_row(
        "allowance: CUDA context + allocator",
        *(_amount(allowance_bytes(p.peak_bytes), unit) for p in phases),
    )
    needs = (p.peak_bytes + allowance_bytes(p.peak_bytes) for p in phases)
    table.add_row("[bold]need[/]", *(f"[bold]{_amount(n, unit)}[/]" for n in needs))
    table.add_row("peak happens in", *(p.where or "-" for p in phases))
    return table


def _tflop(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.2f} GFLOP"


def settings_line(settings: dict[str, Any]) -> str:
    s = settings
    parts = [
        f"{s['resolution']} px",
        f"batch {s['batch_size']} x {s['gradient_accumulation_steps']} accumulation",
        f"rank {s['rank']}" + (" DoRA" if s.get("use_dora") else ""),
        "fp32" if s["mixed_precision"] == "no" else s["mixed_precision"],
        s["optimizer"],
        f"text {s['cache_text']}",
        f"latents {'cached' if s['cache_latents'] else 'encoded each step'}",
        f"validation every {s['validation_every_steps']} steps"
        if s["validation_every_steps"]
        else "no validation samples",
        "plugins: " + (", ".join(s["plugins"]) or "none"),
    ]
    parts += [f"{k.removesuffix('_device')} on {v}" for k, v in s.items() if k.endswith("_device")]
    return ", ".join(parts)


def _card(vram: float | None) -> tuple[str, float] | None:
    from naruto_lora.plan.planner import detected_vram_gib, usable_gib

    if vram is not None:
        return f"a {vram:g} GB card ({usable_gib(vram):.2f} GiB usable)", usable_gib(vram)
    found = detected_vram_gib()
    if found is None:
        return None
    return f"{found[0]} ({found[1]:.2f} GiB)", found[1]


def _show_plan(plan: Plan, vram: float | None, as_json: bool) -> None:
    from rich.markup import escape

    from naruto_lora.plan.memtrack import GIB
    from naruto_lora.plan.planner import verdict
    from naruto_lora.util.console import console

    card = _card(vram)
    fits = verdict(plan.need_gib, card[1]) if card else None
    if as_json:
        out = plan.to_dict()
        out["card"] = (
            None
            if card is None
            else {"card": card[0], "capacity_gib": card[1], "verdict": fits[0], "detail": fits[1]}
        )
        click.echo(json.dumps(out, indent=2))
        return
    console.print(
        f"[bold]nlora plan[/]: a PREDICTION, made on fake tensors (not a measurement). "
        f"Model: {escape(plan.model_source)}."
    )
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"Settings: {escape(settings_line(plan.settings))}.")
    targets = ", ".join(plan.settings["target_modules"])
    console.print(
        f"{'DoRA' if plan.settings.get('use_dora') else 'LoRA'}: "
        f"[bold]{plan.lora_parameters:,}[/] trainable parameters "
        f"(rank {plan.settings['rank']} on {escape(targets)})."
    )
    console.print(plan_table(plan))
    accumulation = plan.settings["gradient_accumulation_steps"]
    console.print(
        f"Training needs [bold]{plan.need_gib:.1f} GiB[/] (the {plan.run_peak.name} peaks: "
        f"{plan.run_peak.peak_bytes / GIB:.2f} GiB tracked + allowance). UNet compute: "
        f"{_tflop(plan.flops_per_micro_step)} per micro-step, "
        f"{_tflop(plan.flops_per_update)} per optimizer step (x{accumulation})."
    )
    if card is None:
        console.print(
            "No CUDA GPU here: give --vram GB to check a card, or --fit GB to find "
            "a configuration for one."
        )
    else:
        style = {"fits": "green", "tight": "yellow"}.get(fits[0], "bold red")
        console.print(f"On {escape(card[0])}: [{style}]{fits[0]}[/] - {escape(fits[1])}.")
    console.print(f"[dim]Planned in {plan.elapsed_s:.0f} s.[/]")


def _show_fit(result: FitResult, profile_name: str, save: Path | None, as_json: bool) -> None:
    from rich.markup import escape

    from naruto_lora.plan.fit import profile_toml, set_line
    from naruto_lora.util.console import console
    from naruto_lora.util.io import atomic_write_text

    toml_text = profile_toml(result, profile_name)
    command = f"nlora train --profile {profile_name} {set_line(result.changes)}".strip()
    if save is not None:
        atomic_write_text(save, toml_text)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "prediction": True,
                    "card_gb": result.card_gb,
                    "capacity_gib": result.capacity_gib,
                    "changes": result.changes,
                    "need_gib": round(result.plan.need_gib, 3),
                    "relative_step_time": round(result.relative_step_time, 3),
                    "command": command,
                    "profile_toml": toml_text,
                    "plan": result.plan.to_dict(),
                    "considered": result.considered,
                    "fitting": result.fitting,
                    "rejected": [{"changes": c, "need_gib": n} for c, n in result.rejected],
                },
                indent=2,
                default=str,
            )
        )
        return
    console.print(
        f"[bold]nlora plan --fit[/]: the fastest configuration of '{escape(result.base.name)}' "
        f"PREDICTED to fit a {result.card_gb:g} GB card ({result.capacity_gib:.2f} GiB usable), "
        f"of {result.fitting} predicted to fit among {result.considered} considered."
    )
    console.print(plan_table(result.plan))
    changes = ", ".join(f"{k} = {v!r}" for k, v in result.changes.items()) or "none: it fits as is"
    console.print(f"Changes: {escape(changes)}.")
    console.print(
        f"Predicted need {result.plan.need_gib:.1f} GiB; step time "
        f"x{result.relative_step_time:.2f} of the profile as given (FLOP-count model)."
    )
    console.print("\nRun it with:")
    console.print(escape(command), markup=False, soft_wrap=True)
    console.print("\nOr as a profile file" + (f" (written to {save})" if save else "") + ":")
    console.print(toml_text, markup=False, soft_wrap=True)
