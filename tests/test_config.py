"""Typed stage configs: validation at load, one CLI/YAML mapping, --set, defense defaults, dry run."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sinkguard.cli import build_parser, main
from sinkguard.config import (
    AlignmentConfig,
    EvaluationConfig,
    FinetuningConfig,
    PostFinetuningConfig,
    config_from_args,
    parse_set,
)
from sinkguard.defenses import _REGISTRY, Defense, get_defense
from sinkguard.defenses.sft import LORA_TARGETS, SFTConfig, SinkguardTrainer
from sinkguard.errors import SinkguardError
from sinkguard.experiment import ExperimentConfig
from sinkguard.train import make_config, stage_arguments


@pytest.mark.parametrize("section, message", [
    ({"finetuning": {"tasks": "sst2"}}, r"finetuning.tasks must be a list, e.g. \['sst2'\]"),
    ({"finetuning": {"lr": "fast"}}, "finetuning.lr must be a number, got 'fast'"),
    ({"finetuning": {"lr": -1e-5}}, r"finetuning.lr must be > 0, got -1e-05"),
    ({"finetuning": {"lr": float("inf")}}, "finetuning.lr must be a finite number"),
    ({"finetuning": {"samples": 0}}, "finetuning.samples must be >= 1, got 0"),
    ({"alignment": {"batch_size": 0}}, "alignment.batch_size must be >= 1, got 0"),
    ({"finetuning": {"samples": 2.5}}, "finetuning.samples must be an integer, got 2.5"),
    ({"finetuning": {"poison_ratios": [0.1, -0.2]}}, r"poison_ratios must be in \[0, 1\], got -0.2"),
    ({"finetuning": {"tasks": ["sst3"]}}, "finetuning.tasks: unknown 'sst3'; valid: sst2, agnews, gsm8k, alpaca"),
    ({"finetuning": {"attack": "x"}}, "finetuning.attack: unknown 'x'; valid: beavertails, harmful_qa"),
    ({"finetuning": {"defenses": ["vaccine"]}}, r"finetuning.defenses: unknown 'vaccine'; valid: .*surgery"),
    ({"alignment": {"defenses": ["surgery"]}}, r"alignment.defenses: unknown 'surgery'; valid: .*tvaccine"),
    ({"evaluation": {"hs_sets": ["beaver"]}}, "evaluation.hs_sets: unknown 'beaver'; valid: .*advbench"),
    ({"evaluation": {"template": "llama"}}, "evaluation.template: unknown 'llama'; valid: chat, alpaca"),
    ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens must be >= 1, got 0"),
    ({"evaluation": {"benign_limit": -1}}, "evaluation.benign_limit must be >= 0, got -1"),
    ({"evaluation": {"benign_limit": "all"}}, "evaluation.benign_limit must be an integer, got 'all'"),
    ({"evaluation": {"correction_source": "sst5"}},
     "evaluation.correction_source: unknown 'sst5'; valid: beavertails, refusals, .*alpaca"),
    ({"finetuning": {"keep_checkpoints": -2}}, "finetuning.keep_checkpoints must be >= 0, got -2"),
    ({"alignment": {"keep_checkpoints": 4}}, "alignment: unknown key.s. keep_checkpoints"),
    ({"finetuning": {"options": {"surgery": {"alhpa": 3}}}}, "surgery .finetuning. has no option 'alhpa'; valid: lora_target_modules, alpha, "),
    ({"finetuning": {"options": {"surgery": {"alpha": "big"}}}}, "surgery option alpha must be a number"),
    ({"finetuning": {"options": {"surgery": {"alpha": -1.0}}}}, "alpha must be >= 0, got -1.0"),
    ({"finetuning": {"options": {"surgery": {"learning_rate": 1.0}}}}, "is a stage setting: set lr"),
    ({"alignment": {"lora": {"r": 0}}}, "alignment.lora.r must be >= 1, got 0"),
    ({"post_finetuning": {"defenses": ["sft"]}}, "post_finetuning.defenses: unknown 'sft'"),
    ({"name": "../escape"}, "must be a plain folder name"),
    ({"seeds": 43}, "seeds must be a list"),
])
def test_bad_values_are_one_clear_error_at_load(section, message):
    with pytest.raises(SinkguardError, match=message):
        ExperimentConfig(**section)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"finetuning": {"batch_size": "ten"}}))
    with pytest.raises(SinkguardError, match=r"c.yaml: finetuning.batch_size must be an integer, got 'ten'"):
        ExperimentConfig.from_yaml(path)
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SinkguardError, match="not UTF-8"):
        ExperimentConfig.from_yaml(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(SinkguardError, match="expected a mapping"):
        ExperimentConfig.from_yaml(path)


def test_shipped_configs_load_and_use_the_shared_defaults():
    for name in ("quickstart", "alignment_defenses", "alignment_defenses_lora"):
        cfg = ExperimentConfig.from_yaml(f"configs/{name}.yaml")
        assert cfg.evaluation.hs_limit == 100 and cfg.finetuning.max_length == 256
    cfg = ExperimentConfig.from_yaml("configs/alignment_defenses.yaml")
    assert cfg.alignment.options == {"vaccine": {"rho": 2.0}, "tvaccine": {"rho": 3.0}}
    assert cfg.post_finetuning.defenses == []


def test_every_shipped_config_loads_and_plans():
    """Every YAML under configs/ (not configs/ltsf) validates and plans without loading a model."""
    from pathlib import Path

    from sinkguard.experiment import Experiment

    paths = sorted(Path("configs").glob("*.yaml"))
    assert {"benchmark_cpu.yaml", "benchmark_cpu_sweep.yaml", "benchmark_cpu_alignment.yaml"} <= {p.name for p in paths}
    for path in paths:
        cfg = ExperimentConfig.from_yaml(path)
        assert Experiment(cfg, "unused").plan(), path
    bench = ExperimentConfig.from_yaml("configs/benchmark_cpu.yaml").evaluation
    assert bench.hs_sets == ["beavertails", "harmbench", "strongreject"] and bench.benign_limit == 200


def test_evaluation_hash_leaves_out_verdict_only_settings():
    """A new correction source re-scores the cached answers: same evaluation folder; a new benign
    limit generates other answers: another folder."""
    from sinkguard.experiment import eval_hash

    e = EvaluationConfig()
    assert eval_hash("m", "sst2", e) == eval_hash("m", "sst2", dataclasses.replace(e, correction_source="refusals"))
    assert eval_hash("m", "sst2", e) != eval_hash("m", "sst2", dataclasses.replace(e, benign_limit=10))


def test_keep_checkpoints_is_a_finetuning_setting(tmp_path):
    from sinkguard.experiment import Experiment

    def ft_folders(keep):
        cfg = ExperimentConfig(alignment=None, finetuning={"keep_checkpoints": keep})
        return [j["folder"] for j in Experiment(cfg, tmp_path).plan() if j["stage"] == "finetuning"]

    assert FinetuningConfig().keep_checkpoints == 0
    assert ft_folders(8) != ft_folders(0)  # kept checkpoints live in their own folder
    args = _parse(["finetune", "--out", "x", "--keep-checkpoints", "8"])
    assert config_from_args(FinetuningConfig, args).keep_checkpoints == 8



def test_finetune_cli_hands_keep_checkpoints_to_the_stage(monkeypatch, tmp_path):
    import sinkguard.data
    import sinkguard.train

    seen = {}
    monkeypatch.setattr(sinkguard.data, "poisoned_dataset", lambda *a, **k: [{"prompt": "p", "response": "r"}])
    monkeypatch.setattr(sinkguard.train, "run_stage", lambda *a, **k: seen.update(k) or tmp_path)
    assert main(["finetune", "--out", str(tmp_path), "--keep-checkpoints", "3"]) == 0
    assert seen["keep_checkpoints"] == 3 and seen["settings"]["keep_checkpoints"] == 3


def _parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command, cls", [("align", AlignmentConfig), ("finetune", FinetuningConfig)])
def test_cli_defaults_are_the_yaml_defaults(command, cls):
    args = _parse([command, "--out", "x"])
    assert config_from_args(cls, args) == cls()


def test_evaluate_cli_defaults_are_the_yaml_defaults(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # --model is checked when parsed: a model folder
    args = _parse(["evaluate", "--model", str(tmp_path), "--out", "x"])
    assert config_from_args(EvaluationConfig, args) == EvaluationConfig()
    args = _parse(["evaluate", "--model", str(tmp_path), "--out", "x", "--hs-sets", "none", "--no-number-fallback"])
    e = config_from_args(EvaluationConfig, args)
    assert e.hs_sets == [] and e.number_fallback is False
    assert EvaluationConfig().hs_sets == ["beavertails", "harmbench", "strongreject"]
    args = _parse(["evaluate", "--model", "smollm2-135m-instruct", "--out", "x", "--benign-limit", "0", "--correction-source", "refusals"])
    e = config_from_args(EvaluationConfig, args)
    assert e.benign_limit == 0 and e.correction_source == "refusals"


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "smollm2-135m-instruct", "--out", "x", "--benign-limit", "-1"], "--benign-limit must be >= 0, got -1"),
    (["finetune", "--out", "x", "--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0, got -1"),
    (["analyze", "--run", "x", "--hs-sets", "nope"], "--hs-sets: unknown 'nope'; valid: "),
    (["analyze", "--run", "x", "--hs-limit", "0"], "--hs-limit must be >= 1, got 0"),
])
def test_new_evaluation_flags_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sinkguard: error: ") and message in err and "\n" not in err


def test_correction_source_choices_come_from_the_judge_sources(capsys):
    with pytest.raises(SystemExit):  # argparse choices, as --template and --match
        _parse(["evaluate", "--model", "smollm2-135m-instruct", "--out", "x", "--correction-source", "x"])
    assert "invalid choice: 'x' (choose from 'beavertails', 'refusals', 'gsm8k', 'sst2', 'agnews', " \
           "'harmful_qa', 'alpaca')" in capsys.readouterr().err


def test_cli_flags_map_to_the_same_fields():
    args = _parse(["finetune", "--out", "x", "--defense", "surgery", "--task", "agnews", "--poison-ratio", "0.3",
                   "--lr", "1e-4", "--lora", "--lora-r", "4", "--set", "alpha=30", "--set", "surgery.sink_impl=eager"])
    cfg = config_from_args(FinetuningConfig, args)
    assert cfg.defenses == ["surgery"] and cfg.tasks == ["agnews"] and cfg.poison_ratios == [0.3]
    assert cfg.lr == 1e-4 and cfg.lora.r == 4 and cfg.lora.alpha == 4.0
    assert cfg.options == {"surgery": {"alpha": 30.0, "sink_impl": "eager"}}
    legacy = config_from_args(FinetuningConfig, _parse(["finetune", "--out", "x", "--defense", "surgery"]),
                              {"alpha": 12.0})
    assert legacy.options == {"surgery": {"alpha": 12.0}}
    aligned = config_from_args(AlignmentConfig, _parse(["align", "--out", "x", "--no-lora"]))
    assert aligned.lora is None
    booster = config_from_args(AlignmentConfig, _parse(["align", "--out", "x", "--defense", "booster",
                                                        "--set", "lamb=3", "--set", "booster.alpha=0.2"]))
    assert booster.defense_options("booster") == {"lamb": 3.0, "alpha": 0.2}
    args = make_config("booster", "alignment", "x", **booster.defense_options("booster"))
    assert (args.lamb, args.alpha, args.harmful_batch_size) == (3.0, 0.2, 10)


@pytest.mark.parametrize("argv, message", [
    (["--defense", "surgery", "--set", "alpha"], "expected key=value"),
    (["--defense", "surgery", "--set", "beta=1"], r"surgery \(finetuning\) has no option 'beta'; valid: lora_target_modules, alpha, "),
    (["--defense", "surgery", "--set", "alpha=lots"], "surgery option alpha must be a number, got 'lots'"),
    (["--defense", "surgery", "--set", "sft.alpha=1"], "defense 'sft' is not the chosen one"),
    (["--defense", "sft", "--alpha", "3"], "sft .finetuning. has no option 'alpha'"),
    (["--samples", "0"], "--samples must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--defense", "tvaccine"], "finetune.* unknown 'tvaccine'|--defense: unknown 'tvaccine'"),
])
def test_bad_cli_values_are_errors(argv, message):
    args = _parse(["finetune", "--out", "x", *argv])
    with pytest.raises(SinkguardError, match=message):
        config_from_args(FinetuningConfig, args, {"alpha": getattr(args, "alpha", None)})


def test_parse_set_coerces_to_the_field_types():
    opts = parse_set(["rho=2", "lisa_activated_layers=3", "train_unselected_mlp=false",
                      "harmful_system_prompt=none"], ["tvaccine"], "alignment")
    assert opts == {"tvaccine": {"rho": 2.0, "lisa_activated_layers": 3, "train_unselected_mlp": False,
                                 "harmful_system_prompt": None}}
    with pytest.raises(SinkguardError, match="name the defense"):
        parse_set(["rho=2"], ["vaccine", "tvaccine"], "alignment")


@dataclasses.dataclass
class _OfficialConfig(SFTConfig):
    """A defense whose official schedule differs from sinkguard's SFT defaults."""

    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.1
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    strength: float = 5.0


