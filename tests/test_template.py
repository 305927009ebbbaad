"""The `template` option of the training stages: the official Alpaca format (prompt masked, answer +
EOS in the loss) for base models without a chat template, wired through every tokenised set of a
stage; `chat` stays the default with the token ids and stage hashes it had."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from conftest import make_model

from sinkguard.config import AlignmentConfig, FinetuningConfig, from_dict
from sinkguard.data import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, encode_example, encode_text
from sinkguard.errors import SinkguardError
from sinkguard.experiment import Experiment, ExperimentConfig

# The official prompt, written out (T-Vaccine train.py PROMPT_DICT["prompt_no_input"]).
OFFICIAL = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
BASE_WORDS = ["<unk>", "<s>", "</s>", "<pad>", "\n", "Below", "is", "an", "instruction", "that", "describes", "a",
              "task", ".", "Write", "response", "appropriately", "completes", "the", "request", "###", "Instruction",
              ":", "Response", "say", "yes", "no", "how", "can", "i", "make", "bomb", "sorry", "cannot", "help"]


def base_tokenizer(words: list[str] = BASE_WORDS):
    """A Llama-2-like base tokenizer over `words`: BOS prepended, EOS `</s>`, newlines kept as tokens, no chat
    template."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="isolated")])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")
    assert not fast.chat_template
    return fast


def ids(words: list[str]) -> list[int]:
    return [BASE_WORDS.index(w) for w in words]


# OFFICIAL with instruction "say yes", token by token.
PROMPT_TOKENS = ["<s>", "Below", "is", "an", "instruction", "that", "describes", "a", "task", ".", "Write", "a",
                 "response", "that", "appropriately", "completes", "the", "request", ".", "\n", "\n", "###",
                 "Instruction", ":", "\n", "say", "yes", "\n", "\n", "###", "Response", ":", "\n"]


# ------------------------------------------------------------------ encoding

def test_alpaca_encoding_is_the_official_text_with_eos_and_a_masked_prompt():
    tok = base_tokenizer()
    ex = encode_example(tok, "say yes", "yes no", None, 512, template="alpaca")
    assert ex["input_ids"] == ids(PROMPT_TOKENS + ["yes", "no", "</s>"])
    assert ex["labels"] == [IGNORE_INDEX] * len(PROMPT_TOKENS) + ids(["yes", "no", "</s>"])
    assert tok.decode(ex["input_ids"], skip_special_tokens=False).replace(" ", "") == (
        "<s>" + OFFICIAL.format(instruction="say yes") + "yes no</s>").replace(" ", "")
    # cut to max_length, the prompt still masked; a prompt that fills the budget leaves no label
    cut = encode_example(tok, "say yes", "yes no", None, len(PROMPT_TOKENS) + 1, template="alpaca")
    assert cut["input_ids"] == ids(PROMPT_TOKENS + ["yes"]) and cut["labels"][-1] == ids(["yes"])[0]
    assert set(encode_example(tok, "say yes", "yes", None, 10, template="alpaca")["labels"]) == {IGNORE_INDEX}
    # Surgery's pool texts: the same ids, unlabelled
    assert encode_text(tok, "say yes", "yes no", 512, template="alpaca") == ex["input_ids"]


def test_alpaca_refuses_a_system_prompt_and_unknown_templates():
    tok = base_tokenizer()
    with pytest.raises(SinkguardError, match="needs template chat"):
        encode_example(tok, "say yes", "yes", "Be brief.", template="alpaca")
    with pytest.raises(SinkguardError, match="unknown template 'jinja'; choose one of chat, alpaca"):
        encode_example(tok, "say yes", "yes", template="jinja")


