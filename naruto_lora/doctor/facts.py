"""What ``nlora doctor`` finds out about this machine, as plain frozen dataclasses.

Gathering (this module) is kept apart from deciding (``naruto_lora.doctor.checks``) so that every decision
can be tested with faked facts: an 8 GB card, a GPU without bf16, no GPU at all. Each ``probe_*``
function asks one part of the system and never raises for a missing tool or device.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from naruto_lora.config.profile import Profile

GIB = 1024**3

# The packages whose versions matter when a run misbehaves (optional ones show as None).
KEY_PACKAGES = (
    "torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors",
    "huggingface_hub", "pluggy", "click", "rich", "xformers", "bitsandbytes",
)  # fmt: skip

AssetKind = Literal["builtin", "local", "hub", "model-vae"]


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    total_vram_gib: float
    free_vram_gib: float | None
    compute_capability: str  # "8.6"; "" where it means nothing (ROCm)
    bf16: bool


@dataclass(frozen=True)
class CudaFacts:
    available: bool
    runtime: str | None  # the CUDA (or ROCm) runtime torch was built with; None: a CPU-only build
    driver: str | None
    gpus: tuple[GpuFacts, ...] = ()


@dataclass(frozen=True)
class DiskFacts:
    role: str  # "cache", "output", "hub cache", "nlora home"
    path: str
    checked_path: str  # the nearest existing folder: where the files will land
    free_gib: float | None


@dataclass(frozen=True)
class AssetFacts:
    role: str  # "model", "vae", "data"
    source: str
    kind: AssetKind
    available: bool
    detail: str


@dataclass(frozen=True)
class HubFacts:
    endpoint: str
    offline: bool
    reachable: bool | None  # None: not contacted (offline mode)
    detail: str


@dataclass(frozen=True)
class Facts:
    python: str
    platform: str
    torch: str
    cuda: bool
    cuda_runtime: str | None
    driver: str | None
    gpus: tuple[GpuFacts, ...]
    cpu_count: int
    ram_total_gib: float
    ram_available_gib: float
    disks: tuple[DiskFacts, ...]
    packages: Mapping[str, str | None]
    assets: tuple[AssetFacts, ...]
    hub: HubFacts

    def training_gpu(self) -> GpuFacts | None:
        """The largest GPU: the one doctor judges and recommends for."""
        return max(self.gpus, key=lambda g: g.total_vram_gib, default=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; this is what plugins get as ``facts``."""
        out = dataclasses.asdict(self)
        out["packages"] = dict(self.packages)
        return out


# --------------------------------------------------------------------------- probes


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, else from NVML, else None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            if out.strip():
                return out.strip().splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml  # from nvidia-ml-py, when installed
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # NVML raises its own error types when no driver is loaded
        return None


def probe_cuda() -> CudaFacts:
    import torch

    hip = getattr(torch.version, "hip", None)
    runtime = torch.version.cuda or (f"ROCm {hip}" if hip else None)
    driver = driver_version()
    if not torch.cuda.is_available():
        return CudaFacts(available=False, runtime=runtime, driver=driver)
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        try:
            free, total = torch.cuda.mem_get_info(index)
        except RuntimeError:  # a device in exclusive mode held by another process
            free, total = None, props.total_memory
        if hip:
            with torch.cuda.device(index):
                bf16 = torch.cuda.is_bf16_supported()
            capability = ""
        else:
            # Native bf16 needs Ampere (8.0); torch's is_bf16_supported() also says yes on
            # older cards where bf16 is only emulated, slowly.
            bf16 = props.major >= 8
            capability = f"{props.major}.{props.minor}"
        gpus.append(
            GpuFacts(
                index=index,
                name=props.name,
                total_vram_gib=total / GIB,
                free_vram_gib=None if free is None else free / GIB,
                compute_capability=capability,
                bf16=bf16,
            )
        )
    return CudaFacts(available=True, runtime=runtime, driver=driver, gpus=tuple(gpus))


