"""The style-LoRA training options: caption templates, caption dropout and Huber / smooth-L1
loss, each against an independent reference (the SDXL pipeline's own empty-prompt conditioning,
``torch.nn.functional``'s losses, the schedules' formulas), and each in a short training run that
lowers the denoising loss on the base, resumes bit for bit and exports a file diffusers loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from nlora_plugins.caption_dropout import drop_captions, dropout_mask
from nlora_plugins.huber_loss import huber_deltas, per_sample_huber
from safetensors.torch import load_file

from naruto_lora.lora.inject import WEIGHT_NAME
from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.plugins.manager import build_plugin_manager, load_profile
from naruto_lora.train import TrainOptions, train
from naruto_lora.train.conditioning import Conditioning
from tests.conftest import invoke
from tests.train_support import SignalAt, cli_args, plugin_manager, tiny_profile

TEMPLATE = "{caption}, toy ink style"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("options-cache")


# --------------------------------------------------------------------------- caption templates


def test_caption_template_text() -> None:
    from naruto_lora.data.sources import apply_caption_template

    assert apply_caption_template(TEMPLATE, "a red circle") == "a red circle, toy ink style"
    assert apply_caption_template(TEMPLATE, "") == "toy ink style"  # no stray comma
    assert apply_caption_template("", "a red circle") == "a red circle"
    assert apply_caption_template("{caption} {x}", "a") == "a {x}"  # other braces kept as written


def test_caption_template_reaches_the_text_cache_and_the_batches(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """The cache encodes the templated captions (each one its own entry: the template is part
    of what is fingerprinted) and training batches carry them."""
    from naruto_lora.cache import build_train_dataset, ensure_text_cache
    from naruto_lora.data.sources import scan_source

    plain = tiny_profile(tmp_path / "cache", tmp_path / "out", 'cache.text="disk"')
    styled = tiny_profile(
        tmp_path / "cache",
        tmp_path / "out",
        'cache.text="disk"',
        f'data.caption_template="{TEMPLATE}"',
    )
    raw = [item.caption for item in scan_source(plain.data).items]
    assert raw and not any("toy ink" in c for c in raw)
    plain_cache = ensure_text_cache(plain)
    styled_cache = ensure_text_cache(styled)
    assert sorted(plain_cache.captions) == sorted(set(raw))
    assert sorted(styled_cache.captions) == sorted({f"{c}, toy ink style" for c in raw})
    dataset = build_train_dataset(styled, None, styled_cache)
    batch = dataset.get_batch([0, 1])
    assert all(c.endswith(", toy ink style") for c in batch["caption"])
    # the stored embeddings are the templated caption's, not the plain one's
    assert not torch.equal(
        styled_cache.embeddings(f"{raw[0]}, toy ink style")[0], plain_cache.embeddings(raw[0])[0]
    )


def test_caption_template_without_the_placeholder_is_refused(cli_runner, tmp_path: Path) -> None:
    args = cli_args(tmp_path / "cache", tmp_path / "out", 'data.caption_template="toy ink style"')
    result = invoke(cli_runner, args)
    assert result.exit_code == 2
    assert "data.caption_template" in result.output and "{caption}" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- caption dropout


def test_dropout_rate_over_many_draws_and_its_determinism() -> None:
    p, n = 0.1, 40_000
    mask = dropout_mask(seed=7, step=3, indices=list(range(n)), probability=p)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(mask.float().mean().item() - p) < 4 * sigma
    # a function of (seed, step, index) only: the same again, and not the same at another step
    again = dropout_mask(seed=7, step=3, indices=list(range(100)), probability=p)
    assert torch.equal(again, mask[:100])
    other = dropout_mask(seed=7, step=4, indices=list(range(n)), probability=p)
    assert not torch.equal(other, mask)
    assert not dropout_mask(seed=7, step=3, indices=list(range(50)), probability=0.0).any()


def _conditioning(batch: int, seq: int, dim: int, pooled: int) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    return Conditioning(
        latents=torch.zeros(batch, 4, 8, 8),
        prompt_embeds=torch.randn(batch, seq, dim, generator=g),
        pooled_embeds=torch.randn(batch, pooled, generator=g),
        time_ids=torch.zeros(batch, 6),
    )


def _pipeline_empty_prompt(model_dir: Path, negative_prompt: str | None):
    """The SDXL pipeline's own negative conditioning for ``negative_prompt`` (reference)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(
            prompt="a red circle",
            device="cpu",
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )
    return negative, negative_pooled


