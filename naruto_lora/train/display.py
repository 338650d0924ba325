"""The live training display: step, smoothed loss, learning rate, it/s, ETA, peak memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import RenderableType
from rich.progress import Progress
from rich.text import Text

from naruto_lora.util.console import progress


class _ProgressWithStats(Progress):
    """The shared progress bar (count, rate, ETA) with a line of vital signs under it, so an
    80-column terminal does not have to squeeze both into one row."""

    stats: str = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        if self.stats:
            yield Text(self.stats, style="dim")


class TrainDisplay:
    """A rich progress bar over optimizer steps with the run's vital signs beside it."""

    def __init__(
        self, total_steps: int, start_step: int, memory_kind: str, enabled: bool = True
    ) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.memory_kind = memory_kind
        shared = progress("step")  # the project's columns and quiet-mode rules
        self._progress = _ProgressWithStats(
            *shared.columns,
            console=shared.console,
            disable=shared.disable or not enabled,  # only the main process shows it
            transient=shared.live.transient,
        )
        self._task: Any = None

    def __enter__(self) -> TrainDisplay:
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.start_step
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, step: int, epoch: int, loss: float, lr: float, peak_gib: float) -> None:
        self._progress.stats = (
            f"  epoch {epoch + 1}   loss {loss:.4f} (smoothed)   lr {lr:.2e}   "
            f"peak {self.memory_kind} {peak_gib:.2f} GiB"
        )
        self._progress.update(self._task, completed=step)