def probe_ram() -> tuple[float, float]:
    """(total, available) system RAM in GiB."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.total / GIB, memory.available / GIB


def nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache_dir() -> Path:
    # Computed like `datasets.config` does, without importing datasets (pyarrow, pandas: slow).
    from huggingface_hub import constants

    env = os.environ.get("HF_DATASETS_CACHE")
    return Path(env).expanduser() if env else Path(constants.HF_HOME) / "datasets"


def probe_disks(profile: Profile) -> tuple[DiskFacts, ...]:
    from naruto_lora.util.home import nlora_home

    places = [
        ("cache", Path(profile.cache.dir)),
        ("output", Path(profile.train.output_dir)),
        ("hub cache", hub_cache_dir()),
    ]
    if profile.model.pretrained.startswith("nlora:") or profile.data.source.startswith("nlora:"):
        places.append(("nlora home", nlora_home()))
    disks = []
    for role, path in places:
        checked = nearest_existing(path)
        try:
            free = shutil.disk_usage(checked).free / GIB
        except OSError:
            free = None
        disks.append(DiskFacts(role=role, path=str(path), checked_path=str(checked), free_gib=free))
    return tuple(disks)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hub_offline() -> bool:
    # The same truthy spellings huggingface_hub accepts.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def probe_hub(timeout_s: float = 2.0) -> HubFacts:
    """One HEAD request to the hub endpoint; skipped in offline mode."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    if hub_offline():
        return HubFacts(
            endpoint,
            offline=True,
            reachable=None,
            detail="offline mode (HF_HUB_OFFLINE=1): not contacted",
        )
    try:
        with urllib.request.urlopen(
            urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s
        ) as response:
            return HubFacts(endpoint, False, True, f"reachable (HTTP {response.status})")
    except urllib.error.HTTPError as exc:  # an HTTP answer of any kind: the network path works
        return HubFacts(endpoint, False, True, f"reachable (HTTP {exc.code})")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return HubFacts(endpoint, False, False, f"unreachable within {timeout_s:g} s: {reason}")


# --------------------------------------------------------------------------- assets


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _model_folder_status(folder: Path, pipeline: bool) -> tuple[bool, str]:
    """A diffusers folder: a pipeline (model_index.json + unet weights) or one model (a VAE)."""
    index, weights_dir = (
        ("model_index.json", folder / "unet") if pipeline else ("config.json", folder)
    )
    if not (folder / index).is_file():
        return (
            False,
            f"'{folder}' has no {index}: not a diffusers {'pipeline' if pipeline else 'model'}",
        )
    if not _has_weights(weights_dir):
        return False, f"'{folder}' has {index} but no weights in {weights_dir.name}/"
    return True, f"found at {folder}"


def _hub_model_status(repo_id: str, pipeline: bool, revision: str) -> tuple[bool, str]:
    from huggingface_hub import try_to_load_from_cache

    index = "model_index.json" if pipeline else "config.json"
    cached = try_to_load_from_cache(
        repo_id, index, cache_dir=hub_cache_dir(), revision=revision or None, repo_type="model"
    )
    if not isinstance(cached, str):
        return False, f"not in the hub cache ({hub_cache_dir()})"
    ok, detail = _model_folder_status(Path(cached).parent, pipeline)
    return ok, "in the hub cache" if ok else f"partly in the hub cache: {detail}"


def _hub_data_status(repo_id: str) -> tuple[bool, str]:
    snapshots = hub_cache_dir() / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(p.is_file() for p in snapshots.rglob("*")):
        return True, "in the hub cache"
    prepared = datasets_cache_dir() / repo_id.replace("/", "___")
    if prepared.is_dir():
        return True, f"prepared in the datasets cache ({prepared})"
    return False, f"not in the hub cache ({hub_cache_dir()}) nor the datasets cache"


def _builtin_status(source: str) -> tuple[bool, str]:
    from naruto_lora.models import registry

    known = registry.builtin_ids()
    if source not in known:
        return False, f"unknown built-in id; known: {', '.join(known)}"
    return known[source].status()


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~")) or "\\" in source or Path(source).expanduser().exists()
    )


def probe_asset(role: str, source: str, revision: str = "") -> AssetFacts:
    """Where the profile's model, VAE or data set would come from, and whether it is here."""
    if source.startswith("nlora:"):
        return AssetFacts(role, source, "builtin", *_builtin_status(source))
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            return AssetFacts(role, source, "local", False, f"local folder '{path}' does not exist")
        if role == "data":
            return AssetFacts(role, source, "local", True, f"found at {path}")
        return AssetFacts(role, source, "local", *_model_folder_status(path, role == "model"))
    if role == "data":
        return AssetFacts(role, source, "hub", *_hub_data_status(source))
    return AssetFacts(role, source, "hub", *_hub_model_status(source, role == "model", revision))


def probe_assets(profile: Profile) -> tuple[AssetFacts, ...]:
    model = profile.model
    assets = [probe_asset("model", model.pretrained, model.revision)]
    if model.vae:
        assets.append(probe_asset("vae", model.vae))
    else:
        assets.append(
            AssetFacts("vae", "", "model-vae", True, "the model's own VAE (vae/ subfolder)")
        )
    assets.append(probe_asset("data", profile.data.source))
    return tuple(assets)


def gather_facts(profile: Profile) -> Facts:
    """Everything doctor needs to know about this machine, for this profile's paths and assets."""
    import torch

    cuda = probe_cuda()
    ram_total, ram_available = probe_ram()
    return Facts(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        cuda=cuda.available,
        cuda_runtime=cuda.runtime,
        driver=cuda.driver,
        gpus=cuda.gpus,
        cpu_count=os.cpu_count() or 1,
        ram_total_gib=ram_total,
        ram_available_gib=ram_available,
        disks=probe_disks(profile),
        packages=package_versions(),
        assets=probe_assets(profile),
        hub=probe_hub(),
    )
