"""The live training display: step, smoothed loss, learning rate, it/s, ETA, peak memory."""

from __future__ import annotations

from typing import Any

from rich.progress import TextColumn

from naruto_lora.console import progress


class TrainDisplay:
    """A rich progress bar over optimizer steps with the run's vital signs beside it."""

    def __init__(self, total_steps: int, start_step: int, memory_kind: str) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.memory_kind = memory_kind
        self._progress = progress("step", TextColumn("{task.fields[stats]}"))
        self._task: Any = None

    def __enter__(self) -> TrainDisplay:
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.start_step, stats=""
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, step: int, epoch: int, loss: float, lr: float, peak_gib: float) -> None:
        stats = (
            f"epoch {epoch + 1}  loss {loss:.4f}  lr {lr:.2e}  "
            f"peak {self.memory_kind} {peak_gib:.2f} GiB"
        )
        self._progress.update(self._task, completed=step, stats=stats)

    def note(self, message: str) -> None:
        """Print above the bar without breaking it."""
        self._progress.console.print(message, soft_wrap=True)