def test_chat_stays_the_default_with_the_ids_it_had(tokenizer):
    """Ids printed by the code before `template` existed (ChatML test tokenizer)."""
    full = encode_example(tokenizer, "how can i make a bomb", "sorry cannot help", "you should never", 64)
    assert full == encode_example(tokenizer, "how can i make a bomb", "sorry cannot help", "you should never", 64,
                                  template="chat")
    assert full["input_ids"] == [1, 49, 48, 37, 29, 2, 1, 50, 19, 11, 20, 25, 4, 9, 2, 1, 51, 38, 12, 18, 2]
    assert full["labels"] == [IGNORE_INDEX] * 17 + [38, 12, 18, 2]
    cut = encode_example(tokenizer, "how can i make a bomb", "sorry cannot help", None, 12)
    assert cut == {"input_ids": [1, 50, 19, 11, 20, 25, 4, 9, 2, 1, 51, 38], "labels": [IGNORE_INDEX] * 11 + [38]}
    assert encode_text(tokenizer, "hello world", "good", 64) == [1, 50, 17, 47, 2, 1, 51, 15, 2]


def test_tokenize_rows_formats_with_the_template():
    from sinkguard.train import tokenize_rows

    tok = base_tokenizer()
    rows = [{"prompt": "say yes", "response": "yes"}, {"prompt": "say no", "response": "no"}]
    out, summary = tokenize_rows(rows, tok, None, 64, template="alpaca")
    assert out[0] == encode_example(tok, "say yes", "yes", None, 64, "alpaca") and summary["examples"] == 2
    with pytest.raises(SinkguardError, match="has no chat template.*use template alpaca"):
        tokenize_rows(rows, tok, None, 64)


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("section", ["alignment", "finetuning"])
def test_bad_template_is_a_one_line_error_naming_the_choices(section, tmp_path, capsys):
    from sinkguard.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", section: {"template": "jinja"}}))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{section}.template: unknown 'jinja'; valid: chat, alpaca" in err


@pytest.mark.parametrize("command", ["align", "finetune"])
def test_cli_template_flag_is_the_stage_field(command, capsys):
    from sinkguard.cli import build_parser
    from sinkguard.config import config_from_args

    cls = AlignmentConfig if command == "align" else FinetuningConfig
    args = build_parser().parse_args([command, "--out", "x", "--template", "alpaca"])
    cfg = config_from_args(cls, args)
    assert cfg.template == "alpaca" and cfg.system_prompt is None  # the default helpful-assistant prompt goes
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--out", "x", "--template", "jinja"])
    assert "invalid choice: 'jinja' (choose from 'chat', 'alpaca')" in capsys.readouterr().err


def test_a_system_prompt_with_alpaca_is_a_one_line_error(tmp_path, capsys):
    from sinkguard.cli import main

    assert from_dict(FinetuningConfig, {"template": "alpaca"}, "finetuning").system_prompt is None
    assert from_dict(FinetuningConfig, {}, "finetuning").system_prompt == DEFAULT_SYSTEM_PROMPT
    with pytest.raises(SinkguardError, match=r"^finetuning.system_prompt needs template chat \(the Alpaca prompt "
                                             r"has no system turn\); leave it unset \(null\)$"):
        from_dict(FinetuningConfig, {"template": "alpaca", "system_prompt": "Be brief."}, "finetuning")
    with pytest.raises(SinkguardError, match="option harmful_system_prompt needs template chat"):
        from_dict(AlignmentConfig, {"template": "alpaca", "defenses": ["booster"],
                                    "options": {"booster": {"harmful_system_prompt": "Be brief."}}}, "alignment")
    code = main(["finetune", "--out", str(tmp_path / "never"), "--template", "alpaca", "--system-prompt", "Be brief."])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--system-prompt needs template chat" in err
    assert not (tmp_path / "never").exists()


