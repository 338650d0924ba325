"""``nlora train --num-processes N``: the same command, launched as N processes on this machine
through accelerate.

The launch runs in this process with accelerate's own launcher (``accelerate launch
--multi_gpu``, which is torchrun's elastic agent): it starts the N workers, each in a session of
its own, and forwards Ctrl-C / SIGTERM to them once, so each finishes its step and the run
writes one checkpoint. Running it here, not as a second ``accelerate`` program, lets a failed or
stopped run end with one line and the workers' exit code instead of a launcher traceback.

On a CPU the workers pick the gloo backend (accelerate: ``MULTI_CPU``), on GPUs NCCL, one GPU
per process. ``--multi_gpu`` is only accelerate's name for "start several processes with the
torchrun launcher"; its ``--cpu`` flag would start one process (without MPI).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import click

from naruto_lora.util.errors import UserError

LAUNCH_OPTION = "num_processes"
# Seconds the launcher waits for the workers to write their checkpoint after Ctrl-C / SIGTERM
# before it kills them (torchrun's own default, 30 s, is short for a large checkpoint).
SHUTDOWN_TIMEOUT_S = 300


def check_process_count(num_processes: int, device: str) -> None:
    """Fail before anything starts: a count that cannot work on this machine."""
    import torch

    if num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: must be at least 1.")
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UserError(
            "--num-processes given inside a run that a launcher (accelerate launch, torchrun) "
            "already started as several processes.",
            hint="Drop --num-processes: the launcher's own process count applies.",
        )
    if device.startswith("cuda:"):
        raise UserError(
            f"--device {device} with --num-processes {num_processes}: every process would use "
            "the same GPU.",
            hint="Use --device auto (each process takes one GPU); pick GPUs with "
            "CUDA_VISIBLE_DEVICES.",
        )
    on_gpus = device in ("auto", "cuda") and torch.cuda.is_available()
    if on_gpus and num_processes > torch.cuda.device_count():
        raise UserError(
            f"--num-processes {num_processes} but this machine has "
            f"{torch.cuda.device_count()} GPU(s): one process per GPU.",
            hint=f"Use --num-processes {torch.cuda.device_count()} or fewer "
            "(or --device cpu to train on the CPU).",
        )


def forwarded_args(command: click.Command, params: Mapping[str, Any]) -> list[str]:
    """The command line that gives ``params`` back when parsed by ``command``, less
    ``--num-processes``: what each launched process runs."""
    args: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == LAUNCH_OPTION:
            continue
        value = params.get(param.name)
        flag = max(param.opts, key=len)  # the long spelling
        if param.is_flag:
            if value:
                args.append(flag)
        elif param.multiple:
            for item in value or ():
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def accelerate_args(num_processes: int, script_args: Sequence[str]) -> list[str]:
    """``accelerate launch`` arguments for N processes of ``python -m naruto_lora ARGS`` on
    this machine. Every setting a user's accelerate config file could change is given, so the
    shorthand behaves the same everywhere; mixed precision comes from the profile."""
    return [
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--gpu_ids",
        "all",
        "--main_process_port",
        "0",  # a free port: two runs on one machine do not collide
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--module",
        "naruto_lora",
        *script_args,
    ]


def launch_environment(num_processes: int, device: str) -> dict[str, str]:
    """Variables set for the workers unless already set: time to checkpoint when stopped; on a
    CPU, its threads shared out between the processes (torchrun would give each one) and gloo
    on the loopback."""
    import torch

    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)}
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if on_cpu:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
        if sys.platform.startswith("linux"):
            # gloo finds its interface through the host name, which in containers may resolve
            # to nothing reachable; one machine only needs the loopback.
            env["GLOO_SOCKET_IFNAME"] = "lo"
    return {key: value for key, value in env.items() if key not in os.environ}


def launch(num_processes: int, script_args: Sequence[str], device: str) -> int:
    """Run ``nlora SCRIPT_ARGS`` as ``num_processes`` processes; the exit code of the run
    (0, a worker's failure code, or 128 + N when stopped by signal N)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from naruto_lora.util.console import err_console

    os.environ.update(launch_environment(num_processes, device))
    args = launch_command_parser().parse_args(accelerate_args(num_processes, script_args))
    try:
        launch_command(args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        code = first_exit_code(exc)
        err_console.print(f"[red]A training process ended with exit code {code}[/] (see above).")
        return code
    return 0


def first_exit_code(exc: Any) -> int:
    """The exit code of the worker that failed first, from a ``ChildFailedError``."""
    _, failure = exc.get_first_failure()
    code = int(failure.exitcode)
    # A worker killed by signal N has exit code -N (as subprocess reports it); a shell says 128+N.
    return 128 - code if code < 0 else code or 1
