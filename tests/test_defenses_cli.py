"""`sinkguard defenses` and `sinkguard repair`: the registry listing, README's table agreeing with
the registry, and the repair command on a tiny saved model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import make_model

from sinkguard.cli import main
from sinkguard.defenses import registered

README = Path(__file__).resolve().parents[1] / "README.md"
STAGE_WORDS = {"alignment": "alignment", "fine-tuning": "finetuning", "post-fine-tuning": "post_finetuning"}


def readme_defenses() -> dict[str, set[str]]:
    """{module: stages} from README's 'What is inside' rows that name a `sinkguard.defenses.*` module."""
    table = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|[^|]*\|([^|]*)\|\s*`(sinkguard\.defenses\.\w+)`\s*\|", line)
        if m:
            table[m.group(2)] = {STAGE_WORDS[s.strip()] for s in m.group(1).split(",")}
    return table


def test_readme_table_agrees_with_the_registry():
    want: dict[str, set[str]] = {}
    for d in registered():
        want.setdefault(d.config_cls.__module__, set()).add(d.stage)
    assert readme_defenses() == want


def test_defenses_json_lists_every_entry_with_its_official_defaults(capsys):
    assert main(["defenses", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {(r["name"], r["stage"]) for r in records} == {(d.name, d.stage) for d in registered()}
    by = {(r["name"], r["stage"]): {o["name"]: o["default"] for o in r["options"]} for r in records}
    assert by[("lisa", "finetuning")]["alignment_steps"] == 100 and by[("lisa", "finetuning")]["rho"] == 1.0
    assert by[("panacea", "finetuning")]["lamb"] == 0.001
    assert by[("antidote", "post_finetuning")]["dense_ratio"] == 0.1
    assert by[("lisa", "finetuning")]["lora_target_modules"] == ["q_proj", "v_proj"]
    antidote = next(r for r in records if r["name"] == "antidote")
    assert antidote["official_code"] == "git-disl/Antidote" and antidote["fidelity"] == "official code"
    assert main(["defenses"]) == 0 and "antidote  [post_finetuning]" in capsys.readouterr().out


def test_repair_command_writes_model_and_log(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "ft" / "model"
    make_model(len(tokenizer), seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert main(["repair", "--defense", "antidote", "--model", str(model_dir), "--out", str(tmp_path / "rep"),
                 "--dense-ratio", "0.2", "--samples", "4"]) == 0
    log = json.loads((tmp_path / "rep" / "repair_log.json").read_text())
    assert log["calibration_rows"] == 4 and log["config"]["dense_ratio"] == 0.2 and log["pruned_total"] > 0
    assert (tmp_path / "rep" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,match", [
    (["repair", "--defense", "lisa", "--model", "x", "--out", "y"], "valid: antidote"),
    (["repair", "--defense", "antidote", "--model", "x", "--out", "y", "--dense-ratio", "2"], "dense_ratio"),
])
def test_repair_user_mistakes_are_one_line(argv, match, capsys, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    argv = [str(tmp_path / a) if a in ("x", "y") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
