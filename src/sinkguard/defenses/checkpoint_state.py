"""Trainer state kept in tensors beside each checkpoint (Lisa's anchor, Panacea's eps).

Trainer checkpoints hold the weights, optimizer and RNG states but not a defense's own tensors;
this mixin writes them as `<checkpoint>/<name>.safetensors` and reads them back on resume, so
an interrupted run continues exactly as an uninterrupted one.
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
        super()._save_checkpoint(model, trial)
        saved = self.checkpoint_state()
        if saved is None or not self.args.should_save:
            return
        tensors, metadata = saved
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        path = folder / f"{self.state_file}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = Path(resume_from_checkpoint) / f"{self.state_file}.safetensors"
            if path.is_file():
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as fh:
                    metadata = dict(fh.metadata() or {})
                self.restore_state(load_file(str(path)), metadata)
        return super().train(resume_from_checkpoint, *args, **kwargs)
