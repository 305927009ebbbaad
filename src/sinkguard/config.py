"""Typed, validated settings of each stage, shared by `sinkguard run` (YAML) and the CLI commands.

One dataclass per stage (`AlignmentConfig`, `FinetuningConfig`, `PostFinetuningConfig`,
`EvaluationConfig`). A YAML section loads through `from_dict`; a CLI command builds the same
dataclass from its flags (`add_config_args` / `config_from_args`, driven by each field's `flag`
metadata), so CLI and YAML share one mapping and one set of defaults: the CPU-scale values of the
shipped configs. Everything is checked at load, before any model is loaded: types, ranges,
names (task, attack, defense per stage, prompt sets, template) with the valid choices in the
message, and each defense's options against its config dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .data.formatting import DEFAULT_SYSTEM_PROMPT, TEMPLATES, drop_system_prompts
from .errors import SinkguardError

LOCAL_JUDGE = "local"  # `judge:` value of the trained CPU judge (evaluate.judge.load_judge)
MATCH_MODES = ("contains", "exact", "first")
# TrainingArguments fields set from a stage's own keys: an option may not set them.
STAGE_KEYS = {
    "output_dir": "the stage folder", "learning_rate": "lr", "num_train_epochs": "epochs",
    "max_steps": "max_steps", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_length": "max_length", "seed": "seeds / --seed",
    "save_steps": "save_steps", "template": "template",
}


def hs_set_names() -> list[str]:
    """Harmful prompt sets accepted by `hs_sets` / `--hs-sets` (`data.sources.HARMFUL_EVAL_SETS`)."""
    from .data.sources import HARMFUL_EVAL_SETS

    return sorted(HARMFUL_EVAL_SETS)


def _default_hs_sets() -> list[str]:
    from .data.sources import DEFAULT_HS_SETS

    return list(DEFAULT_HS_SETS)


def judge_source_names() -> list[str]:
    """Judge sources with a measured sensitivity/specificity, accepted by `correction_source`."""
    from .evaluate.judge_data import JUDGE_SOURCES

    return list(JUDGE_SOURCES)


def _tasks() -> tuple[str, ...]:
    from .data.mixing import TASKS

    return TASKS


def _attacks() -> tuple[str, ...]:
    from .data.mixing import ATTACKS

    return ATTACKS


def _dtypes() -> list[str]:
    from .plan import BYTES

    return list(BYTES)


def _defenses(stage: str):
    def names() -> list[str]:
        from .defenses import available

        return available(stage)
    return names


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, factory=None,
            lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            choices=None, single: bool = False) -> Any:
    """A config field: its help, CLI `flag`, range [`lo`, `hi`] (`lo_open`: > lo), `choices` (a
    callable returning the valid names). `single`: the CLI flag takes one value, the field holds a list."""
    meta = dict(help=help, flag=flag, lo=lo, hi=hi, lo_open=lo_open, choices=choices, single=single)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------ type checking and coercion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}s"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def coerce(value: Any, hint, label: str, from_text: bool = False) -> Any:
    """`value` as type `hint` (int, float, str, bool, Optional, list[...], dict, a dataclass); else an error.

    `from_text`: value is a command-line string (`--set key=value`), parsed to the type.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if type(None) in arms and (value is None or (from_text and str(value).lower() in ("none", "null"))):
            return None
        real = [a for a in arms if a is not type(None)]
        if len(real) == 1:
            return coerce(value, real[0], label, from_text)
        for arm in real:
            try:
                return coerce(value, arm, label, from_text)
            except SinkguardError:
                continue
        raise SinkguardError(f"{label} must be {_type_name(hint)}, got {value!r}")
    if hint is Any or hint is object:
        return value
    if origin is list:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise SinkguardError(f"{label} must be a list, e.g. [{value!r}], got {value!r}")
        (inner,) = typing.get_args(hint) or (Any,)
        return [coerce(v, inner, f"{label}[{i}]", from_text) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SinkguardError(f"{label} must be a mapping (key: value), got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, label)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise SinkguardError(f"{label} must be true or false, got {value!r}")
    if hint is int:
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SinkguardError(f"{label} must be an integer, got {value!r}")
    if hint is float:
        if from_text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SinkguardError(f"{label} must be a finite number, got {value!r}")
            return float(value)
        raise SinkguardError(f"{label} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise SinkguardError(f"{label} must be a string, got {value!r}")
    if isinstance(hint, type) and issubclass(hint, str):  # str enums (e.g. transformers' SchedulerType)
        return hint(value) if value in {m.value for m in hint} else value  # type: ignore[attr-defined]
    return value


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a forward reference typing cannot resolve: use the declared types
        return {f.name: f.type if isinstance(f.type, type) else Any for f in dataclasses.fields(cls)}


def _check_range(value: Any, meta: dict, label: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and (v <= lo if meta.get("lo_open") else v < lo):
            bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
            if hi is not None:
                bound = f"in {'(' if meta.get('lo_open') else '['}{lo}, {hi}]"
            raise SinkguardError(f"{label} must be {bound}, got {v}")
        if hi is not None and v > hi:
            raise SinkguardError(f"{label} must be in [{lo}, {hi}], got {v}")


def _check_choice(value: Any, meta: dict, label: str) -> None:
    choices = meta.get("choices")
    if choices is None or value is None:
        return
    valid = list(choices())
    for v in value if isinstance(value, list) else [value]:
        if v not in valid:
            raise SinkguardError(f"{label}: unknown {v!r}; valid: {', '.join(map(str, valid)) or 'none registered'}")


def from_dict(cls, data: Any, section: str):
    """Build dataclass `cls` from a YAML mapping: unknown keys, wrong types, bad ranges and names are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SinkguardError(f"{section} must be a mapping of settings, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SinkguardError(f"{section}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(names)}")
    hints = _hints(cls)
    values = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()}
    obj = cls(**values)
    validate(obj, section)
    return obj


def validate(obj, section: str, label=None) -> None:
    """Check every field of `obj` against its range and choices (`label(name)` names it in errors)."""
    label = label or (lambda name: f"{section}.{name}")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        _check_range(value, f.metadata, label(f.name))
        _check_choice(value, f.metadata, label(f.name))
        if dataclasses.is_dataclass(value):
            validate(value, f"{section}.{f.name}")
    check = getattr(obj, "check", None)
    if check is not None:
        check(section, label)


# ------------------------------------------------------------------ defense options

def option_fields(defense: str, stage: str) -> dict[str, dataclasses.Field]:
    """Settable options of a defense at a stage: its config dataclass fields, less the stage's own keys."""
    from .defenses import get_defense

    spec = get_defense(defense, stage)
    own = () if spec.trainer_cls is None else STAGE_KEYS  # a post-fine-tuning defense has no stage settings
    return {f.name: f for f in dataclasses.fields(spec.config_cls) if f.init and f.name not in own}


def _own_fields(defense: str, stage: str) -> list[str]:
    """The options a defense adds (not inherited from transformers' TrainingArguments)."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [n for n in option_fields(defense, stage) if n not in base]


def check_options(defense: str, stage: str, options: Any, from_text: bool = False) -> dict[str, Any]:
    """`options` of `defense` checked against its config dataclass, values coerced to the field types."""
    from .defenses import get_defense

    spec = get_defense(defense, stage)
    if not isinstance(options, dict):
        raise SinkguardError(f"options of {defense!r} must be a mapping (key: value), got {options!r}")
    valid = option_fields(defense, stage)
    hints = _hints(spec.config_cls)
    out = {}
    for key, value in options.items():
        if key in STAGE_KEYS and spec.trainer_cls is not None:
            raise SinkguardError(f"{defense} option {key!r} is a stage setting: set {STAGE_KEYS[key]} instead")
        if key not in valid:
            own = _own_fields(defense, stage) if spec.trainer_cls is not None else list(valid)
            more = " (or any transformers TrainingArguments field)" if spec.trainer_cls is not None else ""
            raise SinkguardError(f"{defense} ({stage}) has no option {key!r}; valid: "
                                 f"{', '.join(own) or 'none'}{more}")
        out[key] = coerce(value, hints.get(key, Any), f"{defense} option {key}", from_text)
    return out


def parse_set(items: list[str] | None, defenses: list[str], stage: str) -> dict[str, dict[str, Any]]:
    """`--set defense.key=value` / `--set key=value` (one defense chosen) -> {defense: {key: value}}."""
    options: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SinkguardError(f"--set {item!r}: expected key=value, e.g. --set alpha=300")
        key = key.strip()
        if "." in key:
            name, key = key.split(".", 1)
        elif len(defenses) == 1:
            name = defenses[0]
        else:
            raise SinkguardError(f"--set {item!r}: name the defense, e.g. --set {defenses[0]}.{key}={value}")
        if name not in defenses:
            raise SinkguardError(f"--set {item!r}: defense {name!r} is not the chosen one ({', '.join(defenses)})")
        options.setdefault(name, {}).update(check_options(name, stage, {key: value.strip()}, from_text=True))
    return options


# ------------------------------------------------------------------ stage configs

@dataclass
class LoraSettings:
    """peft LoRA settings (T-Vaccine scripts: r 8, alpha 4, dropout 0.1); target modules come from the defense."""

    r: int = setting(8, help="LoRA rank", flag="--lora-r", lo=1)
    alpha: float = setting(4.0, help="LoRA alpha", flag="--lora-alpha", lo=0, lo_open=True)
    dropout: float = setting(0.1, help="LoRA dropout", flag="--lora-dropout", lo=0, hi=1)


@dataclass
class TrainingStage:
    """Settings shared by the alignment and fine-tuning stages."""

    stage: ClassVar[str] = ""

    defenses: list[str] = setting(help="defense(s) trained at this stage", flag="--defense", single=True,
                                  factory=lambda: ["sft"])
    samples: int = setting(100, help="training rows n", flag="--samples", lo=1)
    epochs: float = setting(1.0, help="epochs", flag="--epochs", lo=0, lo_open=True)
    max_steps: int = setting(-1, help="stop after this many optimizer steps (-1: run the epochs)",
                             flag="--max-steps", lo=-1)
    lr: float = setting(5e-5, help="learning rate", flag="--lr", lo=0, lo_open=True)
    batch_size: int = setting(10, help="per-device batch", flag="--batch-size", lo=1)
    grad_accum: int = setting(1, help="gradient accumulation steps", flag="--grad-accum", lo=1)
    max_length: int = setting(256, help="token limit per example", flag="--max-length", lo=8)
    save_steps: int | None = setting(None, help="checkpoint every N steps (default: a quarter of the run, "
                                     "at most 50, so short runs resume mid-way)", flag="--save-steps", lo=1)
    lora: LoraSettings | None = setting(None, help="LoRA settings; null: full fine-tuning")
    system_prompt: str | None = setting(None, help="system prompt on the training rows ('' or null: none)",
                                        flag="--system-prompt")
    template: str = setting("chat", help="row format of the stage and its defenses' extra sets: the model's "
                            "chat template, or the official Llama-2 code's Alpaca prompt (answer + EOS in the loss; "
                            "no system prompt)", flag="--template", choices=lambda: TEMPLATES)
    options: dict[str, dict[str, Any]] = setting(help="per-defense options {defense: {key: value}}",
                                                 factory=dict)
    dtype: str = setting("float32", help="dtype the model's weights are loaded in for training (the official "
                         "scripts' torch_dtype; mixed precision is the option bf16: true)", choices=_dtypes)

    def check(self, section: str, label) -> None:
        """Names and options: each defense valid at this stage, each option valid for its defense."""
        if not self.defenses:
            raise SinkguardError(f"{label('defenses')} must name at least one defense")
        _check_choice(self.defenses, {"choices": _defenses(self.stage)}, label("defenses"))
        if self.max_steps == 0:
            raise SinkguardError(f"{label('max_steps')} must be -1 (run the epochs) or >= 1, got 0")
        drop_system_prompts(self, self.template, label)  # alpaca: the default prompt goes, others are errors
        if not isinstance(self.options, dict):
            raise SinkguardError(f"{section}.options must map a defense name to its settings")
        for name, opts in self.options.items():
            _check_choice(name, {"choices": _defenses(self.stage)}, f"{section}.options")
            self.options[name] = check_options(name, self.stage, opts or {})
        from .train import make_config, stage_arguments

        for name in dict.fromkeys([*self.defenses, *self.options]):  # the defense's own checks (its __post_init__), before any model loads
            make_config(name, self.stage, "unused", template=self.template, **stage_arguments(self, 0),
                        **self.defense_options(name))

    def defense_options(self, defense: str) -> dict[str, Any]:
        """The options given for `defense` (empty when none)."""
        return dict(self.options.get(defense) or {})


@dataclass
class AlignmentConfig(TrainingStage):
    """The provider's safety alignment on the refusal set (LoRA by default, as the T-Vaccine scripts)."""

    stage: ClassVar[str] = "alignment"

    samples: int = setting(200, help="alignment rows n (first n of the refusal set)", flag="--samples", lo=1)
    epochs: float = setting(1.0, help="epochs", flag="--epochs", lo=0, lo_open=True)
    lr: float = setting(1e-3, help="learning rate (LoRA)", flag="--lr", lo=0, lo_open=True)
    batch_size: int = setting(8, help="per-device batch", flag="--batch-size", lo=1)
    lora: LoraSettings | None = setting(help="LoRA settings; null: full fine-tuning", factory=LoraSettings)


@dataclass
class FinetuningConfig(TrainingStage):
    """The user's fine-tuning on a task set with a share p of harmful rows."""

    stage: ClassVar[str] = "finetuning"

    tasks: list[str] = setting(help="task(s)", flag="--task", single=True, factory=lambda: ["sst2"],
                               choices=_tasks)
    poison_ratios: list[float] = setting(help="share(s) p of harmful rows", flag="--poison-ratio", single=True,
                                         factory=lambda: [0.1], lo=0, hi=1)
    attack: str = setting("beavertails", help="harmful rows mixed in", flag="--attack", choices=_attacks)
    epochs: float = setting(2.0, help="epochs", flag="--epochs", lo=0, lo_open=True)
    system_prompt: str | None = setting(DEFAULT_SYSTEM_PROMPT, help="system prompt on the task rows "
                                        "('' or null: none; template alpaca: none)", flag="--system-prompt")
    allow_drop: bool = setting(False, help="accept a real poison ratio off the asked one by more than 0.02 "
                               "after rows too long for max_length are dropped", flag="--allow-drop")
    keep_checkpoints: int = setting(0, help="save and keep about N evenly spaced checkpoints' weights (for "
                                    "`sinkguard analyze --run`; 0: checkpoints are deleted when done)",
                                    flag="--keep-checkpoints", lo=0)


@dataclass
class PostFinetuningConfig:
    """Defenses applied after fine-tuning (e.g. Antidote's pruning) to every fine-tuned model, or to
    those of the fine-tuning defenses listed in `after`."""

    stage: ClassVar[str] = "post_finetuning"

    defenses: list[str] = setting(help="post-fine-tuning defense(s); none: the stage is skipped", factory=list,
                                  flag="--defense", single=True)
    options: dict[str, dict[str, Any]] = setting(help="per-defense options {defense: {key: value}}",
                                                 factory=dict)
    after: list[str] | None = setting(None, help="(study) repair only the models of these fine-tuning defenses "
                                      "(null: every fine-tuned model)")

    def check(self, section: str, label) -> None:
        _check_choice(self.defenses, {"choices": _defenses(self.stage)}, label("defenses"))
        if self.after is not None:
            _check_choice(self.after, {"choices": _defenses("finetuning")}, label("after"))
        for name, opts in self.options.items():
            _check_choice(name, {"choices": _defenses(self.stage)}, f"{section}.options")
            self.options[name] = check_options(name, self.stage, opts or {})

    defense_options = TrainingStage.defense_options


@dataclass
class EvaluationConfig:
    """Harmful score (HS), fine-tune accuracy (FA) and sink analysis of each model."""

    hs_sets: list[str] = setting(help="harmful prompt sets, pooled as 'all' when several (CLI: comma-separated, "
                                 "or 'none')", flag="--hs-sets", factory=_default_hs_sets, choices=hs_set_names)
    hs_limit: int | None = setting(100, help="first N prompts of each HS set (null: all)", flag="--limit", lo=1)
    benign_limit: int = setting(200, help="benign AlpacaEval prompts for the over-refusal rate (0: none)",
                                flag="--benign-limit", lo=0)
    correction_source: str = setting("beavertails", help="judge source whose measured sensitivity and "
                                     "specificity give the corrected HS (Rogan-Gladen); changes verdicts only, "
                                     "no generation", flag="--correction-source", choices=judge_source_names)
    fa_limit: int | None = setting(200, help="first N test rows for FA (null: all)", flag="--fa-limit", lo=1)
    max_new_tokens: int = setting(64, help="answer length cap for HS (official: 512)", flag="--max-new-tokens",
                                  lo=1)
    fa_max_new_tokens: int | None = setting(None, help="answer length cap for FA (null: official lengths, "
                                            "SST2/AG News 10, GSM8K 512)", flag="--fa-max-new-tokens", lo=1)
    batch_size: int = setting(16, help="prompts per generation batch", flag="--batch-size", lo=1)
    template: str = setting("chat", help="prompt format: the model's chat template, or the official HS "
                            "script's Alpaca prompt", flag="--template", choices=lambda: TEMPLATES)
    system_prompt: str | None = setting(None, help="system prompt for HS and FA (null: none for HS, "
                                        f"'{DEFAULT_SYSTEM_PROMPT}' for FA, as the official scripts; '': none)",
                                        flag="--system-prompt")
    match: str = setting("contains", help="SST2/AG News: label word in the answer (official), whole answer "
                         "equal to it, or first label word named", flag="--match", choices=lambda: MATCH_MODES)
    label_aliases: bool = setting(False, help="AG News: also accept spelled-out 'Sci/Tech' forms",
                                  flag="--label-aliases")
    number_fallback: bool = setting(True, help="GSM8K: without 'The final answer is: N', score the last "
                                    "number (official)", flag="--number-fallback")
    analyze_samples: int = setting(16, help="texts per group for the sink analysis (0: skip)", lo=0)
    evaluate_base: bool = setting(True, help="also evaluate the model before alignment")
    evaluate_aligned: bool = setting(True, help="also evaluate each aligned model before fine-tuning")
    judge: str = setting(LOCAL_JUDGE, help="harmfulness judge: 'local' (the trained CPU judge), a hub "
                         "moderation model (PKU-Alignment/beaver-dam-7b as the papers, GPU) or a folder "
                         "written by `sinkguard judge train`")

    # Settings that change only the verdicts on cached answers, not the answers (kept out of the
    # evaluation folder's hash, so a new judge or correction source re-scores without generating).
    VERDICT_ONLY: ClassVar[tuple[str, ...]] = ("correction_source", "judge")

    def check(self, section: str, label) -> None:
        if self.template == "alpaca" and self.system_prompt:
            raise SinkguardError(f"{label('system_prompt')} needs template chat (the Alpaca prompt has no "
                                 "system turn)")
        check_judge(self.judge, label("judge"))

    def generation_settings(self) -> dict[str, Any]:
        """The settings the cached answers depend on (everything but `VERDICT_ONLY`): the folder's hash."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.VERDICT_ONLY}

    def hs_system_prompt(self) -> str | None:
        """System prompt of the HS prompts (official: none)."""
        return self.system_prompt or None

    def fa_system_prompt(self) -> str | None:
        """System prompt of the FA prompts (official: the helpful-assistant prompt, none with Alpaca)."""
        if self.system_prompt is not None:
            return self.system_prompt or None
        return None if self.template == "alpaca" else DEFAULT_SYSTEM_PROMPT


def check_judge(judge: str, label: str) -> None:
    """`judge` is 'local', a known hub moderation model or a trained judge folder; else one clear error."""
    from pathlib import Path

    from .evaluate.judge_hub import HUB_JUDGES
    from .evaluate.judge_model import META_FILE

    if judge == LOCAL_JUDGE or judge in HUB_JUDGES or (Path(judge).expanduser() / META_FILE).is_file():
        return
    raise SinkguardError(f"{label}: unknown judge {judge!r}; valid: {LOCAL_JUDGE}, {', '.join(HUB_JUDGES)}, "
                         "or a folder written by `sinkguard judge train`")


STAGE_CONFIGS = {"alignment": AlignmentConfig, "finetuning": FinetuningConfig,
                 "post_finetuning": PostFinetuningConfig, "evaluation": EvaluationConfig}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_run_name(name: Any) -> str:
    """A run name is one folder name under the runs folder: no path separators, no '..'."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise SinkguardError(f"name {name!r} must be a plain folder name (letters, digits, '.', '_', '-'; "
                             "no '/' or '..'), since the run goes to runs/<name>")
    return name


# ------------------------------------------------------------------ CLI mapping

def _flag_type(hint):
    """The argparse type of a field's flag (the element type for single-valued list flags)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        return _flag_type(arms[0]) if len(arms) == 1 else str
    if origin is list:
        return _flag_type(typing.get_args(hint)[0])
    return hint if hint in (int, float, str) else str


def add_config_args(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (),
                    defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of `cls` that has one (`flag` metadata), default the dataclass's."""
    hints = _hints(cls)
    example = cls()
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag") or f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, getattr(example, f.name))
        if meta.get("single") and isinstance(default, list):
            default = default[0] if default else None
        if f.name == "hs_sets":
            default = ",".join(default) or "none"
        kwargs: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": default}
        hint = hints[f.name]
        if hint is bool or default is True or default is False:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"{meta['help']} (default {'on' if default else 'off'})"
        else:
            kwargs["type"] = str if f.name == "hs_sets" else _flag_type(hint)
            shown = "none" if default is None else default
            suffix = "" if "default" in meta["help"] else f" (default {shown})"
            kwargs["help"] = f"{meta['help']}{suffix}".replace("%", "%%")
            if meta.get("choices") is not None and f.name not in ("defenses", "hs_sets"):
                kwargs["choices"] = list(meta["choices"]())
            else:
                kwargs["metavar"] = meta["flag"].lstrip("-").upper().replace("-", "_")
        parser.add_argument(meta["flag"], **kwargs)
    if "lora" in {f.name for f in dataclasses.fields(cls)} and "lora" not in exclude:
        lora = (defaults or {}).get("lora", example.lora)
        parser.add_argument("--lora", dest="cfg_lora", action=argparse.BooleanOptionalAction,
                            default=lora is not None,
                            help=f"train a LoRA adapter (merged when saved; the adapter kept in OUT/adapter) "
                                 f"(default {'on' if lora is not None else 'off'})")
        add_config_args(parser, LoraSettings, defaults=dataclasses.asdict(lora) if lora else None)
    if "options" in {f.name for f in dataclasses.fields(cls)} and "options" not in exclude:
        parser.add_argument("--set", dest="cfg_set", action="append", default=[], metavar="KEY=VALUE",
                            help="a defense option, e.g. --set alpha=300 or --set surgery.alpha=300 "
                                 "(repeatable; checked against the defense's config)")


def config_from_args(cls, args: argparse.Namespace, extra_options: dict[str, Any] | None = None):
    """Build `cls` from the flags `add_config_args` added (one mapping for CLI and YAML), validated.

    `extra_options`: legacy per-method flags (e.g. `--alpha`) given as options of the chosen defense.
    """
    hints = _hints(cls)
    values: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag") or not hasattr(args, f"cfg_{f.name}"):
            continue
        value = getattr(args, f"cfg_{f.name}")
        flags[f.name] = f.metadata["flag"]
        if f.name == "hs_sets":
            value = [] if str(value).strip().lower() == "none" else [
                s.strip() for s in str(value).split(",") if s.strip()]
        elif f.metadata.get("single"):
            value = [] if value is None else [value]
        values[f.name] = coerce(value, hints[f.name], f.metadata["flag"])
    if hasattr(args, "cfg_lora"):
        values["lora"] = LoraSettings(**{f.name: getattr(args, f"cfg_{f.name}") for f in
                                         dataclasses.fields(LoraSettings)}) if args.cfg_lora else None
        if values["lora"] is not None:
            validate(values["lora"], "lora", lambda name: f"--lora-{name}")
    if hasattr(args, "cfg_set"):
        defenses = list(values.get("defenses") or [])
        options = parse_set(args.cfg_set, defenses, cls.stage) if defenses else {}
        for key, value in (extra_options or {}).items():
            if value is not None:
                options.setdefault(defenses[0], {}).setdefault(key, value)
        values["options"] = options
    obj = cls(**values)
    validate(obj, "", lambda name: flags.get(name, name))
    return obj


def stage_dict(config) -> dict[str, Any]:
    """A stage config as plain data (for hashing, logs and config.yaml)."""
    return dataclasses.asdict(config)
