"""``nlora profiles list|show``."""

from __future__ import annotations

import click

from naruto_lora.cli.common import GuardedCommand


def register(cli: click.Group) -> None:
    @cli.group("profiles")
    def profiles() -> None:
        """List the built-in profiles or show one fully resolved."""

    @profiles.command("list", cls=GuardedCommand)
    def list_cmd() -> None:
        """List the built-in profiles with their descriptions."""
        from rich.table import Table

        from naruto_lora.console import console
        from naruto_lora.profile import builtin_profile_names, load_profile

        table = Table("profile", "resolution", "rank", "accum", "text", "plugins", "description")
        for name in builtin_profile_names():
            p = load_profile(name)
            table.add_row(
                name,
                str(p.data.resolution),
                str(p.lora.rank),
                str(p.train.gradient_accumulation_steps),
                p.cache.text,
                ", ".join(p.enabled_plugins()) or "-",
                p.description,
            )
        console.print(table)

    @profiles.command("show", cls=GuardedCommand)
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
        from naruto_lora.profile import load_profile

        profile = load_profile(name, overrides=overrides, enable=enable, disable=disable)
        click.echo(profile.to_json() if as_json else profile.to_toml())
