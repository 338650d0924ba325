"""``nlora doctor``: the decision matrix and the profile checks on faked devices (8, 12, 16, 24 GB
and none), the asset and hub probes on local stand-ins, and the command through CliRunner."""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from naruto_lora.doctor import facts as doctor_facts
from naruto_lora.doctor.checks import (
    card_gb,
    check_profile,
    check_vram,
    diagnose,
    estimated_vram_gib,
    recommend_profile,
)
from naruto_lora.doctor.facts import AssetFacts, CudaFacts, DiskFacts, Facts, GpuFacts, HubFacts
from naruto_lora.plugins.manager import load_profile
from tests.conftest import invoke

GPU_PROFILES = ("6gb", "8gb", "12gb", "14gb")  # lightest first

# The reference decision matrix, by the size a card is sold as (GB).
MATRIX = {
    24: ("14gb", "ok"),
    16: ("14gb", "ok"),
    12: ("14gb", "warn"),
    11: ("12gb", "ok"),
    10: ("12gb", "ok"),
    9: ("8gb", "ok"),
    8: ("8gb", "ok"),
    7: ("6gb", "ok"),
    6: ("6gb", "ok"),
    5: ("tiny", "not_recommended"),
    4: ("tiny", "not_recommended"),
}
# What torch reports (GiB) for real cards of those sizes, from their out-of-memory messages.
REPORTED = {
    "RTX 3070 (8 GB)": (7.79, 8),
    "RTX 3080 (10 GB)": (9.78, 10),
    "RTX 3060 (12 GB)": (11.76, 12),
    "RTX 4080 (16 GB)": (15.70, 16),
    "RTX 4090 (24 GB)": (23.65, 24),
    "GTX 1660 (6 GB)": (5.79, 6),
}


def gpu(
    total: float,
    *,
    bf16: bool = True,
    free: float | None = None,
    index: int = 0,
    name: str = "Fake GPU",
    capability: str = "8.6",
) -> GpuFacts:
    return GpuFacts(
        index=index,
        name=name,
        total_vram_gib=total,
        free_vram_gib=total - 0.3 if free is None else free,
        compute_capability=capability,
        bf16=bf16,
    )


def hub_asset(role: str, source: str, available: bool = True) -> AssetFacts:
    return AssetFacts(
        role, source, "hub", available, "in the hub cache" if available else "not cached"
    )


def fake_facts(
    *gpus: GpuFacts,
    assets: tuple[AssetFacts, ...] | None = None,
    hub_reachable: bool | None = None,
    ram_gib: float = 32.0,
    free_disk_gib: float = 100.0,
) -> Facts:
    if assets is None:
        assets = (
            hub_asset("model", "stabilityai/stable-diffusion-xl-base-1.0"),
            hub_asset("vae", "madebyollin/sdxl-vae-fp16-fix"),
            hub_asset("data", "lambdalabs/naruto-blip-captions"),
        )
    return Facts(
        python="3.11.0",
        platform="Linux",
        torch="2.5.0",
        cuda=bool(gpus),
        cuda_runtime="12.4" if gpus else None,
        driver="550.54" if gpus else None,
        gpus=tuple(gpus),
        cpu_count=8,
        ram_total_gib=ram_gib,
        ram_available_gib=ram_gib - 2,
        disks=(
            DiskFacts("cache", ".nlora-cache", "/work", free_disk_gib),
            DiskFacts("output", "output", "/work", free_disk_gib),
            DiskFacts("hub cache", "/hub", "/hub", free_disk_gib),
        ),
        packages={"torch": "2.5.0"},
        assets=assets,
        hub=HubFacts(
            "https://huggingface.co",
            offline=hub_reachable is None,
            reachable=hub_reachable,
            detail="fake",
        ),
    )


def rows_by_check(rows) -> dict:
    return {row.check: row for row in rows}


# --------------------------------------------------------------------------- decision matrix


