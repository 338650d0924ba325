"""What a run records: ``metrics.jsonl`` (one line per optimizer step), peak memory, ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

METRICS_NAME = "metrics.jsonl"
LOSS_PLOT_NAME = "loss.png"
METRIC_FIELDS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "step_s",
    "data_wait_s",
    "peak_mem_gib",
)


class PeakMemory:
    """Peak memory so far: CUDA's max allocated on a GPU, the process's largest sampled RSS on a
    CPU (RSS has no running maximum we can read portably)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "VRAM" if device.type == "cuda" else "RSS"
        self._max_rss = 0

    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import psutil

        self._max_rss = max(self._max_rss, psutil.Process().memory_info().rss)
        return self._max_rss / 2**30


class SmoothedValue:
    """An exponential moving average, bias-corrected so the first values are not pulled to 0."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self._avg = 0.0
        self._count = 0

    def update(self, value: float) -> float:
        self._count += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        if self._count == 0:
            return float("nan")
        return self._avg / (1 - self.beta**self._count)

    def state_dict(self) -> dict[str, float]:
        return {"avg": self._avg, "count": self._count}

    def load_state_dict(self, saved: dict[str, float]) -> None:
        self._avg, self._count = float(saved["avg"]), int(saved["count"])


class MetricsLog:
    """Appends one JSON line per optimizer step (flushed, so a crash keeps what was logged)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / METRICS_NAME

    def truncate_after(self, step: int) -> None:
        """On resume, drop the lines an interrupted run wrote after its checkpoint."""
        from naruto_lora.util.io import atomic_write_text

        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


def plot_loss(metrics_path: Path, png_path: Path) -> Path | None:
    """The loss curve (raw and smoothed) as a PNG; None when there is nothing to plot yet.

    Uses matplotlib's object API with the Agg canvas: no pyplot, so no global backend switch and
    no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    smooth = SmoothedValue(0.9)
    smoothed = [smooth.update(v) for v in losses]
    extras = sorted({k for r in rows for k in r if k not in METRIC_FIELDS})
    figure = Figure(figsize=(8, 6.5 if extras else 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(2 if extras else 1, 1, 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="smoothed (EMA 0.9)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if extras:  # plugins' own numbers (nlora_metrics), e.g. Prodigy's effective learning rate
        below = figure.add_subplot(2, 1, 2, sharex=ax)
        for name in extras:
            points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
            below.plot([s for s, _ in points], [v for _, v in points], linewidth=1.5, label=name)
        below.set_xlabel("optimizer step")
        below.grid(alpha=0.3)
        below.legend()
    figure.tight_layout()
    from naruto_lora.util.io import atomic_path

    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(png_path)