def test_make_config_keeps_the_defense_defaults(tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, ("official", "finetuning"),
                        Defense("official", "finetuning", _OfficialConfig, SinkguardTrainer))
    stage = FinetuningConfig(lr=1e-4, batch_size=3)
    args = make_config("official", "finetuning", tmp_path, **stage_arguments(stage, 7))
    assert (args.lr_scheduler_type, args.weight_decay, args.strength) == ("cosine", 0.1, 5.0)
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert (args.learning_rate, args.per_device_train_batch_size, args.seed) == (1e-4, 3, 7)
    sft = make_config("sft", "finetuning", tmp_path, **stage_arguments(stage, 7))
    assert (sft.lr_scheduler_type, sft.warmup_steps) == ("constant", 0) and sft.lora_target_modules == LORA_TARGETS
    tv = make_config("tvaccine", "alignment", tmp_path, **stage_arguments(AlignmentConfig(), 1))
    assert (tv.rho, tv.lisa_activated_layers, tv.probability_steps) == (3.0, 8, 200)


def test_dry_run_lists_every_stage_and_loads_nothing(tmp_path, capsys, monkeypatch):
    import sinkguard.models as models

    def boom(*args, **kwargs):
        raise AssertionError("dry run loaded a model")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(models, "resolve", boom)
    monkeypatch.setitem(_REGISTRY, ("noop", "post_finetuning"),
                        Defense("noop", "post_finetuning", _NoopConfig, apply=lambda *a, **k: None))
    config = {"name": "plan", "model": "nobody/offline-model", "seeds": [1, 2],
              "alignment": {"defenses": ["sft", "vaccine"], "samples": 40, "batch_size": 8},
              "finetuning": {"defenses": ["sft", "surgery"], "poison_ratios": [0.0, 0.1], "samples": 100,
                             "batch_size": 10, "epochs": 2},
              "post_finetuning": {"defenses": ["noop"], "options": {"noop": {"factor": 2}}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    n_ft = 2 * 2 * 2 * 2  # seeds x aligners x defenses x ratios
    assert sum(" alignment " in f" {line.strip()} " and line.strip().startswith("alignment") for line in lines) == 4
    assert sum(line.strip().startswith("finetuning") for line in lines) == n_ft
    assert sum(line.strip().startswith("post_finetuning") for line in lines) == n_ft
    # base once (it does not depend on the seed), aligned per seed and aligner, each fine-tune with and
    # without the repair
    assert sum(line.strip().startswith("evaluation") for line in lines) == 1 + 2 * 2 + 2 * n_ft
    assert "(from nobody/offline-model, 5 steps)" in out and "20 steps)" in out
    assert not (tmp_path / "run").exists()


@dataclasses.dataclass
class _NoopConfig:
    factor: float = 1.0


def test_post_finetuning_options_are_checked_against_the_dataclass(monkeypatch):
    monkeypatch.setitem(_REGISTRY, ("noop", "post_finetuning"),
                        Defense("noop", "post_finetuning", _NoopConfig, apply=lambda *a, **k: None))
    cfg = PostFinetuningConfig(defenses=["noop"])
    assert get_defense("noop", "post_finetuning").config_cls is _NoopConfig
    with pytest.raises(SinkguardError, match=r"noop \(post_finetuning\) has no option 'scale'; valid: factor"):
        ExperimentConfig(post_finetuning={"defenses": ["noop"], "options": {"noop": {"scale": 1}}})
    assert ExperimentConfig(post_finetuning={"defenses": ["noop"], "options": {"noop": {"factor": 3}}}) \
        .post_finetuning.options == {"noop": {"factor": 3.0}}
    assert cfg.defense_options("noop") == {}


def test_run_checks_the_model_first_but_a_dry_run_resolves_none(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nmodel: no-such-org/no-such-model\nfinetuning: {defenses: [sft]}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "model 'no-such-org/no-such-model' is not a bundled alias" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["run", str(config), "--run-dir", str(tmp_path / "r"), "--dry-run"]) == 0