@pytest.mark.parametrize("sold_gb", sorted(MATRIX))
@pytest.mark.parametrize("reported_offset", [-0.45, 0.0, 0.45])
def test_recommendation_follows_the_matrix_for_every_card_size(
    sold_gb: int, reported_offset: float
) -> None:
    # A card sold as N GB reports a little less or (rarely) the full N GiB; all mean size N.
    expected_profile, expected_level = MATRIX[sold_gb]
    rec = recommend_profile(sold_gb + reported_offset)
    assert (rec.profile, rec.level) == (expected_profile, expected_level), rec.message


def test_no_gpu_is_not_recommended_and_offers_the_cpu_trial() -> None:
    rec = recommend_profile(None)
    assert (rec.profile, rec.level) == ("tiny", "not_recommended")
    assert "--profile tiny" in rec.message and "No CUDA GPU" in rec.message


@pytest.mark.parametrize("card", sorted(REPORTED))
def test_real_cards_count_as_the_size_they_are_sold_as(card: str) -> None:
    reported, sold = REPORTED[card]
    assert round(card_gb(reported)) == sold
    as_reported, as_sold = recommend_profile(reported), recommend_profile(float(sold))
    assert (as_reported.profile, as_reported.level) == (as_sold.profile, as_sold.level)


@pytest.mark.parametrize(("reported", "profile", "level"), [
    (15.9, "14gb", "ok"),  # a 16 GB card reporting 15.9 GiB
    (15.4, "14gb", "warn"),  # 15 GB: between 12 and 16
    (11.9, "14gb", "warn"),  # a 12 GB card reporting 11.9 GiB
    (11.4, "12gb", "ok"),  # 11 GB
    (9.4, "8gb", "ok"),  # 9 GB
    (7.6, "8gb", "ok"),  # an 8 GB card reporting 7.6 GiB
    (7.4, "6gb", "ok"),  # 7 GB
    (5.79, "6gb", "ok"),  # a 6 GB card
    (5.4, "tiny", "not_recommended"),  # 5 GB
])  # fmt: skip
def test_matrix_edges(reported: float, profile: str, level: str) -> None:
    rec = recommend_profile(reported)
    assert (rec.profile, rec.level) == (profile, level)


def test_vram_check_of_every_gpu_profile_agrees_with_the_recommendation() -> None:
    profiles = {name: load_profile(name) for name in GPU_PROFILES}
    for tenths in range(40, 300):
        vram = tenths / 10
        rec = recommend_profile(vram)
        facts = fake_facts(gpu(vram))
        status = {
            n: check_vram(p, facts, estimated_vram_gib(p)).status for n, p in profiles.items()
        }
        if rec.level == "not_recommended":
            assert all(s == "fail" for s in status.values()), (vram, status)
            continue
        assert status[rec.profile] == rec.level, (vram, rec, status)
        heavier = GPU_PROFILES[GPU_PROFILES.index(rec.profile) + 1 :]
        assert all(status[n] != "ok" for n in heavier), (vram, status)


# --------------------------------------------------------------------------- check_profile


def test_no_gpu_fails_the_14gb_profile_with_the_reason() -> None:
    rows = check_profile(load_profile("14gb"), fake_facts())
    device = rows_by_check(rows)["device"]
    assert device.status == "fail"
    assert "no CUDA GPU" in device.detail and "--profile tiny" in device.detail
    assert "VRAM" not in rows_by_check(rows)  # nothing to measure


def test_tiny_passes_on_a_cpu_machine() -> None:
    assets = (
        AssetFacts("model", "nlora:tiny", "builtin", True, "built in"),
        AssetFacts("vae", "", "model-vae", True, "the model's own"),
        AssetFacts("data", "nlora:tiny-shapes", "builtin", True, "built in"),
    )
    rows = check_profile(load_profile("tiny"), fake_facts(assets=assets, ram_gib=4.0))
    assert [r for r in rows if r.status != "ok"] == []