def test_dropped_items_get_the_pipelines_zero_empty_prompt(tiny_model_dir: Path) -> None:
    """force_zeros_for_empty_prompt (SDXL base, the tiny model): the dropped items' embeddings
    are exactly what the pipeline uses for no negative prompt, zeros; the others unchanged."""
    from naruto_lora.models.loading import empty_prompt_embeddings

    model = load_profile("smoke", overrides=[f'model.pretrained="{tiny_model_dir}"']).model
    assert empty_prompt_embeddings(model, "cpu", torch.float32) is None  # zeros, no encoders
    negative, negative_pooled = _pipeline_empty_prompt(tiny_model_dir, None)
    cond = _conditioning(3, negative.shape[1], negative.shape[2], negative_pooled.shape[1])
    before = cond.prompt_embeds.clone(), cond.pooled_embeds.clone()
    drop_captions(cond, torch.tensor([True, False, True]), None)
    for i in (0, 2):
        assert torch.equal(cond.prompt_embeds[i], negative[0])
        assert torch.equal(cond.pooled_embeds[i], negative_pooled[0])
    assert torch.equal(cond.prompt_embeds[1], before[0][1])
    assert torch.equal(cond.pooled_embeds[1], before[1][1])


def test_dropped_items_get_the_encoded_empty_string_without_force_zeros(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from naruto_lora.models.loading import empty_prompt_embeddings

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (model_dir / "model_index.json").write_text(json.dumps(index))
    model = load_profile("smoke", overrides=[f'model.pretrained="{model_dir}"']).model
    empty = empty_prompt_embeddings(model, "cpu", torch.float32)
    negative, negative_pooled = _pipeline_empty_prompt(model_dir, "")
    assert empty is not None
    torch.testing.assert_close(empty[0], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(empty[1], negative_pooled, rtol=0, atol=1e-6)
    assert empty[0].abs().max() > 0  # not zeros: the encoded empty string
    cond = _conditioning(2, negative.shape[1], negative.shape[2], negative_pooled.shape[1])
    drop_captions(cond, torch.tensor([False, True]), empty)
    assert torch.equal(cond.prompt_embeds[1], empty[0][0])
    assert torch.equal(cond.pooled_embeds[1], empty[1][0])


class SeenConditioning:
    """Records, after every other plugin adjusted it, which items of each micro-batch the UNet
    gets with all-zero text conditioning, and the draw's arguments."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int], list[bool]]] = []

    @hookimpl(trylast=True)
    def nlora_adjust_conditioning(self, state, conditioning, batch) -> None:
        zero = (conditioning.prompt_embeds.flatten(1) == 0).all(1)
        zero &= (conditioning.pooled_embeds == 0).all(1)
        self.seen.append((state.global_step, batch["index"].tolist(), zero.tolist()))


@pytest.mark.parametrize("text", ["disk", "memory"])
def test_training_drops_exactly_the_drawn_captions(text: str, cache_dir: Path, tmp_path: Path):
    """In a real run the UNet sees the empty prompt for exactly the items ``dropout_mask``
    draws for (seed, step, index), with text from the disk cache or from the encoders."""
    profile = tiny_profile(
        cache_dir, tmp_path / "run", "train.batch_size=4", "train.max_steps=6",
        "plugins.caption_dropout.probability=0.5", f'cache.text="{text}"', only=["caption_dropout"],
    )  # fmt: skip
    recorder = SeenConditioning()
    train(profile, TrainOptions(device="cpu"), pm=plugin_manager(profile, recorder))
    assert len(recorder.seen) == 6 * profile.train.gradient_accumulation_steps
    dropped = 0
    for step, indices, zero in recorder.seen:
        expected = dropout_mask(profile.train.seed, step, indices, 0.5).tolist()
        assert zero == expected, (step, indices)
        dropped += sum(zero)
    assert 0 < dropped < 4 * len(recorder.seen)  # some dropped, not all


# --------------------------------------------------------------------------- Huber / smooth L1


def test_huber_and_smooth_l1_match_torch_per_sample() -> None:
    g = torch.Generator().manual_seed(1)
    prediction = torch.randn(3, 4, 5, 5, generator=g)
    target = torch.randn(3, 4, 5, 5, generator=g)
    deltas = torch.tensor([0.05, 0.5, 2.0])
    huber = per_sample_huber(prediction, target, deltas, "huber")
    smooth = per_sample_huber(prediction, target, deltas, "smooth_l1")
    for i, d in enumerate(deltas.tolist()):
        ref = F.huber_loss(prediction[i], target[i], delta=d)
        torch.testing.assert_close(huber[i], ref, rtol=1e-6, atol=1e-7)
        ref = F.smooth_l1_loss(prediction[i], target[i], beta=d)
        torch.testing.assert_close(smooth[i], ref, rtol=1e-6, atol=1e-7)


def test_huber_delta_schedules_follow_their_formulas() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = scheduler.alphas_cumprod.double()
    t = torch.tensor([0, 1, 250, 500, 999])
    c, steps = 0.1, scheduler.config.num_train_timesteps
    constant = huber_deltas("constant", c, t, scheduler.alphas_cumprod)
    assert torch.equal(constant, torch.full((5,), c, dtype=torch.float32))
    exponential = huber_deltas("exponential", c, t, scheduler.alphas_cumprod)
    for k, step in enumerate(t.tolist()):
        # alpha = -ln(c) / T, delta(t) = exp(-alpha t)
        assert exponential[k].item() == pytest.approx(math.exp(math.log(c) / steps * step), 1e-6)
        sigma = math.sqrt((1 - abar[step].item()) / abar[step].item())
        expected = (1 - c) / (1 + sigma) ** 2 + c
        snr = huber_deltas("snr", c, t, scheduler.alphas_cumprod)
        assert snr[k].item() == pytest.approx(expected, rel=1e-6)
    assert exponential[0] == 1.0 and snr[0] > snr[-1] > c


def test_huber_loss_is_weighted_by_min_snr_in_the_training_loss(tmp_path: Path) -> None:
    """Through the loop's own ``compute_loss``: Huber per sample times Min-SNR's weights, each
    computed here from torch and the paper's formula."""
    from diffusers import DDPMScheduler

    from naruto_lora.train.loop import compute_loss

    profile = tiny_profile(
        tmp_path / "c",
        tmp_path / "o",
        'plugins.huber_loss.schedule="constant"',
        "plugins.huber_loss.delta=0.3",
        "plugins.min_snr.gamma=5.0",
        only=["huber_loss", "min_snr"],
    )
    pm = build_plugin_manager(profile)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    state = SimpleNamespace(
        profile=profile, noise_scheduler=scheduler, device=torch.device("cpu"),
        weight_dtype=torch.float32, global_step=0,
    )  # fmt: skip
    cond = _conditioning(4, 8, 16, 8)
    g = torch.Generator().manual_seed(3)
    prediction = torch.randn(4, 4, 8, 8, generator=g)
    run = SimpleNamespace(
        state=state,
        pm=pm,
        conditioner=lambda batch: cond,
        generator=torch.Generator().manual_seed(5),
        model=lambda *args, **kwargs: (prediction,),
    )
    loss = compute_loss(run, {"index": torch.arange(4)})
    # the same draws as the core's defaults: noise first, then uniform timesteps
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(cond.latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (4,), generator=g)
    abar = scheduler.alphas_cumprod[timesteps].double()
    snr = abar / (1 - abar)
    weights = torch.clamp(snr, max=5.0) / snr
    huber = torch.stack([F.huber_loss(prediction[i], noise[i], delta=0.3) for i in range(4)])
    expected = (huber.double() * weights).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- Prodigy


def test_prodigy_plugin_steps_like_prodigyopt_driven_by_hand(tmp_path: Path) -> None:
    """The plugin's optimizer and ``prodigyopt.Prodigy`` built here with the same settings,
    fed the same gradients: the same parameters and the same D after every step."""
    from prodigyopt import Prodigy

    from naruto_lora.train.schedule import make_optimizer

    profile = tiny_profile(
        tmp_path / "c", tmp_path / "o", "train.learning_rate=1.0", "train.adam_weight_decay=0.01",
        "plugins.prodigy.d_coef=0.5", only=["prodigy"],
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 4, generator=g), torch.zeros(4, 8)]  # an A and a zero B
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = make_optimizer(build_plugin_manager(profile), ours, profile, torch.device("cpu"))
    cfg = profile.train
    reference = Prodigy(
        theirs, lr=1.0, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        weight_decay=0.01, decouple=True, d_coef=0.5, use_bias_correction=False,
        safeguard_warmup=False,
    )  # fmt: skip
    assert type(optimizer) is Prodigy
    goal = [torch.randn(t.shape, generator=g) for t in start]
    for _ in range(12):  # the gradient of |p - goal|^2: a steady direction that D can learn
        grads = [2 * (p.detach() - t) for p, t in zip(ours, goal, strict=True)]
        for params, opt in ((ours, optimizer), (theirs, reference)):
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            opt.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)
        assert optimizer.param_groups[0]["d"] == reference.param_groups[0]["d"]
    assert reference.param_groups[0]["d"] > 1e-6  # D adapted


