"""kohya (original SDXL "sgm") names for LoRA modules, checked two independent ways: diffusers' own
kohya-to-diffusers conversion must give back every module, and on full-size SDXL a hand-written
statement of SDXL's block numbering must agree with the names derived from the config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from naruto_lora.lora.kohya import KOHYA_PREFIX, SgmLayout, kohya_lookup, kohya_name
from naruto_lora.util.errors import UserError

DATA = Path(__file__).parent / "data"
# Every kind of Linear / Conv2d layer an SDXL UNet has.
ALL_LAYER_KINDS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv",
    "upsamplers.0.conv", "conv_in", "conv_out", "linear_1", "linear_2",
]  # fmt: skip


def meta_unet_with_lora(config: dict, targets: list[str]):
    """The UNet architecture on the meta device (no weights) with a peft LoRA injected."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    modules = [name for name, m in unet.named_modules() if isinstance(m, LoraLayer)]
    return unet, modules


def diffusers_reads_back(names: dict[str, str], unet_config) -> set[str]:
    """Feed the kohya names to diffusers' SDXL loader conversion; the module paths it targets."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    fake = {}
    for kohya in names.values():
        fake[f"{kohya}.lora_down.weight"] = torch.zeros(1, 1)
        fake[f"{kohya}.lora_up.weight"] = torch.zeros(1, 1)
        fake[f"{kohya}.alpha"] = torch.tensor(1.0)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(fake, unet_config=unet_config)
    peft_keys = convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in converted.items()}
    )
    return {key.rsplit(".lora_", 1)[0] for key in peft_keys}


def sdxl_sgm_name(module: str) -> str:
    """SDXL base's layout written out by hand (layers_per_block 2; block 0 without attention):
    input block of down block b, layer j = 3b + j + 1; its downsampler 3b + 3; output block of up
    block b, layer j = 3b + j; the upsampler is the third entry of the block's last output block."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}  # fmt: skip
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    if module in fixed:
        return fixed[module]
    parts = module.split(".")
    if parts[0] == "mid_block":
        position = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        return f"middle_block.{position}.{resnet.get(rest, rest)}"
    block = int(parts[1])
    if parts[2] == "downsamplers":
        return f"input_blocks.{3 * block + 3}.0.op"
    if parts[2] == "upsamplers":
        return f"output_blocks.{3 * block + 2}.2.conv"
    layer, rest = int(parts[3]), ".".join(parts[4:])
    sub, rest = (1, rest) if parts[2] == "attentions" else (0, resnet[rest])
    index = 3 * block + layer + 1 if parts[0] == "down_blocks" else 3 * block + layer
    kind = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    return f"{kind}.{index}.{sub}.{rest}"


@pytest.fixture(scope="module")
def sdxl():
    config = json.loads((DATA / "sdxl_unet_config.json").read_text())
    unet, modules = meta_unet_with_lora(config, ALL_LAYER_KINDS)
    layout = SgmLayout.from_config(unet.config)
    return unet, modules, {m: kohya_name(m, layout) for m in modules}


def test_sdxl_names_follow_the_original_block_layout(sdxl):
    unet, modules, names = sdxl
    assert len(modules) == 794  # every Linear/Conv2d of the SDXL UNet
    for module, kohya in names.items():
        assert kohya == KOHYA_PREFIX + sdxl_sgm_name(module).replace(".", "_"), module
    valid = re.compile(
        r"lora_unet_(input_blocks_0_0|input_blocks_[1-8]_[01]_.+|input_blocks_[36]_0_op"
        r"|middle_block_[012]_.+|output_blocks_[0-8]_[01]_.+|output_blocks_[25]_2_conv"
        r"|time_embed_[02]|label_emb_0_[02]|out_2)"
    )
    for kohya in names.values():
        assert valid.fullmatch(kohya), kohya
    # Attention only where SDXL has it: input blocks 4, 5, 7, 8; output blocks 0-5.
    attention = {re.match(r"lora_unet_(\w+?_\d+)_1_", k).group(1) for k in names.values()
                 if "transformer_blocks" in k and "middle" not in k}  # fmt: skip
    assert attention == {"input_blocks_4", "input_blocks_5", "input_blocks_7", "input_blocks_8",
                         *(f"output_blocks_{i}" for i in range(6))}  # fmt: skip
    assert len(set(names.values())) == len(names)


def test_sdxl_well_known_names(sdxl):
    _, _, names = sdxl
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert names["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0"] == (
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    )
    assert names["mid_block.attentions.0.transformer_blocks.3.ff.net.0.proj"] == (
        "lora_unet_middle_block_1_transformer_blocks_3_ff_net_0_proj"
    )
    assert names["up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == (
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k"
    )
    assert names["up_blocks.2.resnets.2.conv2"] == "lora_unet_output_blocks_8_0_out_layers_3"
    assert (
        names["down_blocks.0.resnets.1.time_emb_proj"] == "lora_unet_input_blocks_2_0_emb_layers_1"
    )


def test_sdxl_names_are_read_back_by_diffusers(sdxl):
    unet, modules, names = sdxl
    assert diffusers_reads_back(names, unet.config) == set(modules)


def test_attention_lora_count_on_sdxl(sdxl):
    """SDXL has 70 transformer blocks with 2 attentions of 4 projections each."""
    _, modules, names = sdxl
    attention = [m for m in modules if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", m)]
    assert len(attention) == 560 == len({names[m] for m in attention})


def test_tiny_model_names_are_read_back_by_diffusers(tiny_model_dir):
    """The layout comes from the config: the tiny UNet (1 layer per block, 2 blocks) too."""
    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    unet, modules = meta_unet_with_lora(config, ALL_LAYER_KINDS)
    names = {m: kohya_name(m, SgmLayout.from_config(unet.config)) for m in modules}
    assert diffusers_reads_back(names, unet.config) == set(modules)
    assert names["down_blocks.0.downsamplers.0.conv"] == "lora_unet_input_blocks_2_0_op"
    assert names["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_1_2_conv"


def test_lookup_accepts_sgm_and_diffusers_spellings():
    config = json.loads((DATA / "sdxl_unet_config.json").read_text())
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    lookup = kohya_lookup([module], config)
    assert lookup == {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": module,
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": module,
    }


def test_unknown_block_types_are_a_clear_error():
    config = json.loads((DATA / "sdxl_unet_config.json").read_text())
    config["down_block_types"] = [
        "DownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ]
    with pytest.raises(UserError, match="SimpleCrossAttnDownBlock2D"):
        SgmLayout.from_config(config)