def test_tiny_model_in_fp16_needs_a_gpu() -> None:
    profile = load_profile("tiny", overrides=["train.mixed_precision=fp16"])
    device = rows_by_check(check_profile(profile, fake_facts()))["device"]
    assert device.status == "fail" and "train.mixed_precision=no" in device.detail


@pytest.mark.parametrize(("vram", "profile", "expected"), [
    (11.76, "14gb", "warn"),  # 12 GB: the matrix's "14gb with a warning"
    (11.76, "12gb", "ok"),
    (9.78, "14gb", "fail"),
    (7.79, "14gb", "fail"),
    (7.79, "12gb", "fail"),
    (7.79, "8gb", "ok"),
    (15.7, "14gb", "ok"),
    (23.65, "14gb", "ok"),
    (5.79, "8gb", "fail"),
])  # fmt: skip
def test_vram_check_on_faked_cards(vram: float, profile: str, expected: str) -> None:
    rows = rows_by_check(check_profile(load_profile(profile), fake_facts(gpu(vram))))
    assert rows["device"].status == "ok"
    assert rows["VRAM"].status == expected, rows["VRAM"].detail


def test_tight_and_failing_vram_suggest_a_lighter_profile() -> None:
    rows = rows_by_check(check_profile(load_profile("14gb"), fake_facts(gpu(11.76))))
    assert "--profile 12gb is safer" in rows["VRAM"].detail
    rows = rows_by_check(check_profile(load_profile("14gb"), fake_facts(gpu(7.79))))
    assert "try --profile 8gb" in rows["VRAM"].detail


def test_vram_held_by_other_processes_warns() -> None:
    rows = rows_by_check(check_profile(load_profile("14gb"), fake_facts(gpu(23.65, free=6.0))))
    assert rows["VRAM"].status == "warn" and "6.0 GiB free" in rows["VRAM"].detail


def test_largest_gpu_is_judged_and_named() -> None:
    facts = fake_facts(gpu(7.79, index=0, name="small"), gpu(23.65, index=1, name="big"))
    rows = rows_by_check(check_profile(load_profile("14gb"), facts))
    assert rows["VRAM"].status == "ok" and "big" in rows["VRAM"].detail
    assert "CUDA_VISIBLE_DEVICES=1" in rows["device"].detail


def test_bf16_on_a_gpu_without_bf16_fails() -> None:
    t4 = gpu(14.75, bf16=False, name="Tesla T4", capability="7.5")
    bf16 = load_profile("14gb", overrides=["train.mixed_precision=bf16"])
    rows = rows_by_check(check_profile(bf16, fake_facts(t4)))
    assert rows["precision"].status == "fail" and "7.5" in rows["precision"].detail
    fp16 = rows_by_check(check_profile(load_profile("14gb"), fake_facts(t4)))
    assert fp16["precision"].status == "ok"
    ampere = rows_by_check(check_profile(bf16, fake_facts(gpu(23.65, bf16=True))))
    assert ampere["precision"].status == "ok"


def test_missing_assets_fail_only_when_the_hub_cannot_supply_them() -> None:
    missing = (
        hub_asset("model", "org/model", available=False),
        hub_asset("vae", "org/vae"),
        hub_asset("data", "org/data", available=False),
    )
    profile = load_profile("14gb")
    offline = rows_by_check(check_profile(profile, fake_facts(gpu(24), assets=missing)))
    assert offline["model"].status == "fail" and "offline" in offline["model"].detail
    assert "--repo-type dataset" in offline["data"].detail
    assert offline["vae"].status == "ok"
    online = rows_by_check(
        check_profile(profile, fake_facts(gpu(24), assets=missing, hub_reachable=True))
    )
    assert online["model"].status == "ok" and "on first use" in online["model"].detail
    unreachable = rows_by_check(
        check_profile(profile, fake_facts(gpu(24), assets=missing, hub_reachable=False))
    )
    assert unreachable["data"].status == "fail" and "unreachable" in unreachable["data"].detail
    local = (
        AssetFacts("model", "./nowhere", "local", False, "local folder 'nowhere' does not exist"),
    )
    rows = rows_by_check(
        check_profile(profile, fake_facts(gpu(24), assets=local, hub_reachable=True))
    )
    assert rows["model"].status == "fail"


