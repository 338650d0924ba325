"""Caption dropout: with probability ``probability``, an item trains on the empty prompt's
conditioning instead of its caption, so the LoRA keeps the unconditional prediction that
classifier-free guidance needs (as kohya's ``--caption_dropout_rate`` and the diffusers scripts'
``--proportion_empty_prompts`` do).

The empty prompt's conditioning is what SDXL's pipeline uses for an empty negative prompt:
zeros when the model's ``force_zeros_for_empty_prompt`` says so (SDXL base), else both encoders'
output for "" (encoded once at train start). It works the same with text cached on disk or
encoded on the fly. Each item's draw depends only on (``train.seed``, the optimizer step, the
item's data-set index), so resume is exact and the other random draws are unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import Plugin
from naruto_lora.util.errors import UserError


@dataclass(frozen=True)
class CaptionDropoutConfig:
    probability: float = 0.1

    def validate(self) -> None:
        if not 0 <= self.probability < 1:
            raise UserError(
                f"plugins.caption_dropout.probability = {self.probability!r} must be in [0, 1) "
                "(0.05-0.1 is usual)."
            )


def dropout_mask(seed: int, step: int, indices: list[int], probability: float) -> torch.Tensor:
    """Which items drop their caption (bool ``[len(indices)]``), a function of its arguments
    only: one uniform draw per item from a generator seeded by (seed, step, index)."""
    draws = []
    for index in indices:
        digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        draws.append(torch.rand((), generator=generator))
    return torch.stack(draws) < probability if draws else torch.zeros(0, dtype=torch.bool)


def drop_captions(
    conditioning: Any, mask: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """Replace the masked items' prompt and pooled embeddings by the empty prompt's (zeros when
    ``empty`` is None)."""
    prompt, pooled = conditioning.prompt_embeds, conditioning.pooled_embeds
    keep = mask.to(prompt.device).logical_not()
    if empty is None:
        empty_prompt, empty_pooled = torch.zeros_like(prompt[:1]), torch.zeros_like(pooled[:1])
    else:
        empty_prompt, empty_pooled = (t.to(prompt.device, prompt.dtype) for t in empty)
    conditioning.prompt_embeds = torch.where(keep[:, None, None], prompt, empty_prompt)
    conditioning.pooled_embeds = torch.where(keep[:, None], pooled, empty_pooled)


class CaptionDropout(Plugin):
    name = "caption_dropout"
    Config = CaptionDropoutConfig
    description = (
        "Trains a share of items on the empty prompt so classifier-free guidance keeps working."
    )

    def __init__(self, config: CaptionDropoutConfig):
        super().__init__(config)
        self.empty: tuple[torch.Tensor, torch.Tensor] | None = None

    @hookimpl
    def nlora_train_start(self, state) -> None:
        from naruto_lora.models.loading import empty_prompt_embeddings

        self.empty = empty_prompt_embeddings(state.profile.model, state.device, state.weight_dtype)

    @hookimpl
    def nlora_adjust_conditioning(self, state, conditioning, batch) -> None:
        if self.config.probability <= 0:
            return
        index = batch.get("index")
        count = conditioning.prompt_embeds.shape[0]
        indices = list(range(count)) if index is None else [int(i) for i in index]
        mask = dropout_mask(
            state.profile.train.seed, state.global_step, indices, self.config.probability
        )
        drop_captions(conditioning, mask, self.empty)


PLUGIN = CaptionDropout
