"""Each built-in plugin against its reference: the Min-SNR formula (Hang et al. 2023), offset
noise's shape and statistics, the EMA update rule and swap/restore, SDPA processors, gradient
checkpointing giving the same gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from naruto_lora.lora.inject import EMA_SUBFOLDER, inject_lora, lora_state_dict
from naruto_lora.plugins.manager import build_plugin_manager, load_profile
from naruto_lora.plugins.state import TrainState
from naruto_lora.train.outputs import weights_to_save
from naruto_lora.util.errors import UserError

T = 1000


def make_state(unet: torch.nn.Module | None = None, scheduler=None) -> TrainState:
    profile = load_profile("smoke")
    unet = unet if unet is not None else torch.nn.Linear(2, 2)
    params = [p for p in unet.parameters() if p.requires_grad]
    return TrainState(
        profile=profile,
        unet=unet,
        noise_scheduler=scheduler,
        lora_parameters=params,
        device=torch.device("cpu"),
        weight_dtype=torch.float32,
        output_dir=Path("."),
    )


def pm_with(*enabled: str, **overrides: str):
    sets = [f"plugins.{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    profile = load_profile(
        "smoke",
        overrides=sets,
        enable=list(enabled),
        disable=[n for n in load_profile("smoke").enabled_plugins() if n not in enabled],
    )
    return build_plugin_manager(profile)


# --------------------------------------------------------------------------- min_snr


def independent_snr(rescale_zero_terminal: bool) -> np.ndarray:
    """SDXL's scaled-linear schedule computed from scratch in float64 (no diffusers code)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    if rescale_zero_terminal:  # Lin et al. 2023, Algorithm 1, on sqrt(alpha_bar)
        s = np.sqrt(alphas_cumprod)
        s0, st = s[0], s[-1]
        s = (s - st) * s0 / (s0 - st)
        alphas_cumprod = s**2
    with np.errstate(divide="ignore"):
        return alphas_cumprod / (1.0 - alphas_cumprod)


def paper_weights(snr: np.ndarray, gamma: float, prediction_type: str) -> np.ndarray:
    """Hang et al. 2023, eq. for Min-SNR-gamma: min(SNR, g) / SNR for epsilon (limit 1 at SNR
    = 0), min(SNR, g) / (SNR + 1) for v-prediction."""
    clipped = np.minimum(snr, gamma)
    if prediction_type == "epsilon":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(snr > 0, clipped / snr, 1.0)
    return clipped / (snr + 1.0)


def snr_scheduler(prediction_type: str, zero_terminal: bool):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_terminal", [False, True])
def test_min_snr_matches_the_paper_at_every_timestep(prediction_type, zero_terminal) -> None:
    gamma = 5.0
    pm = pm_with("min_snr", min_snr__gamma="5.0")
    state = make_state(scheduler=snr_scheduler(prediction_type, zero_terminal))
    timesteps = torch.arange(T)
    (weights,) = [
        w for w in pm.hook.nlora_loss_weights(state=state, timesteps=timesteps) if w is not None
    ]
    assert weights.shape == (T,)
    assert torch.isfinite(weights).all()
    expected = paper_weights(independent_snr(zero_terminal), gamma, prediction_type)
    # diffusers clamps the zero-SNR schedule's last alpha_bar to 2**-24; compare in relative terms.
    np.testing.assert_allclose(weights.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_min_snr_differs_from_the_reference_documents_table() -> None:
    """The reference's example says weight 5.0 at SNR 0.001; the paper's epsilon weight there is
    min(0.001, 5) / 0.001 = 1 (noisy steps are never up-weighted)."""
    from nlora_plugins.min_snr import min_snr_weights

    snr = torch.tensor([0.001, 1.0, 100.0], dtype=torch.float64)
    eps = min_snr_weights(snr, 5.0, "epsilon")
    v = min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 0.05], dtype=torch.float64))
    torch.testing.assert_close(v, snr.clamp(max=5.0) / (snr + 1))
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        min_snr_weights(snr, 5.0, "sample")


# --------------------------------------------------------------------------- offset_noise