def test_low_disk_and_ram_warn_but_do_not_fail() -> None:
    missing = (hub_asset("model", "org/model", available=False),)
    facts = fake_facts(gpu(24), assets=missing, hub_reachable=True, ram_gib=8.0, free_disk_gib=0.5)
    rows = check_profile(load_profile("14gb"), facts)
    by = rows_by_check(rows)
    assert by["RAM"].status == "warn"
    assert {by[f"disk: {r}"].status for r in ("cache", "output", "hub cache")} == {"warn"}
    assert not [r for r in rows if r.status == "fail"]


def test_sampling_line_says_when_low_vram_is_needed() -> None:
    profile = load_profile("8gb")
    assert rows_by_check(check_profile(profile, fake_facts(gpu(23.65))))["sampling"].status == "ok"
    tight = rows_by_check(check_profile(profile, fake_facts(gpu(7.0))))["sampling"]
    assert tight.status == "warn" and "--low-vram" in tight.detail
    fp32 = load_profile("14gb", overrides=["train.mixed_precision=no"])
    assert rows_by_check(check_profile(fp32, fake_facts(gpu(11.76))))["sampling"].status == "warn"


def test_vram_estimate_grows_with_what_costs_memory() -> None:
    base = load_profile("12gb")
    need = estimated_vram_gib(base).need_gb
    for override in (
        "data.resolution=1024",
        "lora.rank=64",
        "train.batch_size=4",
        'cache.text="memory"',
        'train.mixed_precision="no"',
    ):
        heavier = load_profile("12gb", overrides=[override])
        assert estimated_vram_gib(heavier).need_gb > need, override
    lighter = load_profile("12gb", overrides=["data.resolution=512"])
    assert estimated_vram_gib(lighter).need_gb < need
    assert estimated_vram_gib(load_profile("tiny")).need_gb <= 1.0


# --------------------------------------------------------------------------- probes


def _fake_hub_repo(cache: Path, folder: str, files: list[str]) -> None:
    """The documented hub cache layout: refs/main names a snapshot holding the files."""
    repo = cache / folder
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    for name in files:
        path = repo / "snapshots" / "abc123" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


def test_hub_cache_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor_facts, "hub_cache_dir", lambda: tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _fake_hub_repo(
        tmp_path,
        "models--org--full",
        ["model_index.json", "unet/diffusion_pytorch_model.safetensors"],
    )
    _fake_hub_repo(tmp_path, "models--org--index-only", ["model_index.json"])
    _fake_hub_repo(
        tmp_path, "models--org--vae", ["config.json", "diffusion_pytorch_model.safetensors"]
    )
    _fake_hub_repo(tmp_path, "datasets--org--data", ["data/train-0.parquet"])
    (tmp_path / "datasets" / "org___prepared").mkdir(parents=True)
    probe = doctor_facts.probe_asset
    assert probe("model", "org/full").available
    partial = probe("model", "org/index-only")
    assert not partial.available and "no weights" in partial.detail
    assert not probe("model", "org/absent").available
    assert probe("vae", "org/vae").available
    assert probe("data", "org/data").available
    assert probe("data", "org/prepared").available
    assert not probe("data", "org/absent").available


