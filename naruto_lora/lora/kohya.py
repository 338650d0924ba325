"""LoRA module names in the original SDXL ("sgm") UNet layout, as kohya-ss, ComfyUI and
AUTOMATIC1111/Forge spell them.

Those tools build SDXL from Stability's ``generative-models`` code, whose UNet numbers its layers
``input_blocks.N.i``, ``middle_block.i`` and ``output_blocks.N.i`` instead of diffusers'
``down_blocks.b.{resnets,attentions}.j``. A LoRA for them names every module
``lora_unet_<sgm path with "." -> "_">``, e.g. diffusers'
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` is
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` in SDXL.

The numbering follows from the UNet's config (layers per block, which blocks have attention),
so it is computed from the config, never from a table of SDXL's numbers:

* ``input_blocks.0.0`` is ``conv_in``; then each down block contributes one input block per layer
  (``.0`` = its ResBlock, ``.1`` = its transformer) and, unless it is the last block, one more
  holding the downsampler (``.0.op``);
* ``middle_block.0/1/2`` = ResBlock, transformer, ResBlock;
* each up block contributes ``layers + 1`` output blocks (``.0`` ResBlock, ``.1`` transformer when
  the block has attention) and the upsampler sits in its last one, after the ResBlock and the
  transformer (``.2.conv``, or ``.1.conv`` in a block without attention);
* inside a ResBlock: ``in_layers.2`` (conv1), ``emb_layers.1`` (time_emb_proj), ``out_layers.3``
  (conv2), ``skip_connection`` (conv_shortcut); transformer internals keep diffusers' names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from naruto_lora.util.errors import UserError

KOHYA_PREFIX = "lora_unet_"

DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}

# ResBlock layers: diffusers' name -> sgm's (the sgm ResBlock keeps its layers in Sequentials).
RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the block structure.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLER = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UPSAMPLER = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv")


@dataclass(frozen=True)
class SgmLayout:
    """Where each diffusers block starts in sgm's numbering, from the UNet's config."""

    down_start: tuple[int, ...]  # input_blocks index of each down block's first layer
    down_layers: tuple[int, ...]
    up_start: tuple[int, ...]  # output_blocks index of each up block's first layer
    up_layers: tuple[int, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> SgmLayout:
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        down_types, up_types = list(get("down_block_types")), list(get("up_block_types"))
        unknown = [t for t in down_types if t not in DOWN_TYPES] + [
            t for t in up_types if t not in UP_TYPES
        ]
        if unknown or get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise UserError(
                f"This UNet has block types the original SDXL layout does not know "
                f"({', '.join(unknown) or get('mid_block_type')}), so its LoRA has no kohya names.",
                hint="Export it with --format diffusers or --format peft instead.",
            )
        per_block = get("layers_per_block")
        down_layers = (
            tuple(per_block)
            if isinstance(per_block, (list, tuple))
            else (per_block,) * len(down_types)
        )
        # diffusers builds up block i with reversed(layers_per_block)[i] + 1 layers.
        up_layers = tuple(n + 1 for n in reversed(down_layers))
        down_start, index = [], 1  # input_blocks.0 is conv_in
        for b, layers in enumerate(down_layers):
            down_start.append(index)
            index += layers + (0 if b == len(down_layers) - 1 else 1)  # + the downsampler
        up_start, index = [], 0
        for layers in up_layers:
            up_start.append(index)
            index += layers
        return cls(
            down_start=tuple(down_start),
            down_layers=down_layers,
            up_start=tuple(up_start),
            up_layers=up_layers,
            up_attention=tuple(UP_TYPES[t] for t in up_types),
        )


def _inner(kind: str, rest: str, module: str) -> tuple[int, str]:
    """(sub-index inside the sgm block, inner path) for a resnet or transformer layer."""
    if kind == "attentions":
        return 1, rest
    if rest not in RESNET_LAYERS:
        raise UserError(f"LoRA module '{module}' has no counterpart in the original SDXL layout.")
    return 0, RESNET_LAYERS[rest]


def sgm_module_name(module: str, layout: SgmLayout) -> str:
    """The original-SDXL (sgm) path of a diffusers UNet module path."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    if match := _DOWN.fullmatch(module):
        block, kind, layer, rest = match.groups()
        sub, inner = _inner(kind, rest, module)
        return f"input_blocks.{layout.down_start[int(block)] + int(layer)}.{sub}.{inner}"
    if match := _DOWNSAMPLER.fullmatch(module):
        block = int(match.group(1))
        return f"input_blocks.{layout.down_start[block] + layout.down_layers[block]}.0.op"
    if match := _MID.fullmatch(module):
        kind, layer, rest = match.groups()
        sub, inner = _inner(kind, rest, module)
        # sgm's middle block is [ResBlock, transformer, ResBlock].
        position = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get(
            (kind, layer)
        )
        if position is None:
            raise UserError(
                f"LoRA module '{module}' has no counterpart in the original SDXL layout."
            )
        return f"middle_block.{position}.{inner}"
    if match := _UP.fullmatch(module):
        block, kind, layer, rest = match.groups()
        sub, inner = _inner(kind, rest, module)
        return f"output_blocks.{layout.up_start[int(block)] + int(layer)}.{sub}.{inner}"
    if match := _UPSAMPLER.fullmatch(module):
        block = int(match.group(1))
        last = layout.up_start[block] + layout.up_layers[block] - 1
        return f"output_blocks.{last}.{2 if layout.up_attention[block] else 1}.conv"
    raise UserError(f"LoRA module '{module}' has no counterpart in the original SDXL layout.")


def kohya_name(module: str, layout: SgmLayout) -> str:
    """``lora_unet_<sgm path>`` with dots as underscores: the name kohya files use."""
    return KOHYA_PREFIX + sgm_module_name(module, layout).replace(".", "_")


def kohya_lookup(module_names: Iterable[str], config: Mapping[str, Any] | Any) -> dict[str, str]:
    """kohya name -> diffusers module path, for every given module of a UNet.

    Both spellings are accepted when reading: the sgm one (SDXL files from kohya-ss, ComfyUI,
    A1111) and the diffusers one with underscores (kohya-ss LoRAs trained on a diffusers UNet).
    """
    layout = SgmLayout.from_config(config)
    lookup: dict[str, str] = {}
    for module in module_names:
        lookup[KOHYA_PREFIX + module.replace(".", "_")] = module
        try:
            lookup[kohya_name(module, layout)] = module
        except UserError:
            continue  # a module sgm has no name for cannot appear in an sgm-named file
    return lookup
