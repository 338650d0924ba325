"""The training loop, its state, checkpoints and outputs.

``train(profile, TrainOptions(...))`` runs one training; see ``loop`` for the loop itself,
``setup`` for what is built before it, ``checkpoint`` for exact resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from naruto_lora.train.finish import TrainResult
    from naruto_lora.train.run import TrainOptions

__all__ = ["TrainOptions", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: importing one part of training must not pull in the whole loop.
    if name == "train":
        from naruto_lora.train.loop import train

        return train
    if name == "TrainOptions":
        from naruto_lora.train.run import TrainOptions

        return TrainOptions
    if name == "TrainResult":
        from naruto_lora.train.finish import TrainResult

        return TrainResult
    raise AttributeError(name)