def test_local_folder_probe_on_the_real_diffusers_layout(
    tiny_model_dir: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    probe = doctor_facts.probe_asset
    assert probe("model", str(tiny_model_dir)).available
    assert probe("vae", str(tiny_model_dir / "vae")).available
    assert probe("data", str(tiny_data_dir)).available
    assert not probe("model", str(tiny_model_dir / "vae")).available  # a VAE is not a pipeline
    assert not probe("model", str(tmp_path / "missing")).available
    assert probe("model", "nlora:tiny").available and probe("model", "nlora:tiny").kind == "builtin"
    assert not probe("model", "nlora:nope").available


@pytest.fixture()
def head_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 (the http.server API)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_probe_offline_reachable_and_unreachable(
    head_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline = doctor_facts.probe_hub()
    assert offline.offline and offline.reachable is None  # conftest sets HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", head_server)
    assert doctor_facts.probe_hub().reachable is True
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert doctor_facts.probe_hub(timeout_s=2).reachable is False


def closed_port_url() -> str:
    """A local URL on which nothing listens: connection refused at once, no network used."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_gather_facts_on_this_machine_is_plain_data() -> None:
    facts = doctor_facts.gather_facts(load_profile("tiny"))
    assert facts.cuda == torch.cuda.is_available()
    assert facts.torch == torch.__version__
    assert facts.packages["torch"] is not None and facts.packages["pluggy"] is not None
    assert {d.role for d in facts.disks} >= {"cache", "output", "hub cache", "nlora home"}
    assert [a.role for a in facts.assets] == ["model", "vae", "data"]
    json.dumps(facts.to_dict())


# --------------------------------------------------------------------------- plugins and CLI


def test_plugin_rows_join_the_report() -> None:
    facts = fake_facts()
    tiny = load_profile("tiny")
    assert "attention (sdpa plugin)" in rows_by_check(diagnose(tiny, facts).checks)
    without = load_profile("tiny", disable=["sdpa"])
    assert "attention (sdpa plugin)" not in rows_by_check(diagnose(without, facts).checks)


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """Make the CLI see the given GPUs (none: a machine without CUDA)."""

    def install(*gpus: GpuFacts) -> None:
        cuda = CudaFacts(
            available=bool(gpus),
            runtime="12.4" if gpus else None,
            driver="550.54" if gpus else None,
            gpus=tuple(gpus),
        )
        monkeypatch.setattr(doctor_facts, "probe_cuda", lambda: cuda)

    return install


def test_cli_json_is_one_document_with_every_section(cli_runner, fake_cuda) -> None:
    fake_cuda(gpu(11.76, name="RTX 3060"))
    result = invoke(cli_runner, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"system", "gpus", "packages", "assets", "hub", "checks", "recommendation"} <= set(
        report
    )
    assert report["gpus"][0]["name"] == "RTX 3060"
    assert report["recommendation"]["profile"] == "14gb"
    assert report["recommendation"]["level"] == "warn"
    assert report["profile"] == {**report["profile"], "name": "14gb", "explicit": False}


def test_cli_json_on_this_machine(cli_runner) -> None:
    result = invoke(cli_runner, ["doctor", "--json"])
    assert result.exit_code == 0  # without --profile doctor reports, it never fails
    report = json.loads(result.stdout)
    assert report["system"]["cuda"] == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-machine answer")
def test_cli_profile_14gb_exits_1_on_this_cpu_machine(cli_runner) -> None:
    result = invoke(cli_runner, ["doctor", "--profile", "14gb"])
    assert result.exit_code == 1
    assert "cannot run here" in result.stderr and "no CUDA GPU" in result.stderr


def test_cli_profile_exit_codes_with_faked_devices(
    cli_runner, fake_cuda, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    fake_cuda()
    result = invoke(cli_runner, ["doctor", "--profile", "14gb", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["can_run"] is False  # stdout stays pure JSON
    assert "no CUDA GPU" in result.stderr

    # --quick: the table estimate, which sizes every GPU profile as SDXL whatever the model.
    local = ["--model", str(tiny_model_dir), "--vae", "", "--data", str(tiny_data_dir), "--quick"]
    fake_cuda(gpu(11.76))
    assert invoke(cli_runner, ["doctor", "--profile", "12gb", *local]).exit_code == 0
    assert invoke(cli_runner, ["doctor", "--profile", "14gb", *local]).exit_code == 0  # warn
    fake_cuda(gpu(7.79))
    result = invoke(cli_runner, ["doctor", "--profile", "14gb", *local])
    assert result.exit_code == 1 and "try --profile 8gb" in result.stderr
    result = invoke(
        cli_runner, ["doctor", "--profile", "8gb", *local, "--set", "train.mixed_precision=bf16"]
    )
    assert result.exit_code == 0
    fake_cuda(dataclasses.replace(gpu(7.79), bf16=False, compute_capability="7.5"))
    result = invoke(
        cli_runner, ["doctor", "--profile", "8gb", *local, "--set", "train.mixed_precision=bf16"]
    )
    assert result.exit_code == 1 and "no native bf16" in result.stderr


def test_cli_profile_tiny_exits_0_here(cli_runner) -> None:
    result = invoke(cli_runner, ["doctor", "--profile", "tiny"])
    assert result.exit_code == 0, result.output
    for section in (
        "system",
        "GPUs",
        "packages",
        "assets",
        "checks",
        "recommendation",
        "attention (sdpa plugin)",
        "can run here",
    ):
        assert section in result.stdout


def test_cli_unknown_profile_is_a_clean_user_error(cli_runner) -> None:
    result = invoke(cli_runner, ["doctor", "--profile", "20gb"])
    assert result.exit_code == 2
    assert "Unknown profile '20gb'" in result.stderr


def test_explicit_profile_on_a_gpu_uses_the_planner_prediction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from naruto_lora.doctor.checks import diagnose
    from naruto_lora.plan import planner as plan

    asked = []

    def fake_prediction(profile) -> float:
        asked.append(profile.name)
        return 9.0

    monkeypatch.setattr(plan, "estimate_peak_vram_gib", fake_prediction)
    profile = load_profile("14gb")
    report = diagnose(profile, fake_facts(gpu(12.0)), use_planner=True)
    assert asked == ["14gb"]
    assert "nlora plan" in report.estimate.basis
    # need = prediction + reserved card memory; comfortable = need with the tight-headroom margin.
    assert report.estimate.minimum_gb == round(9.0 + plan.CARD_RESERVED_GIB, 1)
    assert report.estimate.need_gb == round(
        9.0 / (1 - plan.TIGHT_HEADROOM) + plan.CARD_RESERVED_GIB, 1
    )
    assert rows_by_check(report.checks)["VRAM"].status == "ok"
    # A card the prediction does not fit fails, whatever the quick table says.
    monkeypatch.setattr(plan, "estimate_peak_vram_gib", lambda profile: 13.0)
    small = diagnose(profile, fake_facts(gpu(12.0)), use_planner=True)
    assert rows_by_check(small.checks)["VRAM"].status == "fail"
    # Without a GPU, or without use_planner, the planner is not run.
    asked.clear()
    monkeypatch.setattr(plan, "estimate_peak_vram_gib", fake_prediction)
    diagnose(profile, fake_facts(), use_planner=True)
    diagnose(profile, fake_facts(gpu(12.0)), use_planner=False)
    assert asked == []


def test_cli_profile_on_a_gpu_asks_the_planner_about_the_real_model(
    cli_runner, fake_cuda, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    # The planner traces the model it is given: the 14gb recipe on the tiny model fits any card.
    local = ["--model", str(tiny_model_dir), "--vae", "", "--data", str(tiny_data_dir)]
    fake_cuda(gpu(7.79))
    result = invoke(cli_runner, ["doctor", "--profile", "14gb", *local, "--json"])
    assert result.exit_code == 0, result.stderr
    estimate = json.loads(result.stdout)["profile"]["vram_estimate"]
    assert "nlora plan" in estimate["basis"] and estimate["need_gb"] < 2
