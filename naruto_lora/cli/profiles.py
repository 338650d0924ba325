"""``nlora profiles list|show``."""

from __future__ import annotations

import click


@click.group("profiles")
def profiles() -> None:
    """List the built-in profiles or show one fully resolved."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool) -> None:
    """List the built-in profiles with their descriptions."""
    import json

    from rich.table import Table

    from naruto_lora.config.profile import builtin_profile_names
    from naruto_lora.plugins.manager import load_profile
    from naruto_lora.util.console import console

    rows = []
    for name in builtin_profile_names():
        p = load_profile(name)
        rows.append(
            {
                "profile": name,
                "resolution": p.data.resolution,
                "rank": p.lora.rank,
                "accumulation": p.train.gradient_accumulation_steps,
                "text": p.cache.text,
                "plugins": p.enabled_plugins(),
                "description": p.description,
            }
        )
    if as_json:
        click.echo(json.dumps({"profiles": rows}, indent=2))
        return
    table = Table()
    # Names are what users type: never cut (a pipe or a file gets 80 columns).
    longest = max((len(r["profile"]) for r in rows), default=7)
    table.add_column("profile", no_wrap=True, min_width=longest)
    for column in ("resolution", "rank", "accum", "text"):
        table.add_column(column, no_wrap=True)
    table.add_column("plugins", overflow="fold")
    table.add_column("description", overflow="fold")
    for row in rows:
        table.add_row(
            row["profile"],
            str(row["resolution"]),
            str(row["rank"]),
            str(row["accumulation"]),
            row["text"],
            ", ".join(row["plugins"]) or "-",
            row["description"],
        )
    console.print(table)


@profiles.command("show")
@click.argument("name")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override one key (value parsed as TOML). Repeatable.",
)
@click.option("--enable", multiple=True, metavar="PLUGIN", help="Turn a plugin on.")
@click.option("--disable", multiple=True, metavar="PLUGIN", help="Turn a plugin off.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def show(
    name: str,
    overrides: tuple[str, ...],
    enable: tuple[str, ...],
    disable: tuple[str, ...],
    as_json: bool,
) -> None:
    """Print profile NAME (a built-in name or a .toml path) fully resolved: extends merged,
    defaults filled in, overrides applied."""
    from naruto_lora.plugins.manager import load_profile

    profile = load_profile(name, overrides=overrides, enable=enable, disable=disable)
    click.echo(profile.to_json() if as_json else profile.to_toml())
