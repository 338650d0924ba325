"""Rich console and progress bars shared by every command."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class RateColumn(TextColumn):
    """Items per second, with the unit named (rich's default speed column is bytes)."""

    def __init__(self, unit: str = "it"):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        if speed < 1:
            return Text(f"{1 / speed:.2f} s/{self.unit}", style="progress.data.speed")
        return Text(f"{speed:.2f} {self.unit}/s", style="progress.data.speed")


def progress(unit: str = "it", *extra_columns) -> Progress:
    """A progress bar with count, rate and ETA; quiet when not on a terminal in CI logs."""
    disable = os.environ.get("NLORA_NO_PROGRESS") == "1"
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *extra_columns,
        console=err_console,
        disable=disable,
        transient=not sys.stderr.isatty(),
    )


# torchao's import logs a warning per CUDA kernel library it cannot load (all of them with a
# CPU-only torch) and torch one per enum torchao registers; peft and diffusers import torchao
# whenever it is installed, so the command line quiets these two loggers from the start.
NOISY_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",  # about torchao-serialized checkpoints
)


def quiet_torchao_logs() -> None:
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