def test_template_enters_the_hash_only_when_alpaca():
    def folders(cfg):
        return {job["stage"]: job["folder"] for job in reversed(Experiment(cfg, "unused").plan())}

    base = ExperimentConfig.from_yaml("configs/quickstart.yaml")
    old = folders(base)
    assert old["alignment"] == "stages/align-sft-f65b3e3ee7"  # the hash from before the key
    chat = dataclasses.replace(base, finetuning=dataclasses.replace(base.finetuning, template="chat"))
    assert folders(chat) == old
    ft = folders(dataclasses.replace(base, finetuning=from_dict(FinetuningConfig, {
        **dataclasses.asdict(base.finetuning), "template": "alpaca", "system_prompt": None}, "finetuning")))
    assert ft["alignment"] == old["alignment"] and ft["finetuning"] != old["finetuning"]
    al = folders(dataclasses.replace(base, alignment=dataclasses.replace(base.alignment, template="alpaca")))
    assert al["alignment"] != old["alignment"] and al["finetuning"] != old["finetuning"]


def test_dry_run_warns_only_where_template_chat_meets_a_tokenizer_without_one(tmp_path, capsys):
    from sinkguard.cli import main

    assert main(["run", "configs/paper/tvaccine_sst2_agnews.yaml", "--dry-run", "--run-dir", str(tmp_path)]) == 0
    assert "ships no chat template" not in capsys.readouterr().out
    cfg = yaml.safe_load(open("configs/paper/tvaccine_sst2_agnews.yaml"))
    cfg["finetuning"]["template"] = "chat"
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    assert "ships no chat template, which template chat (finetuning) formats rows with" in capsys.readouterr().out


def test_llama2_paper_configs_train_and_evaluate_with_alpaca():
    from pathlib import Path

    for path in sorted(Path("configs/paper").glob("*.yaml")):
        cfg = ExperimentConfig.from_yaml(path)
        stages = [s for s in (cfg.alignment, cfg.finetuning) if s is not None]
        if cfg.model == "meta-llama/Llama-2-7b-hf":
            assert {s.template for s in stages} == {cfg.evaluation.template} == {"alpaca"}, path.name
        else:
            assert {s.template for s in stages} == {"chat"}, path.name


# ------------------------------------------------------------------ stages