def test_fit_keeps_prodigy_and_counts_its_state() -> None:
    """``nlora plan --fit`` does not swap Prodigy for (8-bit) AdamW, and sizes its state as
    the plugin declares: 16 bytes per LoRA parameter against AdamW's 8."""
    from naruto_lora.plan.fit import chosen_optimizer, optimizer_choices, optimizer_state_bytes

    plain = load_profile("14gb")
    with_prodigy = load_profile("14gb", enable=["prodigy"])
    assert optimizer_choices(plain) == ("adamw", "adamw8bit")
    assert chosen_optimizer(plain) == "adamw"
    assert optimizer_choices(with_prodigy) == ("prodigy",)
    assert chosen_optimizer(with_prodigy) == "prodigy"
    assert (optimizer_state_bytes("adamw"), optimizer_state_bytes("prodigy")) == (8.0, 16.0)


# --------------------------------------------------------------------------- conv-layer LoRA


def test_conv_layers_get_their_own_rank_and_alpha(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LoCon: the targeted convolutions get lora.conv_rank / conv_alpha, the attention layers
    keep lora.rank / alpha, checked on peft's own layers after injection."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    from naruto_lora.lora.inject import inject_lora

    profile = tiny_profile(
        tmp_path / "c", tmp_path / "o",
        'lora.target_modules=["to_q", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv"]',
        "lora.rank=4", "lora.alpha=4", "lora.conv_rank=2", only=[],
    )  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    inject_lora(unet, profile.lora)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    convs = {n for n, m in layers.items() if isinstance(m.base_layer, torch.nn.Conv2d)}
    assert any(n.endswith("conv_shortcut") for n in convs)
    assert any("downsamplers" in n for n in convs)
    for name, layer in layers.items():
        rank, alpha = (2, 2.0) if name in convs else (4, 4.0)  # conv alpha: 4 / 4 x 2
        assert (layer.r["default"], layer.lora_alpha["default"]) == (rank, alpha), name
        if name in convs:  # a 3x3 conv's LoRA: a 3x3 down and a 1x1 up convolution
            down = layer.lora_A["default"].weight
            assert down.shape[0] == 2 and down.shape[2:] == layer.base_layer.weight.shape[2:]


def test_targeting_a_layer_kohya_drops_warns(cli_runner, tmp_path: Path) -> None:
    args = cli_args(tmp_path / "c", tmp_path / "o", 'lora.target_modules=["to_q", "conv_in"]')
    result = invoke(cli_runner, args)
    assert result.exit_code == 0, result.output
    assert "conv_in" in result.output and "drop" in result.output


# --------------------------------------------------------------------------- short training runs

# option: (plugins on, profile settings, extra settings of the quality run)
OPTIONS = {
    # Prodigy starts from a tiny step size (d0 = 1e-6) and needs some steps to grow it
    "prodigy": (["prodigy"], ["train.learning_rate=1.0"], ["train.max_steps=40"]),
    "caption_dropout": (["caption_dropout"], ["plugins.caption_dropout.probability=0.5"], []),
    "caption_dropout_text_in_memory": (
        ["caption_dropout"],
        ["plugins.caption_dropout.probability=0.5", 'cache.text="memory"'],
        [],
    ),
    "huber_snr": (["huber_loss"], ['plugins.huber_loss.schedule="snr"'], []),
    "locon": (
        [],
        [
            'lora.target_modules=["to_q", "to_v", "conv1", "conv2", "conv_shortcut", '
            '"downsamplers.0.conv", "upsamplers.0.conv"]',
            "lora.conv_rank=2",
            "lora.conv_alpha=1",
        ],
        [],
    ),
    "dora": ([], ["lora.use_dora=true"], []),
    "dora_locon": (
        [],
        ["lora.use_dora=true", 'lora.target_modules=["to_q", "to_v", "conv1", "conv2"]'],
        [],
    ),
    # the frozen base in 8 bits: trained on it, evaluated and exported on the full-precision base
    "int8_base": ([], ['model.base_weights="int8"'], []),
    "int8_base_dora": ([], ['model.base_weights="int8"', "lora.use_dora=true"], []),
    # the 14gb way: text encoded every step by resident (here int8) encoders
    "int8_base_text_in_memory": ([], ['model.base_weights="int8"', 'cache.text="memory"'], []),
    "fp8_base_locon": (
        [],
        ['model.base_weights="fp8"', 'lora.target_modules=["to_q", "to_v", "conv1"]'],
        [],
    ),
    "smooth_l1_exponential": (
        ["huber_loss"],
        ['plugins.huber_loss.loss_type="smooth_l1"', 'plugins.huber_loss.schedule="exponential"'],
        [],
    ),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_trains_resumes_and_exports(
    option: str, cache_dir: Path, tiny_model_dir: Path, tmp_path: Path, cli_runner, monkeypatch
) -> None:
    from diffusers import UNet2DConditionModel

    from naruto_lora.models.loading import load_noise_scheduler
    from naruto_lora.train.evaluate import denoising_loss
    from tests.test_export import (
        assert_close,
        lora_layers,
        pipeline,
        training_modules,
        unet_output,
    )
    from tests.test_train import conditionings
    from tests.train_support import load_with_diffusers

    plugins, sets, quality_sets = OPTIONS[option]
    # 1. It learns: the MSE denoising loss on the base, evaluated outside our loop, goes down.
    quality = tiny_profile(
        cache_dir, tmp_path / "quality", "train.max_steps=12", 'train.lr_scheduler="constant"',
        "train.learning_rate=0.01", *sets, *quality_sets, only=plugins,
    )  # fmt: skip
    result = train(quality, TrainOptions(device="cpu"))
    batches = conditionings(quality, quality)
    scheduler = load_noise_scheduler(quality.model)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    pipe, _ = load_with_diffusers(tiny_model_dir, result.output_dir, monkeypatch)
    base_loss = denoising_loss(base, batches, scheduler, seed=99)
    lora_loss = denoising_loss(pipe.unet, batches, scheduler, seed=99)
    assert lora_loss < 0.95 * base_loss, (lora_loss, base_loss)

    if option == "prodigy":  # its effective learning rate is recorded and plotted
        from naruto_lora.train.metrics import read_metrics

        rows = read_metrics(result.output_dir / "metrics.jsonl")
        assert all(r["effective_lr"] == pytest.approx(r["prodigy_d"] * r["lr"]) for r in rows)
        assert rows[-1]["prodigy_d"] > 1e-6  # D grew from its start, d0 = 1e-6
        assert (result.output_dir / "loss.png").is_file()

    if option.startswith(("int8_base", "fp8_base")):  # the card and profile.toml say so
        kind = option.split("_")[0]
        card = (result.output_dir / "README.md").read_text()
        assert f"base weights in training | {kind}" in card
        assert f'base_weights = "{kind}"' in (result.output_dir / "profile.toml").read_text()

    # 2. It resumes bit for bit after a stop at step 2.
    resume_sets = ("train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2", *sets)
    one = tiny_profile(cache_dir, tmp_path / "one", *resume_sets, only=plugins)
    train(one, TrainOptions(device="cpu"))
    two = tiny_profile(cache_dir, tmp_path / "two", *resume_sets, only=plugins)
    first = train(two, TrainOptions(device="cpu"), pm=plugin_manager(two, SignalAt(2)))
    assert first.global_step == 2 and first.interrupted
    train(two, TrainOptions(device="cpu", resume="latest"))
    expected = load_file(str(tmp_path / "one" / WEIGHT_NAME))
    got = load_file(str(tmp_path / "two" / WEIGHT_NAME))
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    # 3. Its kohya export loads through diffusers and fuses to the training output's UNet; for
    # DoRA the diffusers export (diffusers drops dora_scale from kohya files).
    out = tmp_path / "export.safetensors"
    fmt = "diffusers" if "dora" in option else "kohya"
    exported = invoke(
        cli_runner,
        ["export", "--lora", str(result.output_dir), "--out", str(out), "--format", fmt,
         "--dtype", "fp32"],
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    reference = pipeline(tiny_model_dir)
    reference.load_lora_weights(str(result.output_dir))
    reference.fuse_lora(components=["unet"])
    from_export = pipeline(tiny_model_dir)
    from_export.load_lora_weights(str(tmp_path), weight_name=out.name)
    # diffusers' conversion finds every module under our names
    assert lora_layers(from_export.unet) == training_modules(result.output_dir)
    from_export.fuse_lora(components=["unet"])
    assert_close(unet_output(from_export.unet), unet_output(reference.unet), rel=1e-5)


def test_prodigy_without_prodigyopt_is_a_clear_error(cli_runner, tmp_path: Path, monkeypatch):
    """Without the optional extra: exit 2, the package and the install command named."""
    from tests.train_support import hide_package

    hide_package(monkeypatch, "prodigyopt")
    args = cli_args(tmp_path / "c", tmp_path / "o", "train.learning_rate=1.0")
    result = invoke(cli_runner, [*args, "--enable", "prodigy"])
    assert result.exit_code == 2, result.output
    assert "prodigyopt" in result.output and "naruto-lora[prodigy]" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / WEIGHT_NAME).exists()
