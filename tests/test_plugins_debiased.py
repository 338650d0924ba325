"""The debiased-estimation plugin against its formula (Yu et al. 2024; kohya's sd-scripts
``apply_debiased_estimation``: weight = 1 / sqrt(min(SNR, 1000)) per sample), on SDXL's
schedule computed from scratch, and its combination with Min-SNR (the weights multiply)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naruto_lora.util.errors import UserError
from tests.test_plugins_behaviour import independent_snr, make_state, pm_with, snr_scheduler

T = 1000


def test_debiased_weights_match_the_formula_at_every_timestep() -> None:
    pm = pm_with("debiased_estimation")
    state = make_state(scheduler=snr_scheduler("epsilon", zero_terminal=False))
    timesteps = torch.arange(T)
    (weights,) = [
        w for w in pm.hook.nlora_loss_weights(state=state, timesteps=timesteps) if w is not None
    ]
    expected = 1.0 / np.sqrt(np.minimum(independent_snr(False), 1000.0))
    np.testing.assert_allclose(weights.double().numpy(), expected, rtol=1e-4)
    # The point of it: the noisiest timestep weighs far more than the cleanest.
    assert weights[-1] > 5 * weights[T // 2] > 5 * weights[0]


def test_debiased_weights_stay_finite_on_a_zero_terminal_snr_schedule() -> None:
    pm = pm_with("debiased_estimation")
    state = make_state(scheduler=snr_scheduler("epsilon", zero_terminal=True))
    (weights,) = [
        w
        for w in pm.hook.nlora_loss_weights(state=state, timesteps=torch.arange(T))
        if w is not None
    ]
    assert torch.isfinite(weights).all()
    assert weights[-1] == pytest.approx(float(weights[-2]), rel=1e-6)  # the smallest positive SNR's


def test_debiased_and_min_snr_both_contribute_a_weight() -> None:
    pm = pm_with("debiased_estimation", "min_snr", min_snr__gamma="5.0")
    state = make_state(scheduler=snr_scheduler("epsilon", zero_terminal=False))
    t = torch.tensor([10, 500, 990])
    weights = [w for w in pm.hook.nlora_loss_weights(state=state, timesteps=t) if w is not None]
    assert len(weights) == 2
    snr = independent_snr(False)[t.numpy()]
    expected = (1.0 / np.sqrt(snr)) * np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose((weights[0] * weights[1]).double().numpy(), expected, rtol=1e-4)


def test_debiased_refuses_v_prediction_and_a_bad_cap() -> None:
    pm = pm_with("debiased_estimation")
    state = make_state(scheduler=snr_scheduler("v_prediction", zero_terminal=False))
    with pytest.raises(UserError, match="epsilon"):
        pm.hook.nlora_loss_weights(state=state, timesteps=torch.arange(3))
    with pytest.raises(UserError, match="max_snr"):
        pm_with("debiased_estimation", debiased_estimation__max_snr="0.0")