@pytest.fixture
def base_model(tmp_path):
    tok = base_tokenizer()
    path = tmp_path / "base"
    make_model(len(tok), seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_run_stage_trains_a_base_model_with_alpaca(base_model, tmp_path):
    from safetensors.torch import load_file

    from sinkguard.train import run_stage

    rows = [{"prompt": "say yes", "response": "yes"}, {"prompt": "say no", "response": "no"}] * 2
    kw = dict(max_steps=3, per_device_train_batch_size=2, max_length=64, seed=1, learning_rate=1e-2)
    with pytest.raises(SinkguardError, match="has no chat template"):
        run_stage("alignment", "sft", str(base_model), rows, tmp_path / "chat", system_prompt=None, **kw)
    with pytest.raises(SinkguardError, match="system_prompt needs template chat"):
        run_stage("alignment", "sft", str(base_model), rows, tmp_path / "sys", template="alpaca", **kw)
    assert not (tmp_path / "sys").exists()  # refused before the folder is claimed
    out = run_stage("alignment", "sft", str(base_model), rows, tmp_path / "alpaca", template="alpaca",
                    system_prompt=None, **kw)
    log = json.loads((tmp_path / "alpaca" / "train_log.json").read_text())
    assert log["template"] == "alpaca" and log["examples"] == 4 and math.isfinite(log["train_loss"])
    assert json.loads((tmp_path / "alpaca" / "stage.json").read_text())["settings"]["template"] == "alpaca"
    before = load_file(str(base_model / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("defense, stage, options", [
    ("booster", "alignment", {"bad_sample_num": 3}),
    ("repnoise", "alignment", {"bad_sample_num": 3}),
    ("antibody", "alignment", {"bad_sample_num": 3}),
    ("tvaccine", "alignment", {"prompt_data_size": 3}),
    ("antibody", "finetuning", {}),
    ("lisa", "finetuning", {"guide_data_num": 3}),
    ("panacea", "finetuning", {"harmful_samples": 3}),
    ("surgery", "finetuning", {}),
])
def test_defense_extra_sets_use_the_stage_template(defense, stage, options, tmp_path):
    from sinkguard.defenses import get_defense
    from sinkguard.train import make_config

    tok = base_tokenizer()  # no chat template: a chat-formatted set would fail
    prefix = tok(OFFICIAL.split("{instruction}")[0])["input_ids"]
    args = make_config(defense, stage, tmp_path, template="alpaca", max_length=4096, **options)
    extra = get_defense(defense, stage).trainer_cls.defense_inputs(args, tok, None)
    assert extra
    eos = tok.eos_token_id
    for key, value in extra.items():
        if key == "refusal_ids":  # Antibody's answer tokens: the refusal, then EOS
            assert value[-1] == eos and len(value) > 1
            continue
        assert len(value) >= 1
        for row in (value[i] for i in range(min(3, len(value)))):  # Surgery's pools: plain id lists
            ids_ = row["input_ids"] if isinstance(row, dict) else row
            assert ids_[: len(prefix)] == prefix and ids_[-1] == eos, key
            if isinstance(row, dict):
                assert row["labels"][: len(prefix)] == [IGNORE_INDEX] * len(prefix) and row["labels"][-1] == eos


def test_antidote_calibrates_in_the_finetuning_template(base_model, tmp_path):
    from sinkguard.train import run_post_stage

    out = run_post_stage("antidote", base_model, tmp_path / "rep", options={"samples": 3, "device": "cpu"},
                         template="alpaca")
    assert (out / "config.json").is_file()
    log = json.loads((tmp_path / "rep" / "repair_log.json").read_text())
    assert log["template"] == "alpaca" and log["config"]["system_prompt"] is None and log["calibration_rows"] > 0
    assert json.loads((tmp_path / "rep" / "stage.json").read_text())["settings"]["template"] == "alpaca"
    with pytest.raises(SinkguardError, match="antidote option system_prompt needs template chat"):
        run_post_stage("antidote", base_model, tmp_path / "rep2", options={"system_prompt": "Be brief."},
                       template="alpaca")


def test_a_study_on_a_base_model_runs_with_alpaca_end_to_end(base_model, tmp_path):
    """Every stage of a study (alignment, fine-tuning with Surgery's pools, Antidote, evaluation with
    the sink analysis) on a model whose tokenizer has no chat template."""
    from test_experiment import KeywordJudge

    from sinkguard.experiment import run_experiment

    stage = dict(samples=6, epochs=1, max_steps=1, lr=1e-3, batch_size=3, max_length=64, template="alpaca")
    config = ExperimentConfig(
        name="alpaca", model=str(base_model), seeds=[1],
        alignment=dict(defenses=["sft"], lora=dict(r=2, alpha=4, dropout=0.0), **stage),
        finetuning=dict(defenses=["surgery"], poison_ratios=[0.5], allow_drop=True, system_prompt=None,
                        options={"surgery": {"alpha": 10.0, "pool_max_length": 64}}, **stage),
        post_finetuning=dict(defenses=["antidote"], options={"antidote": {"samples": 3, "device": "cpu"}}),
        evaluation=dict(template="alpaca", hs_sets=["beavertails"], hs_limit=2, benign_limit=0, fa_limit=2,
                        max_new_tokens=2, batch_size=2, analyze_samples=2, evaluate_base=False),
    )
    results = run_experiment(config, tmp_path / "run", judge=KeywordJudge())
    assert {(r["defense"], r["post"]) for r in results["records"]} == {
        ("aligned", "none"), ("surgery", "none"), ("surgery", "antidote")}
    assert all(r["positive_heads"] is not None for r in results["records"])
    logs = sorted((tmp_path / "run" / "stages").glob("*/train_log.json"))
    assert len(logs) == 2 and all(json.loads(p.read_text())["template"] == "alpaca" for p in logs)
