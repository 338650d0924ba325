"""Memory-efficient attention: PyTorch's scaled-dot-product attention processors on the UNet, or
xformers when asked for and installed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from naruto_lora.errors import UserError
from naruto_lora.hookspecs import hookimpl
from naruto_lora.plugins import Plugin


@dataclass(frozen=True)
class SDPAConfig:
    backend: Literal["sdpa", "xformers"] = "sdpa"


def sdpa_backends() -> dict[str, bool]:
    """Which fused SDPA kernels this torch build and device can use."""
    import torch

    info = {"flash": False, "mem_efficient": False, "math": True}
    if torch.cuda.is_available():
        info["flash"] = torch.backends.cuda.flash_sdp_enabled()
        info["mem_efficient"] = torch.backends.cuda.mem_efficient_sdp_enabled()
    return info


class SDPA(Plugin):
    name = "sdpa"
    Config = SDPAConfig
    description = (
        "Fused scaled-dot-product attention (flash / memory-efficient kernels), or xformers."
    )

    @hookimpl
    def nlora_prepare_unet(self, unet, profile, training: bool) -> None:
        if self.config.backend == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise UserError(
                    "plugins.sdpa.backend = 'xformers' but xformers is not installed.",
                    hint="pip install xformers, or set plugins.sdpa.backend = 'sdpa'.",
                )
            unet.enable_xformers_memory_efficient_attention()
            return
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())

    @hookimpl
    def nlora_doctor_checks(self, facts, profile):
        import torch

        backends = sdpa_backends()
        kernels = ", ".join(k for k, on in backends.items() if on)
        return [
            {
                "check": "attention (sdpa plugin)",
                "status": "ok",
                "detail": f"backend {self.config.backend}; torch {torch.__version__} SDPA kernels: {kernels}",
            }
        ]


PLUGIN = SDPA
