"""Multi-process training: launch checks, the main-process rule, and methods that cannot run under DDP.

Launch on GPUs with `accelerate launch --config_file configs/accelerate/<engine>.yaml -m sinkguard.cli
finetune ...`; on CPU with `torchrun --nproc_per_node N -m sinkguard.cli finetune ...` (gloo), or
`accelerate launch --multi_gpu --num_processes N` (never `--cpu`: accelerate then starts one process).
"""

from __future__ import annotations

import os

import torch

from .errors import SinkguardError


def world_size() -> int:
    """Processes in this launch, from the launcher's environment (1 when not launched)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def is_main_process() -> bool:
    """True on rank 0 (and when not launched): the one process that writes models, logs and results."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name):
            return int(os.environ[name]) == 0
    return True


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device; without one the Trainer must be told to use the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def check_launch() -> None:
    """Refuse launches that would silently train something else than asked.

    `accelerate launch --cpu --num_processes N` (N > 1, no mpirun) starts ONE process that trains
    alone at the per-device batch: it sets MASTER_ADDR but no WORLD_SIZE.
    """
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and os.environ.get("MASTER_ADDR") and world_size() == 1:
        raise SinkguardError(
            "`accelerate launch --cpu --num_processes N` starts a single process on CPU (it needs mpirun "
            "for more); use `torchrun --nproc_per_node N -m sinkguard.cli ...` or `accelerate launch "
            "--multi_gpu --num_processes N -m sinkguard.cli ...`"
        )


def check_trainer(trainer) -> None:
    """After the Trainer is built: the launch really is distributed, and the method supports it."""
    launched = world_size()
    if launched > 1 and trainer.args.world_size != launched:
        raise SinkguardError(
            f"launched {launched} processes but the Trainer sees world size {trainer.args.world_size}: each "
            "process would train alone; on CPU keep use_cpu=True (sinkguard's default without a GPU)"
        )
    reason = getattr(trainer, "multiprocess_unsupported", None)
    if trainer.args.world_size > 1 and reason:
        raise SinkguardError(f"{type(trainer).__name__} cannot run under multi-process training: {reason}")
