"""``nlora train`` never loses a user's work and answers faults with a message, not a traceback:
the output folder's lock, finished runs, damaged checkpoints, unsafe pickles, changed settings on
resume, diverging runs, full disks and read-only folders, stale temp folders."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from naruto_lora.lora.inject import WEIGHT_NAME
from naruto_lora.plugins.hookspecs import hookimpl
from naruto_lora.train import TrainOptions, train
from naruto_lora.train.checkpoint import verify_checkpoint
from naruto_lora.train.lock import LOCK_NAME
from naruto_lora.train.metrics import read_metrics
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.train_support import SignalAt, cli_args, plugin_manager, tiny_profile

# A short constant schedule, no plugins: fast, and a checkpoint after every step.
SETS = (
    "train.checkpoint_every=1",
    "train.checkpoints_keep=5",
    'train.lr_scheduler="constant"',
    "train.lr_warmup_steps=0",
)
NO_PLUGINS = [
    "--disable",
    "ema",
    "--disable",
    "offset_noise",
    "--disable",
    "min_snr",
    "--disable",
    "sdpa",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability-cache")


def args(cache_dir: Path, out: Path, *sets: str) -> list[str]:
    return [*cli_args(cache_dir, out, *SETS, *sets), *NO_PLUGINS]


def digest_tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) by its sha256: 'nothing changed'."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def assert_clean_failure(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)


def stopped_run(cache_dir: Path, out: Path, at: int = 2, *sets: str) -> None:
    """A run of 4 steps stopped by SIGTERM after step ``at``: checkpoints step-1..step-at."""
    profile = tiny_profile(cache_dir, out, *SETS, *sets, only=[])
    result = train(profile, TrainOptions(device="cpu"), pm=plugin_manager(profile, SignalAt(at)))
    assert result.interrupted == "SIGTERM"


# --------------------------------------------------------------------------- the output lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from naruto_lora.train.lock import output_lock
    with output_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_a_second_train_into_a_folder_in_use_is_refused_and_a_killed_holder_frees_it(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke(cli_runner, args(cache_dir, out))
        assert_clean_failure(result, "is in use by another nlora train", f"process {holder.pid}")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written
        several = invoke(cli_runner, [*args(cache_dir, out), "--num-processes", "2"])
        assert_clean_failure(several, "is in use by another nlora train")  # before any launch
        assert "Launching" not in several.output
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock must not outlive its holder
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # the killed holder's file, no longer locked
    result = invoke(cli_runner, args(cache_dir, out))
    assert result.exit_code == 0, result.output
    assert (out / WEIGHT_NAME).is_file()
    assert not (out / LOCK_NAME).exists()  # a run that ends leaves no lock file behind


def test_the_lock_is_held_during_the_run(cache_dir: Path, tmp_path: Path) -> None:
    """A run that reaches its first step holds the lock; a second one in the same folder fails
    before touching anything."""
    out = tmp_path / "held"
    seen: list[str] = []

    class TryAgain:
        @hookimpl
        def nlora_after_optimizer_step(self, state) -> None:
            if state.global_step == 1:
                try:
                    train(tiny_profile(cache_dir, out, only=[]), TrainOptions(device="cpu"))
                except UserError as exc:
                    seen.append(str(exc))

    profile = tiny_profile(cache_dir, out, only=[])
    train(profile, TrainOptions(device="cpu"), pm=plugin_manager(profile, TryAgain()))
    assert len(seen) == 1 and "is in use by another nlora train" in seen[0]
    assert f"process {os.getpid()}" in seen[0]


# --------------------------------------------------------------------------- finished runs


def test_training_into_a_finished_run_is_refused_unless_overwrite(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "done"
    assert invoke(cli_runner, args(cache_dir, out, "train.max_steps=2")).exit_code == 0
    before = digest_tree(out)
    result = invoke(cli_runner, args(cache_dir, out, "train.max_steps=2"))
    assert_clean_failure(
        result, "holds a finished run", "--resume latest", "--output", "--overwrite"
    )
    assert digest_tree(out) == before

    result = invoke(cli_runner, [*args(cache_dir, out, "train.max_steps=1"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke(cli_runner, [*args(cache_dir, out), "--overwrite"])
    assert_clean_failure(result, "not a naruto-lora training output")
    assert (out / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- damaged checkpoints

DAMAGES = {
    "training_state.pt": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "plugins.pt": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "lora_parameters.safetensors": lambda p: p.write_bytes(p.read_bytes()[:-10]),
    WEIGHT_NAME: lambda p: p.write_bytes(p.read_bytes()[:50]),
    "trainer.json": lambda p: p.write_text('{"step": 2, '),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_resume_latest_passes_over_a_damaged_checkpoint(
    name: str, cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped_run(cache_dir, out)
    damaged = out / "checkpoints" / "step-2"
    DAMAGES[name](damaged / name)
    assert verify_checkpoint(damaged) is not None
    assert verify_checkpoint(out / "checkpoints" / "step-1") is None
    stale = out / "checkpoints" / ".step-3.deadbeef.tmp"  # a kill during a checkpoint write
    stale.mkdir()
    (stale / "training_state.pt").write_bytes(b"half")

    result = invoke(cli_runner, [*args(cache_dir, out), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "step-2' is damaged" in result.output and name in result.output
    assert "Resumed from" in result.output and "step-1" in result.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not stale.exists()


def test_resume_from_a_damaged_checkpoint_path_names_an_intact_one(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped_run(cache_dir, out)
    damaged = out / "checkpoints" / "step-2"
    (damaged / "trainer.json").unlink()
    before = digest_tree(out)
    result = invoke(cli_runner, [*args(cache_dir, out), "--resume", str(damaged)])
    assert_clean_failure(result, "trainer.json is missing", "step-1")
    assert digest_tree(out) == before


def test_a_pickle_that_would_run_code_is_refused_by_name(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped_run(cache_dir, out)
    state = out / "checkpoints" / "step-2" / "training_state.pt"
    torch.save({"payload": os.system}, state)  # a callable: weights_only refuses it
    before = digest_tree(out / "checkpoints")
    result = invoke(cli_runner, [*args(cache_dir, out), "--resume", "latest"])
    assert_clean_failure(result, "training_state.pt", "is not a safe format", "will not load")
    assert "weights_only=False" not in result.output
    assert digest_tree(out / "checkpoints") == before


# --------------------------------------------------------------------------- changed settings


def test_resume_with_a_changed_learning_rate_is_refused_then_applied_on_request(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped_run(cache_dir, out)
    before = digest_tree(out)
    changed = args(cache_dir, out, "train.learning_rate=0.005")
    result = invoke(cli_runner, [*changed, "--resume", "latest"])
    assert_clean_failure(result, "train.learning_rate: 0.001", "0.005", "--resume-with-changes")
    assert digest_tree(out) == before

    result = invoke(cli_runner, [*changed, "--resume", "latest", "--resume-with-changes"])
    assert result.exit_code == 0, result.output
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["lr"] for r in rows] == [0.001, 0.001, 0.005, 0.005]  # really applied
    assert "learning_rate = 0.005" in (out / "profile.toml").read_text()


def test_a_longer_run_changes_a_decaying_schedule_so_it_needs_the_flag(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped_run(cache_dir, out, 2, 'train.lr_scheduler="cosine"')
    cosine = args(cache_dir, out, 'train.lr_scheduler="cosine"', "train.max_steps=6")
    result = invoke(cli_runner, [*cosine, "--resume", "latest"])
    assert_clean_failure(result, "train.max_steps: 4", "6", "learning-rate schedule")
    # A constant schedule does not depend on the length: more steps are just more steps.
    out2 = tmp_path / "constant"
    stopped_run(cache_dir, out2)
    result = invoke(cli_runner, [*args(cache_dir, out2, "train.max_steps=5"), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(out2 / "metrics.jsonl")] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- diverging runs


class Explode:
    """Blows the LoRA parameters up to 1e30 after the last update (the loss never sees it): the
    weights of a run that diverged."""

    @hookimpl
    def nlora_after_optimizer_step(self, state) -> None:
        if state.global_step == 2:
            with torch.no_grad():
                for p in state.lora_parameters:
                    p.mul_(1e30).add_(1e30)


class AlwaysNaN:
    @hookimpl
    def nlora_loss_weights(self, state, timesteps):
        return torch.full((len(timesteps),), float("nan"))


def with_plugin(monkeypatch, plugin) -> None:
    import naruto_lora.plugins.manager as plugins

    real = plugins.build_plugin_manager

    def build(profile, *a, **k):
        pm = real(profile, *a, **k)
        pm.register(plugin, name="test-fault")
        return pm

    monkeypatch.setattr(plugins, "build_plugin_manager", build)


def test_exploded_weights_are_not_written_as_a_result(
    cli_runner, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    with_plugin(monkeypatch, Explode())
    result = invoke(cli_runner, args(cache_dir, out, "train.max_steps=2"))
    assert_clean_failure(result, "Training diverged", "No final weights were written")
    assert not (out / WEIGHT_NAME).exists() and "Trained" not in result.output


def test_a_run_that_ends_early_on_skipped_updates_is_not_a_success(
    cli_runner, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    with_plugin(monkeypatch, AlwaysNaN())
    sets = ("train.max_steps=10", "train.epochs=1", "train.max_nonfinite_in_row=1000")
    result = invoke(cli_runner, args(cache_dir, out, *sets, "train.batch_size=2"))
    assert_clean_failure(result, "Training ended after 0 of", "skipped", "No final weights")
    assert not (out / WEIGHT_NAME).exists() and "Trained" not in result.output


# --------------------------------------------------------------------------- disks and permissions


def test_a_full_disk_during_a_checkpoint_is_a_message_and_earlier_ones_survive(
    cli_runner, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import naruto_lora.util.io as io

    out = tmp_path / "run"
    real, calls = io.torch_save, []

    def full_after_first_checkpoint(obj, path):
        calls.append(path)
        if len(calls) > 2:  # step-1's two .pt files were written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(obj, path)

    monkeypatch.setattr(io, "torch_save", full_after_first_checkpoint)
    result = invoke(cli_runner, args(cache_dir, out))
    assert_clean_failure(result, "no space left on the disk", "GiB free there", "not changed")
    assert verify_checkpoint(out / "checkpoints" / "step-1") is None
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the half-written one is gone


def test_a_read_only_output_folder_is_a_message(
    cli_runner, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import naruto_lora.util.io as io

    out = tmp_path / "run"

    real = io.atomic_write_bytes

    def denied(path, data):  # as in a folder without write permission (tests run as root)
        if Path(path).parent == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        real(path, data)

    monkeypatch.setattr(io, "atomic_write_bytes", denied)
    result = invoke(cli_runner, args(cache_dir, out))
    assert_clean_failure(result, "permission is denied", "profile.toml")


def test_os_faults_of_the_writers_are_oserrors_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from naruto_lora.util.io import save_safetensors, torch_save

    def full(*a, **k):  # what safetensors raises on a full disk
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as caught:
        save_safetensors(tmp_path / "x.safetensors", {"x": torch.zeros(10)})
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "x.safetensors")
    if Path("/dev/full").is_char_device():  # every write fails with ENOSPC, as on a full disk
        with pytest.raises(OSError) as caught:
            torch_save({"x": torch.zeros(1000)}, "/dev/full")
        assert caught.value.errno == errno.ENOSPC


def test_checkpoint_files_get_the_umask_mode(cache_dir: Path, tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        out = tmp_path / "run"
        train(tiny_profile(cache_dir, out, *SETS, "train.max_steps=1", only=[]),
              TrainOptions(device="cpu"))  # fmt: skip
    finally:
        os.umask(old)
    step = out / "checkpoints" / "step-1"
    assert step.stat().st_mode & 0o777 == 0o775
    assert (step / "training_state.pt").stat().st_mode & 0o777 == 0o664
    assert (out / WEIGHT_NAME).stat().st_mode & 0o777 == 0o664
    assert json.loads((step / "trainer.json").read_text())["settings"]["train"]["max_steps"] == 1


def test_a_damaged_profile_toml_never_advises_deleting_the_checkpoints(
    cli_runner, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped_run(cache_dir, out)
    (out / "profile.toml").write_bytes(b"[train\nmax_steps = \xff")
    before = digest_tree(out)
    result = invoke(cli_runner, [*args(cache_dir, out), "--resume", "latest"])
    assert_clean_failure(result, "profile.toml' is damaged", "Do not delete the folder")
    assert "delete that folder" not in result.output
    assert digest_tree(out) == before


def test_atomic_folders_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    """A power cut after the rename must not find a "complete" checkpoint of empty files."""
    import naruto_lora.util.io as io

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    target = tmp_path / "checkpoints" / "step-1"
    with io.atomic_dir(target) as tmp:
        (tmp / "training_state.pt").write_bytes(b"state")
        (tmp / "ema_unet").mkdir()
        (tmp / "ema_unet" / "w.safetensors").write_bytes(b"weights")
    rename = events.index(("rename", str(target)))
    synced = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"training_state.pt", "w.safetensors", "ema_unet"} <= synced
    assert ("fsync", str(target.parent)) in events[rename:]  # the folder's entry too


def test_a_run_a_step_short_of_many_is_done_with_a_warning() -> None:
    """fp16's grad scaler or one non-finite batch may cost a step when train.epochs binds."""
    from naruto_lora.train.guard import NonFiniteGuard, check_ran_to_the_end

    guard = NonFiniteGuard(5, 1e-4, announce=False)
    guard.total = 1
    check_ran_to_the_end(1999, 2000, guard, None)  # within 5%: done
    with pytest.raises(UserError, match="ended after 1800 of 2000 steps"):
        check_ran_to_the_end(1800, 2000, guard, None)


def test_plugins_that_compute_the_same_training_may_change_on_resume() -> None:
    from naruto_lora.plugins.manager import load_profile
    from naruto_lora.train.resume import settings_changes

    class Tiling:
        changes_training = False  # validation-only: says so itself

    class Noise:
        pass

    before = load_profile("smoke", disable=["sdpa", "offset_noise"]).to_dict()
    after = load_profile("smoke", enable=["sdpa", "offset_noise"]).to_dict()
    keys = {c.key for c in settings_changes(before, after, {"sdpa": Tiling, "offset_noise": Noise})}
    assert keys == {"plugins.offset_noise.enabled"}
    keys = {c.key for c in settings_changes(before, after)}  # unknown: every change counts
    assert keys == {"plugins.offset_noise.enabled", "plugins.sdpa.enabled"}
