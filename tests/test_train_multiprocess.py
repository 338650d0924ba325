"""Training as several processes: the ``--num-processes`` launch helpers, and (slow) two CPU
processes (gloo) launched for real by ``nlora train --num-processes 2`` (accelerate's
launcher) and by ``torchrun``.

One run (A) trains 4 steps while one process's loss turns NaN once; a copy of it resumes from
step 2 under torchrun and is stopped by a SIGTERM that reaches one process only (B); B resumes
to the end (C). A probe plugin, installed through a real ``nlora`` entry point, writes down
each process's LoRA parameters. The processes must end equal, only one of them may write, and
the two resumes must land exactly where the uninterrupted run did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from naruto_lora.lora.inject import WEIGHT_NAME
from naruto_lora.train.checkpoint import INFO_NAME, PARAMS_NAME, STATE_NAME, check_checkpoint
from naruto_lora.train.launch import accelerate_args, check_process_count, forwarded_args
from naruto_lora.train.metrics import read_metrics
from naruto_lora.train.outputs import run_identity
from naruto_lora.util.errors import UserError
from tests.conftest import invoke
from tests.train_support import cli_args, tiny_profile

# ---------------------------------------------------------------------------- launch helpers


def train_command():
    from naruto_lora.cli import cli

    return cli.commands["train"]


def parsed(args: list[str]) -> dict:
    command = train_command()
    return command.make_context("train", list(args)).params


def test_each_process_gets_the_command_line_back_without_num_processes() -> None:
    given = ["-p", "smoke", "--set", "train.max_steps=3", "--set", 'data.source="x y"']
    given += ["--enable", "ema", "--disable", "sdpa", "--output", "out dir", "--resume", "latest"]
    given += ["--no-auto-cache", "--device", "cpu", "--num-processes", "2", "--tensorboard"]
    params = parsed(given)
    forwarded = forwarded_args(train_command(), params)
    assert "--num-processes" not in forwarded
    again = parsed(forwarded)
    assert again == {**params, "num_processes": 1}


def test_accelerate_accepts_the_launch_arguments() -> None:
    from accelerate.commands.launch import launch_command_parser

    script = ["train", "-p", "smoke", "--set", "train.max_steps=3"]
    args = launch_command_parser().parse_args(accelerate_args(3, script))
    assert (args.num_processes, args.num_machines, args.machine_rank) == (3, 1, 0)
    assert args.multi_gpu and not args.cpu and args.module
    assert (args.training_script, args.training_script_args) == ("naruto_lora", script)
    assert args.main_process_port == 0  # a free port, chosen at launch


def test_impossible_process_counts_fail_before_anything_starts(monkeypatch) -> None:
    with pytest.raises(UserError, match="must be at least 1"):
        check_process_count(0, "cpu")
    with pytest.raises(UserError, match="same GPU"):
        check_process_count(2, "cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="already started as several processes"):
        check_process_count(2, "cpu")


def test_the_cli_reports_a_bad_process_count_once(cli_runner) -> None:
    result = invoke(cli_runner, ["train", "-p", "smoke", "--num-processes", "0"])
    assert result.exit_code == 2
    assert "--num-processes 0: must be at least 1" in result.output


def test_a_bad_resume_fails_before_any_process_starts(cli_runner, tmp_path: Path) -> None:
    args = cli_args(tmp_path / "cache", tmp_path / "empty", "train.max_steps=2")
    result = invoke(cli_runner, [*args, "--num-processes", "2", "--resume", "latest"])
    assert result.exit_code == 2
    assert "has no checkpoints" in result.output and "Launching" not in result.output


def test_resume_needs_as_many_processes_as_wrote_the_checkpoint(tmp_path: Path) -> None:
    profile = tiny_profile(tmp_path / "cache", tmp_path / "out")
    info = {"step": 2, "num_processes": 2, "identity": run_identity(profile.to_dict())}
    (tmp_path / INFO_NAME).write_text(json.dumps(info))
    check_checkpoint(tmp_path, profile, num_processes=2)
    with pytest.raises(UserError, match="written by 2 process\\(es\\); this run has 1"):
        check_checkpoint(tmp_path, profile, num_processes=1)
    del info["num_processes"]  # written before multi-process training: one process
    (tmp_path / INFO_NAME).write_text(json.dumps(info))
    check_checkpoint(tmp_path, profile, num_processes=1)


# ------------------------------------------------------- two processes, launched for real (slow)

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300  # a hang (a process left waiting in an all-reduce) fails, not blocks CI
# 8 items in batches of 2 over 2 processes: each process gets 2 batches per epoch, and 2
# micro-batches make one update, so DDP's no_sync micro-batches are exercised too.
SETS = (
    "train.batch_size=2",
    "train.gradient_accumulation_steps=2",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.checkpoints_keep=5",
)
OUTPUT_FILES = {
    "README.md",
    "checkpoints",
    "ema_unet",
    "loss.png",
    "metrics.jsonl",
    "profile.toml",
    WEIGHT_NAME,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir, tiny_data_dir) -> Path:
    """A folder with the probe plugin installed as a distribution (dist-info + entry point)."""
    root = tmp_path_factory.mktemp("multiprocess")
    dist = root / "site" / "nlora_mp_probe-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nlora-mp-probe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nlora]\nmp_probe = tests.mp_probe:Probe\n")
    return root


def environment(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)  # NLORA_HOME (the tiny model built above), offline, no progress bars
    path = [str(workspace / "site"), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env["OMP_NUM_THREADS"] = "1"  # two processes on a shared CPU
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torchrun: no host-name lookups in CI
    return env


def probe_sets(dump: Path, **settings: int) -> list[str]:
    sets = [f'plugins.mp_probe.dump_dir="{dump}"']
    return sets + [f"plugins.mp_probe.{key}={value}" for key, value in settings.items()]


def run_nlora(workspace: Path, launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    command = [*launcher, *args, "--enable", "mp_probe"]
    proc = subprocess.Popen(
        command,
        cwd=workspace,  # a stray relative output folder would show up here
        env=environment(workspace),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # the workers run in sessions of their own: kill them by parentage
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {LAUNCH_TIMEOUT_S} s (a hang?):\n{stdout}{stderr}")
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    result.output = stdout + stderr  # type: ignore[attr-defined]
    return result


def kill_tree(pid: int) -> None:
    import psutil

    parent = psutil.Process(pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()


NLORA = [sys.executable, "-m", "naruto_lora"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TORCHRUN_2 += ["-m", "naruto_lora"]


def train_args(workspace: Path, output: str, *sets: str) -> list[str]:
    return cli_args(workspace / "cache", workspace / output, *SETS, *sets)


def dumps(folder: Path) -> tuple[dict, dict, list[dict]]:
    """(rank 0's parameters, rank 1's, both processes' facts)."""
    facts = [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return (
        load_file(str(folder / "rank-0.safetensors")),
        load_file(str(folder / "rank-1.safetensors")),
        facts,
    )


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.fixture(scope="module")
def run_a(workspace: Path) -> subprocess.CompletedProcess:
    """4 steps through ``nlora train --num-processes 2``; process 1's 3rd micro-batch is NaN."""
    sets = probe_sets(workspace / "dump-a", nan_rank=1, nan_call=3)
    return run_nlora(workspace, NLORA, [*train_args(workspace, "a", *sets), "--num-processes", "2"])


@pytest.mark.slow
def test_two_processes_train_one_model_and_one_output_folder(
    workspace: Path, run_a: subprocess.CompletedProcess
) -> None:
    assert run_a.returncode == 0, run_a.output
    out = workspace / "a"
    rank0, rank1, facts = dumps(workspace / "dump-a")
    assert [(f["rank"], f["world_size"], f["backend"], f["step"]) for f in facts] == [
        (0, 2, "gloo", 4),
        (1, 2, "gloo", 4),
    ]
    assert facts[0]["pid"] != facts[1]["pid"]
    # Epoch 0 is each process's first 2 micro-batches: different items on the two.
    assert "(2 batches per epoch per process)" in run_a.output
    epoch0 = [{d for batch in f["seen"][:2] for d in batch} for f in facts]
    assert epoch0[0] and epoch0[1] and not epoch0[0] & epoch0[1]
    assert_equal(rank0, rank1)  # DDP: the gradients were averaged, the updates the same
    assert_equal(rank0, load_file(str(out / "checkpoints" / "step-4" / PARAMS_NAME)))
    start = load_file(str(out / "checkpoints" / "step-2" / PARAMS_NAME))
    assert any(not torch.equal(start[n], rank0[n]) for n in rank0)  # it did train

    # One writer: one folder, one line per step, one checkpoint per step, one cache build.
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (workspace / "nlora-output").exists()
    assert run_a.output.count("The latent cache was missing or stale") == 1
    assert run_a.output.count("Trained 4 steps") == 1
    assert "effective batch 8 (2 processes x batch 2 x accumulation 2)" in run_a.output

    # Process 1's NaN made both skip that update (else process 0 would wait in its all-reduce).
    assert run_a.output.count("the loss is not finite; update skipped") == 1
    assert "step 2: the loss is not finite" in run_a.output
    state = torch.load(out / "checkpoints" / "step-4" / STATE_NAME, weights_only=True)
    assert state["guard"]["total"] == 1
    assert state["num_processes"] == 2
    generators = [rng["generator"] for rng in state["rng_by_rank"]]
    assert not torch.equal(*generators)  # each process draws its own noise


@pytest.fixture(scope="module")
def run_b(workspace: Path, run_a: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A copy of A back at step 2, resumed under torchrun; only process 1 gets a SIGTERM."""
    assert run_a.returncode == 0, run_a.output
    shutil.copytree(workspace / "a", workspace / "b")
    shutil.rmtree(workspace / "b" / "checkpoints" / "step-4")
    sets = probe_sets(workspace / "dump-b", signal_rank=1, signal_step=3)
    return run_nlora(
        workspace, TORCHRUN_2, [*train_args(workspace, "b", *sets), "--resume", "latest"]
    )


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step(
    workspace: Path, run_b: subprocess.CompletedProcess
) -> None:
    assert run_b.returncode != 0, run_b.output  # stopped by a signal, like Ctrl-C
    assert run_b.output.count("Resumed from") == 1 and "step-2" in run_b.output
    assert run_b.output.count("Stopped by SIGTERM at step 3") == 1, run_b.output
    out = workspace / "b"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    rank0, rank1, facts = dumps(workspace / "dump-b")
    assert [f["step"] for f in facts] == [3, 3]
    assert_equal(rank0, rank1)
    assert_equal(rank0, load_file(str(out / "checkpoints" / "step-3" / PARAMS_NAME)))


@pytest.mark.slow
def test_resuming_twice_lands_exactly_on_the_uninterrupted_run(
    workspace: Path, run_b: subprocess.CompletedProcess
) -> None:
    args = train_args(workspace, "b", *probe_sets(workspace / "dump-c"))
    run_c = run_nlora(workspace, NLORA, [*args, "--num-processes", "2", "--resume", "latest"])
    assert run_c.returncode == 0, run_c.output
    assert "Resumed from" in run_c.output and "step-3" in run_c.output
    a, b = workspace / "a", workspace / "b"
    rank0, rank1, facts = dumps(workspace / "dump-c")
    assert [f["step"] for f in facts] == [4, 4]
    assert_equal(rank0, rank1)
    assert_equal(rank0, dumps(workspace / "dump-a")[0])  # each process's RNG resumed exactly
    assert_equal(load_file(str(b / WEIGHT_NAME)), load_file(str(a / WEIGHT_NAME)))
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert (row_a["loss"], row_a["lr"], row_a["grad_norm"]) == (
            row_b["loss"],
            row_b["lr"],
            row_b["grad_norm"],
        )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_one_model_with_nccl(workspace: Path) -> None:
    """The same as run A on two GPUs, in fp16 with its grad scaler (skipped without them)."""
    sets = probe_sets(workspace / "dump-gpu", nan_rank=1, nan_call=3)
    args = train_args(workspace, "gpu", 'train.mixed_precision="fp16"', *sets)
    args[args.index("--device") + 1] = "auto"
    result = run_nlora(workspace, NLORA, [*args, "--num-processes", "2"])
    assert result.returncode == 0, result.output
    rank0, rank1, facts = dumps(workspace / "dump-gpu")
    assert [(f["backend"], f["world_size"], f["step"]) for f in facts] == [("nccl", 2, 4)] * 2
    assert_equal(rank0, rank1)
    assert_equal(rank0, load_file(str(workspace / "gpu" / "checkpoints" / "step-4" / PARAMS_NAME)))
    assert [r["step"] for r in read_metrics(workspace / "gpu" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert result.output.count("the loss is not finite; update skipped") == 1
