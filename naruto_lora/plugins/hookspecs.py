"""Every hook of naruto-lora, in lifecycle order.

Three kinds, chosen by meaning:

* *exactly one answer* (``firstresult=True``): the first non-None result wins; the core
  registers its default ``trylast`` so a plugin's answer always comes first;
* *everyone contributes*: every implementation's result is collected into a list;
* *wrap around* (``wrapper=True`` implementations of a normal hook): code before and after
  the ``yield`` runs around the wrapped block, e.g. EMA swaps weights in and restores them.

Hooks are always called with keyword arguments. Training hooks get the one ``TrainState``
(see ``naruto_lora.plugins.state``) instead of growing argument lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from naruto_lora.config.profile import Profile
    from naruto_lora.plugins.state import TrainState

PROJECT = "nlora"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# The documented lifecycle order (of each hook's first call); a test checks the training loop
# calls hooks in this order. nlora_load_checkpoint_state only runs on --resume; within a step,
# validation samples come before the checkpoint; nlora_lora_weights_to_save runs at every
# checkpoint and once more after nlora_train_end.
LIFECYCLE = (
    "nlora_doctor_checks",
    "nlora_prepare_unet",
    "nlora_prepare_validation_vae",
    "nlora_build_optimizer",
    "nlora_wrap_model",
    "nlora_train_start",
    "nlora_load_checkpoint_state",
    "nlora_adjust_conditioning",
    "nlora_sample_noise",
    "nlora_sample_timesteps",
    "nlora_per_sample_loss",
    "nlora_loss_weights",
    "nlora_after_optimizer_step",
    "nlora_metrics",
    "nlora_validation_weights",
    "nlora_checkpoint_state",
    "nlora_lora_weights_to_save",
    "nlora_train_end",
)


@hookspec
def nlora_doctor_checks(facts: dict[str, Any], profile: Profile | None) -> list[dict[str, Any]]:
    """Everyone contributes: extra rows for ``nlora doctor``.

    ``facts`` is what doctor found about the machine (``cuda``, ``gpus``, ``torch`` ...).
    Return a list of ``{"check": str, "status": "ok"|"warn"|"fail", "detail": str}``.
    """


@hookspec
def nlora_prepare_unet(unet: torch.nn.Module, profile: Profile, training: bool) -> None:
    """Everyone contributes: change the UNet in place after the LoRA is injected and before
    it is wrapped for training or sampling (attention processors, gradient checkpointing)."""


@hookspec
def nlora_prepare_validation_vae(vae: Any, profile: Profile) -> None:
    """Everyone contributes: change how the VAE that decodes validation samples decodes, in
    place, once at setup (e.g. tiled decoding); the planner calls it too. Leave its encoding
    alone: with ``cache.latents = false`` training encodes with the same VAE."""


@hookspec(firstresult=True)
def nlora_build_optimizer(
    params: list[torch.nn.Parameter], profile: Profile, device: torch.device, planning: bool
) -> torch.optim.Optimizer:
    """Exactly one answer: the optimizer over the trainable LoRA ``params`` (fp32), with the
    profile's ``train.learning_rate`` and ``train.adam_*`` settings where they apply. Core
    default: AdamW, the fused kernel on CUDA. ``planning`` is true when the VRAM planner builds
    it on fake tensors: an optimizer that cannot be built there returns a stand-in that holds
    the same state tensors."""


@hookspec(firstresult=True)
def nlora_wrap_model(model: torch.nn.Module, profile: Profile) -> torch.nn.Module:
    """Exactly one answer: the module the training step calls, given the prepared model
    (hooks and saving keep seeing the plain UNet, ``state.unet``). Core default: the model
    itself; e.g. ``torch.compile`` of it."""


@hookspec
def nlora_train_start(state: TrainState) -> None:
    """Everyone contributes: the models, optimizer and data are ready; step 0 follows
    (or the resumed step). Create plugin state here (e.g. EMA shadow weights)."""


@hookspec
def nlora_load_checkpoint_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Everyone contributes: on ``--resume``, right after ``nlora_train_start``, restore what
    ``nlora_checkpoint_state`` saved (``saved`` holds all plugins' keys; a key a plugin does not
    find was saved by a run without it)."""


@hookspec
def nlora_adjust_conditioning(state: TrainState, conditioning: Any, batch: dict[str, Any]) -> None:
    """Everyone contributes: change a micro-batch's conditioning before the UNet sees it, by
    assigning new tensors to ``conditioning``'s fields (``latents``, ``prompt_embeds``,
    ``pooled_embeds``, ``time_ids``; see ``train.conditioning.Conditioning``), e.g. caption
    dropout. ``batch`` is the data loader's batch (``index``: the items' data-set indices)."""


@hookspec(firstresult=True)
def nlora_sample_noise(
    state: TrainState, latents: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Exactly one answer: the noise added to ``latents`` (same shape). Core default: N(0, I)."""


@hookspec(firstresult=True)
def nlora_sample_timesteps(
    state: TrainState, batch_size: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Exactly one answer: a LongTensor of ``batch_size`` training timesteps.
    Core default: uniform over the scheduler's ``num_train_timesteps``."""


@hookspec(firstresult=True)
def nlora_per_sample_loss(
    state: TrainState, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Exactly one answer: each sample's loss (shape ``[batch]``, fp32) between the UNet's
    prediction and its target; ``nlora_loss_weights`` multiply it. Core default (when no
    plugin answers): the mean squared error of each sample."""


@hookspec
def nlora_loss_weights(state: TrainState, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Everyone contributes: a per-sample weight (shape ``[batch]``) for the loss; the weights of
    all plugins are multiplied. Return None to contribute nothing."""


@hookspec
def nlora_after_optimizer_step(state: TrainState) -> None:
    """Everyone contributes: runs after each optimizer update (``state.global_step`` already
    counts it), e.g. the EMA update."""


@hookspec
def nlora_metrics(state: TrainState) -> dict[str, float] | None:
    """Everyone contributes: extra numbers for this optimizer step's ``metrics.jsonl`` row (and
    TensorBoard), e.g. an adaptive optimizer's effective learning rate; ``loss.png`` plots them
    in a panel below the loss. Names must not be the core's own fields."""


@hookspec
def nlora_validation_weights(state: TrainState) -> None:
    """Wrap around: the core calls this around generating validation samples; wrapper
    implementations swap weights in before their ``yield`` and restore them after."""


@hookspec
def nlora_checkpoint_state(state: TrainState) -> dict[str, Any] | None:
    """Everyone contributes: extra state to save in a checkpoint, as ``{key: tensor-dict or
    plain data}``; keys must be unique across plugins (use the plugin name)."""


@hookspec
def nlora_lora_weights_to_save(state: TrainState) -> dict[str, dict[str, torch.Tensor]] | None:
    """Everyone contributes: extra LoRA weight sets to write beside the trained ones, as
    ``{subfolder: peft state dict}`` (e.g. the plugin's name as the subfolder). The core always writes the trained
    weights into the output folder itself; subfolders must be unique across plugins."""


@hookspec
def nlora_train_end(state: TrainState) -> None:
    """Everyone contributes: training finished (weights are written after this)."""
