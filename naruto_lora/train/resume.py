"""Resuming with other settings than the checkpoint's run: refused unless asked for, and then
really applied (never silently ignored while profile.toml records the new value).

The identity keys (model, data, LoRA shape, batching, seed) may never change: that would be
another run (``checkpoint.check_checkpoint``). Of the rest, some only change how the run is kept
or shown (where checkpoints go, how many, validation samples, loader workers); any other change
makes the resumed run differ from the straight run the checkpoint belongs to.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from naruto_lora.train.outputs import PROFILE_NAME, run_identity
from naruto_lora.util.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Keys that never change the trained weights: names, where things are kept, how often
# checkpoints are written, validation (it samples on its own random streams), loader workers,
# the non-finite patience, and speed switches that compute the same thing.
FREE_KEYS = {
    "name",
    "description",
    "cache.dir",
    "cache.shard_items",
    "train.output_dir",
    "train.checkpoint_every",
    "train.checkpoints_keep",
    "train.dataloader_workers",
    "train.max_nonfinite_in_row",
    # Speed switches that are plugins now (changes_training = False): their old keys still sit
    # in checkpoints written before, and must not count as a change.
    "train.compile",
    "train.channels_last",
    "train.fused_optimizer",
}
FREE_PREFIXES = ("validation.",)
# Schedules whose rate at a step does not depend on the run's length.
LENGTH_FREE_SCHEDULES = {"constant", "constant_with_warmup"}
LENGTH_KEYS = {"train.max_steps", "train.epochs"}
SCHEDULE_KEYS = {"train.learning_rate", "train.lr_scheduler", "train.lr_warmup_steps"}
OPTIMIZER_KEYS = {
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_weight_decay",
    "train.adam_epsilon",
}


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    now: Any

    def meaning(self) -> str:
        if self.key in LENGTH_KEYS:
            return "the run's length, and with it the learning-rate schedule from here on"
        if self.key in SCHEDULE_KEYS:
            return "the learning rate from here on"
        if self.key in OPTIMIZER_KEYS:
            return "the optimizer's updates from here on"
        if self.key.startswith("plugins."):
            return "what the plugins do to the training from here on"
        return "the training from here on"

    def describe(self) -> str:
        return f"{self.key}: {self.saved!r} in the checkpoint, {self.now!r} now ({self.meaning()})"


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _is_free(key: str, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
        return True
    return (
        key in LENGTH_KEYS
        and now.get("train.lr_scheduler") in LENGTH_FREE_SCHEDULES
        and saved.get("train.lr_scheduler") in LENGTH_FREE_SCHEDULES
    )


def _free_plugins(plugin_classes: Mapping[str, type] | None) -> set[str]:
    """Plugins that say they compute the same training (a speed or memory switch, validation
    only): a class attribute ``changes_training = False``. Any other plugin change counts."""
    return {
        name
        for name, cls in (plugin_classes or {}).items()
        if getattr(cls, "changes_training", True) is False
    }


def settings_changes(
    saved_table: dict[str, Any],
    current_table: dict[str, Any],
    plugin_classes: Mapping[str, type] | None = None,
) -> list[Change]:
    """Changed keys that make the resumed run another one than the checkpoint's (identity keys
    are checked elsewhere and left out)."""
    saved, now = flatten(saved_table), flatten(current_table)
    identity = set(run_identity(current_table))
    free_plugins = _free_plugins(plugin_classes)
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key in identity or saved.get(key) == now.get(key) or _is_free(key, saved, now):
            continue
        if key.startswith("plugins.") and key.split(".")[1] in free_plugins:
            continue
        changes.append(Change(key, saved.get(key), now.get(key)))
    return changes


def saved_profile(info: dict[str, Any], output_dir: Path) -> dict[str, Any] | None:
    """The checkpoint run's resolved profile: in trainer.json, or (checkpoints written before
    it was kept there) the output folder's profile.toml."""
    table = info.get("settings")
    if isinstance(table, dict):
        return table
    try:
        return tomllib.loads((output_dir / PROFILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_resume_settings(
    path: Path, info: dict[str, Any], profile: Any, output_dir: Path, allow: bool
) -> list[Change]:
    """The changes a resume would make; a UserError listing them unless ``allow``."""
    saved = saved_profile(info, output_dir)
    if saved is None:
        return []
    from naruto_lora.plugins.manager import discover_plugins

    changes = settings_changes(saved, profile.to_dict(), discover_plugins())
    if changes and not allow:
        raise UserError(
            f"Resuming from '{path}' with other settings than the run it belongs to, so the "
            "result would not be the run the checkpoint continues: "
            + "; ".join(c.describe() for c in changes)
            + ".",
            hint="Resume with the same settings (the checkpoint's are in "
            f"{path / 'trainer.json'}), or add --resume-with-changes to apply the new values "
            "from the checkpoint's step on. Nothing was changed.",
        )
    return changes


def apply_changes(run: Any) -> None:
    """After the checkpoint is loaded: the new optimizer settings and learning-rate schedule,
    as if the schedule had been planned with them from the start (the checkpoint's saved
    schedule would otherwise win over the profile's values)."""
    from naruto_lora.train.schedule import make_lr_scheduler

    cfg = run.profile.train
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.learning_rate
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["weight_decay"] = cfg.adam_weight_decay
        group["eps"] = cfg.adam_epsilon
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper
    scheduler = make_lr_scheduler(optimizer, cfg, run.total_steps)
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": here it only fast-forwards the clock.
        warnings.simplefilter("ignore")
        for _ in range(run.state.global_step):
            scheduler.step()
    run.lr_scheduler = scheduler
    run.state.lr_scheduler = scheduler
