"""The sdpa plugin's kernel choice: every kernel this CPU runs gives the same UNet outputs and
LoRA gradients as diffusers' plain attention processor (softmax(QK^T / sqrt(d)) V written out),
the kernel asked for is the one dispatched, ``auto`` says which it took, and a kernel that does
not run here is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from naruto_lora.lora.inject import inject_lora
from naruto_lora.plugins.manager import build_plugin_manager, load_profile
from naruto_lora.util.errors import UserError

FLASH_CPU_OP = "aten._scaled_dot_product_flash_attention_for_cpu"


class DispatchedOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def unet(tiny_model_dir: Path):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    torch.manual_seed(0)
    inject_lora(model, load_profile("smoke").lora)
    with torch.no_grad():  # non-zero B so the LoRA changes the output and gets gradients
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def inputs(unet) -> tuple:
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (
        torch.randn(2, cfg.in_channels, 32, 32, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
        {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 64,
        },
    )


def forward_backward(unet, checkpointing: bool = False) -> tuple[torch.Tensor, dict, set[str]]:
    unet.zero_grad(set_to_none=True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    latents, t, embeds, added = inputs(unet)
    torch.manual_seed(0)  # the same dropout masks (LoRA dropout) in every run
    ops = DispatchedOps()
    try:
        with ops:
            out = unet(latents, t, embeds, added_cond_kwargs=added).sample
            (out.float() ** 2).mean().backward()
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads, ops.names


def with_backend(unet, backend: str) -> None:
    profile = load_profile(
        "smoke", enable=["sdpa"], overrides=[f'plugins.sdpa.backend="{backend}"']
    )
    build_plugin_manager(profile).hook.nlora_prepare_unet(unet=unet, profile=profile, training=True)


def test_the_cpu_runs_flash_and_math_and_not_the_cuda_only_kernels() -> None:
    from nlora_plugins.sdpa import available_kernels

    runs = available_kernels("cpu", torch.float32)
    assert "math" in runs and "flash" in runs  # torch's CPU build has a flash kernel
    assert "efficient" not in runs and "cudnn" not in runs


def test_every_cpu_kernel_matches_plain_attention(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor
    from nlora_plugins.sdpa import available_kernels

    unet.set_attn_processor(AttnProcessor())  # the independent reference: no SDPA at all
    want_out, want_grads, ref_ops = forward_backward(unet)
    assert FLASH_CPU_OP not in ref_ops
    for kernel in available_kernels("cpu", torch.float32):
        with_backend(unet, kernel)
        out, grads, ops = forward_backward(unet)
        torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5, msg=kernel)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6, msg=kernel)
        assert (FLASH_CPU_OP in ops) == (kernel == "flash"), (kernel, sorted(ops))


def test_the_kernel_holds_through_gradient_checkpointing(unet) -> None:
    with_backend(unet, "math")
    _, plain, _ = forward_backward(unet)
    _, checkpointed, ops = forward_backward(unet, checkpointing=True)
    assert FLASH_CPU_OP not in ops
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_auto_takes_the_best_kernel_that_runs_and_says_which(unet, capsys) -> None:
    with_backend(unet, "auto")
    _, _, ops = forward_backward(unet)
    assert FLASH_CPU_OP in ops
    choice = next(iter(unet.attn_processors.values())).choice
    assert set(choice.names.values()) == {"flash"}
    assert "the flash kernel on cpu float32 (auto" in capsys.readouterr().out


def test_a_kernel_that_does_not_run_here_is_a_user_error(unet) -> None:
    with_backend(unet, "efficient")
    with pytest.raises(UserError, match="does not run on cpu.*kernels that do: flash, math"):
        forward_backward(unet)
    with_backend(unet, "sdpa")  # PyTorch's own choice: diffusers' processor as it loads
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_the_planner_counts_fused_kernels_as_fused_and_math_as_math(tiny_model_dir) -> None:
    """On the planner's fake tensors every fused CUDA kernel (also those the CPU lacks) is
    counted as the CPU flash kernel, O(tokens) memory; math keeps its attention matrix."""
    from naruto_lora.plan.models import load_model_configs
    from naruto_lora.plan.sim import simulate_training

    peaks = {}
    for backend in ("efficient", "flash", "math"):
        profile = load_profile(
            "smoke",
            enable=["sdpa"],
            overrides=[f'plugins.sdpa.backend="{backend}"'],
        )
        sim = simulate_training(profile, load_model_configs(profile.model), validation=False)
        peaks[backend] = sim.training.split["activations"]
    assert peaks["efficient"] == peaks["flash"] < peaks["math"]
