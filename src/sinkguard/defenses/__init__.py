"""Defenses, registered by name with their stage, config dataclass and Trainer subclass.

A defense module calls `register(...)` at import; `get_defense(name)` imports the built-in ones.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import SinkguardError

STAGES = ("alignment", "finetuning", "post")
BUILTIN = ("sinkguard.defenses.sft", "sinkguard.defenses.surgery", "sinkguard.defenses.vaccine",
           "sinkguard.defenses.tvaccine")


@dataclass(frozen=True)
class Defense:
    """A registered method: `config_cls` is a TrainingArguments subclass, `trainer_cls` a Trainer."""

    name: str
    stages: tuple[str, ...]
    config_cls: type
    trainer_cls: type
    description: str = ""


_REGISTRY: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    """Add a defense to the registry (third-party methods can register themselves too)."""
    _REGISTRY[defense.name] = defense
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
    return sorted(n for n, d in _REGISTRY.items() if stage is None or stage in d.stages)


def get_defense(name: str, stage: str | None = None) -> Defense:
    """The registered defense `name`; a clear error if unknown or not usable at `stage`."""
    _load_builtin()
    if name not in _REGISTRY:
        raise SinkguardError(f"unknown defense {name!r}; available: {', '.join(available(stage))}")
    defense = _REGISTRY[name]
    if stage is not None and stage not in defense.stages:
        raise SinkguardError(
            f"defense {name!r} is a {'/'.join(defense.stages)}-stage method, not {stage}; "
            f"{stage}-stage defenses: {', '.join(available(stage))}"
        )
    return defense
