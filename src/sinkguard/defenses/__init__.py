"""Defenses, registered per (name, stage) with their config dataclass and Trainer subclass.

A defense module calls `register(...)` at import, once per stage it serves (one name may serve
two stages with different configs and trainers, e.g. Antibody); `get_defense(name, stage)`
imports the built-in ones. Post-fine-tuning defenses have no trainer: `apply` repairs a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SinkguardError

STAGES = ("alignment", "finetuning", "post_finetuning")
BUILTIN = ("sinkguard.defenses.sft", "sinkguard.defenses.surgery", "sinkguard.defenses.vaccine",
           "sinkguard.defenses.tvaccine", "sinkguard.defenses.lisa", "sinkguard.defenses.panacea",
           "sinkguard.defenses.antidote", "sinkguard.defenses.booster", "sinkguard.defenses.repnoise",
           "sinkguard.defenses.antibody")


@dataclass(frozen=True)
class Defense:
    """A registered method at one stage.

    Training stages: `config_cls` is a TrainingArguments subclass, `trainer_cls` a Trainer.
    Post-fine-tuning: `config_cls` is a plain dataclass and `apply(model_dir, out_dir, config, *,
    data_root, adapter_dir, [template]) -> Path` writes the repaired model (`template`, the format
    the model was fine-tuned with, is passed only when it is not chat). `fidelity` is "official
    code", "paper only" or "baseline".
    """

    name: str
    stage: str
    config_cls: type
    trainer_cls: type | None = None
    description: str = ""
    paper: str = ""
    official_code: str = ""
    fidelity: str = "official code"
    apply: Callable | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")


_REGISTRY: dict[tuple[str, str], Defense] = {}


def register(defense: Defense) -> Defense:
    """Add a defense at its stage (third-party methods can register themselves too)."""
    _REGISTRY[(defense.name, defense.stage)] = defense
    return defense


def _load_builtin() -> None:
    for module in BUILTIN:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def available(stage: str | None = None) -> list[str]:
    """Names of the registered defenses usable at `stage` (all if None)."""
    _load_builtin()
    return sorted({n for n, s in _REGISTRY if stage is None or s == stage})


def registered() -> list[Defense]:
    """Every registered (name, stage) entry, sorted by stage order then name."""
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda d: (STAGES.index(d.stage), d.name))


def stages_of(name: str) -> list[str]:
    """The stages at which `name` is registered, in flow order."""
    _load_builtin()
    return [s for s in STAGES if (name, s) in _REGISTRY]


def get_defense(name: str, stage: str | None = None) -> Defense:
    """The defense `name` at `stage`; a clear error if unknown, or not usable at `stage`.

    Without `stage` the name must be registered at exactly one stage.
    """
    _load_builtin()
    stages = stages_of(name)
    if not stages:
        raise SinkguardError(f"unknown defense {name!r}; available: {', '.join(available(stage))}")
    if stage is None:
        if len(stages) > 1:
            raise SinkguardError(f"defense {name!r} serves several stages ({', '.join(stages)}); name one")
        stage = stages[0]
    if stage not in stages:
        raise SinkguardError(
            f"defense {name!r} is a {'/'.join(stages)}-stage method, not {stage}; "
            f"{stage}-stage defenses: {', '.join(available(stage))}"
        )
    return _REGISTRY[(name, stage)]