def test_offset_noise_shape_and_statistics() -> None:
    strength = 0.5
    pm = pm_with("offset_noise", offset_noise__strength=str(strength))
    latents = torch.zeros(2048, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    noise = pm.hook.nlora_sample_noise(state=make_state(), latents=latents, generator=generator)
    assert noise.shape == latents.shape and noise.dtype == latents.dtype
    # Each (sample, channel) plane is white noise plus one constant strength * N(0, 1):
    # the plane means have variance strength^2 + 1 / (h * w); the total variance is 1 + strength^2.
    plane_means = noise.mean(dim=(2, 3))
    assert plane_means.var().item() == pytest.approx(strength**2 + 1 / 64, rel=0.05)
    assert noise.var().item() == pytest.approx(1 + strength**2, rel=0.03)
    # Within a plane the offset cancels: deviations from the plane mean are unit white noise.
    within = noise - noise.mean(dim=(2, 3), keepdim=True)
    assert within.var().item() * 64 / 63 == pytest.approx(1.0, rel=0.02)


def test_offset_noise_is_the_rule_and_core_default_is_plain() -> None:
    latents = torch.zeros(3, 4, 5, 6)
    pm = pm_with("offset_noise", offset_noise__strength="0.1")
    got = pm.hook.nlora_sample_noise(
        state=make_state(), latents=latents, generator=torch.Generator().manual_seed(7)
    )
    reference = torch.Generator().manual_seed(7)
    base = torch.randn(latents.shape, generator=reference)
    offset = torch.randn((3, 4, 1, 1), generator=reference)
    torch.testing.assert_close(got, base + 0.1 * offset, rtol=0, atol=0)
    plain = pm_with().hook.nlora_sample_noise(
        state=make_state(), latents=latents, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(plain, base, rtol=0, atol=0)


# --------------------------------------------------------------------------- ema


@pytest.fixture(scope="module")
def lora_unet(tiny_model_dir: Path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    inject_lora(unet, load_profile("smoke").lora)
    return unet


def trainable(unet) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def reference_ema(snapshots: list[dict[str, torch.Tensor]], decay: float, warmup: bool):
    """The EMA rule written out: shadow_0 = the weights at train start, then per update t
    shadow = d_t * shadow + (1 - d_t) * param, d_t = min(decay, (1 + t) / (10 + t))."""
    shadow = {k: v.double().clone() for k, v in snapshots[0].items()}
    for t, params in enumerate(snapshots[1:]):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        shadow = {k: d * shadow[k] + (1 - d) * params[k].double() for k in shadow}
    return shadow


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_its_update_rule(lora_unet, warmup: bool) -> None:
    pm = pm_with("ema", ema__decay="0.9", ema__warmup=str(warmup).lower(), ema__device='"cpu"')
    state = make_state(lora_unet)
    pm.hook.nlora_train_start(state=state)
    snapshots = [{n: p.detach().clone() for n, p in trainable(lora_unet).items()}]
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in trainable(lora_unet).values():
                p.add_(torch.randn(p.shape, generator=generator))
        snapshots.append({n: p.detach().clone() for n, p in trainable(lora_unet).items()})
        pm.hook.nlora_after_optimizer_step(state=state)
    expected = reference_ema(snapshots, 0.9, warmup)
    shadow = pm.get_plugin("ema").shadow
    for name, value in expected.items():
        assert shadow[name].device.type == "cpu"
        torch.testing.assert_close(shadow[name].double(), value, rtol=1e-5, atol=1e-6)


def test_ema_swaps_in_for_validation_and_restores(lora_unet) -> None:
    pm = pm_with("ema", ema__decay="0.5")
    state = make_state(lora_unet)
    pm.hook.nlora_train_start(state=state)
    with torch.no_grad():
        for p in trainable(lora_unet).values():
            p.add_(1.0)
    pm.hook.nlora_after_optimizer_step(state=state)
    raw = {n: p.detach().clone() for n, p in trainable(lora_unet).items()}
    shadow = pm.get_plugin("ema").shadow
    seen = {}

    def validate(state):
        seen.update({n: p.detach().clone() for n, p in trainable(state.unet).items()})
        return "sampled"

    result = pm.hook.nlora_validation_weights.call_extra([validate], {"state": state})
    assert result == ["sampled"]
    for name in raw:
        torch.testing.assert_close(seen[name], shadow[name], rtol=0, atol=0)
        assert not torch.equal(seen[name], raw[name])
        torch.testing.assert_close(trainable(lora_unet)[name].detach(), raw[name], rtol=0, atol=0)

    def fails(state):
        raise RuntimeError("sampling broke")

    with pytest.raises(RuntimeError, match="sampling broke"):
        pm.hook.nlora_validation_weights.call_extra([fails], {"state": state})
    for name in raw:  # restored even when sampling raised
        torch.testing.assert_close(trainable(lora_unet)[name].detach(), raw[name], rtol=0, atol=0)


def test_ema_weights_to_save_and_checkpoint_round_trip(lora_unet) -> None:
    pm = pm_with("ema", ema__decay="0.5")
    state = make_state(lora_unet)
    pm.hook.nlora_train_start(state=state)
    with torch.no_grad():
        for p in trainable(lora_unet).values():
            p.mul_(3.0)
    pm.hook.nlora_after_optimizer_step(state=state)
    weights = weights_to_save(pm, state)
    assert set(weights) == {"", EMA_SUBFOLDER}
    assert weights[""].keys() == lora_state_dict(lora_unet).keys()
    for key, value in lora_state_dict(lora_unet).items():
        torch.testing.assert_close(weights[""][key], value, rtol=0, atol=0)
    assert any(not torch.equal(weights[""][k], weights[EMA_SUBFOLDER][k]) for k in weights[""])

    saved = {}
    for part in pm.hook.nlora_checkpoint_state(state=state):
        saved.update(part or {})
    fresh = pm_with("ema", ema__decay="0.5")
    fresh.hook.nlora_train_start(state=state)
    fresh.hook.nlora_load_checkpoint_state(state=state, saved=saved)
    restored = fresh.get_plugin("ema")
    assert restored.num_updates == 1
    for name, value in pm.get_plugin("ema").shadow.items():
        torch.testing.assert_close(restored.shadow[name], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- sdpa / checkpointing


def test_sdpa_sets_torch_sdpa_processors_and_reports_in_doctor(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.set_attn_processor(AttnProcessor())  # start from the plain processor
    profile = load_profile("smoke", enable=["sdpa"])
    pm = build_plugin_manager(profile)
    pm.hook.nlora_prepare_unet(unet=unet, profile=profile, training=True)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    rows = [r for rows in pm.hook.nlora_doctor_checks(facts={}, profile=profile) for r in rows]
    assert any(r["check"].startswith("attention") and "sdpa" in r["detail"] for r in rows)


def test_sdpa_xformers_missing_is_a_user_error(tiny_model_dir: Path, monkeypatch) -> None:
    import importlib.util

    from diffusers import UNet2DConditionModel

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "xformers" else real(n, *a)
    )
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    profile = load_profile("smoke", enable=["sdpa"], overrides=['plugins.sdpa.backend="xformers"'])
    with pytest.raises(UserError, match="xformers is not installed"):
        build_plugin_manager(profile).hook.nlora_prepare_unet(
            unet=unet, profile=profile, training=True
        )


def lora_grads(tiny_model_dir: Path, checkpointing: bool) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    torch.manual_seed(0)
    inject_lora(unet, load_profile("smoke").lora)
    with torch.no_grad():  # non-zero B so gradients reach A too
        for n, p in trainable(unet).items():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    profile = load_profile("smoke", enable=["gradient_checkpointing"] if checkpointing else [])
    build_plugin_manager(profile).hook.nlora_prepare_unet(unet=unet, profile=profile, training=True)
    assert unet.is_gradient_checkpointing == checkpointing
    unet.train()
    g = torch.Generator().manual_seed(2)
    out = unet(
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 77, 80, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 40, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        },
    ).sample
    out.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in trainable(unet).items()}


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_model_dir: Path) -> None:
    plain = lora_grads(tiny_model_dir, checkpointing=False)
    checkpointed = lora_grads(tiny_model_dir, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_is_off_when_not_training(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    profile = load_profile("smoke", enable=["gradient_checkpointing"])
    build_plugin_manager(profile).hook.nlora_prepare_unet(
        unet=unet, profile=profile, training=False
    )
    assert not unet.is_gradient_checkpointing
