"""Resumable per-run state of a defense: tensors kept beside each checkpoint (Lisa's anchor,
Panacea's eps) and a step-indexed sampling stream over an extra data set.

Trainer checkpoints hold the weights, optimizer and RNG states but not a defense's own tensors;
the mixin writes them as `<checkpoint>/<name>.safetensors` and reads them back on resume, so an
interrupted run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class CheckpointedStateMixin:
    """Subclasses set `state_file` and implement `checkpoint_state` / `restore_state`."""

    state_file: str = "defense_state"

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, string metadata) to save with a checkpoint, or None for nothing."""
        return None

    def restore_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Take back what `checkpoint_state` saved."""

    def _save_checkpoint(self, model, trial) -> None:
        # Written before the Trainer's files, so `trainer_state.json` stays the last file of a checkpoint:
        # `train.last_checkpoint` takes a folder without it for a save cut off by a stopped session.
        saved = self.checkpoint_state()
        if saved is not None and self.args.should_save:
            tensors, metadata = saved
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.state_file}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = Path(resume_from_checkpoint) / f"{self.state_file}.safetensors"
            if path.is_file():
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as fh:
                    metadata = dict(fh.metadata() or {})
                self.restore_state(load_file(str(path)), metadata)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class BatchStream:
    """Batches of an extra data set drawn from a stream of per-epoch random permutations (the
    official code's RandomSampler loader, restarted when exhausted), addressed by batch number so
    that a resumed run draws the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: tuple[int, list[int]] | None = None

    def indices(self, number: int) -> list[int]:
        """Row indices of batch `number` (0-based)."""
        out = []
        for pos in range(number * self.batch_size, (number + 1) * self.batch_size):
            epoch, i = divmod(pos, self.n)
            if self._perm is None or self._perm[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
            out.append(self._perm[1][i])
        return out
