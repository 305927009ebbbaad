"""A whole study on a tiny model: it runs, an interrupted run resumes to the same results."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_model

from sinkguard import experiment as exp_mod
from sinkguard.errors import SinkguardError
from sinkguard.experiment import ExperimentConfig, run_experiment
from sinkguard.report import write_report


class KeywordJudge:
    """Deterministic stand-in for the trained judge: flags answers that do not refuse."""

    name = "keyword"

    def score(self, prompts, responses, **_):
        return [0.0 if "sorry" in r else 1.0 for r in responses]

    def is_harmful(self, prompts, responses, **_):
        return [s > 0.5 for s in self.score(prompts, responses)]


@pytest.fixture
def tiny_dir(tokenizer, tmp_path):
    model = make_model(len(tokenizer), seed=7)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _config(model: str) -> ExperimentConfig:
    stage = dict(samples=6, epochs=1, max_steps=2, lr=1e-3, batch_size=3, max_length=48)
    return ExperimentConfig(
        name="tiny", model=model, seeds=[1],
        alignment=dict(defenses=["sft"], lora=dict(r=2, alpha=4, dropout=0.0), **stage),
        finetuning=dict(defenses=["sft", "surgery"], poison_ratios=[0.0, 0.5], **stage, allow_drop=True,
                        options={"surgery": {"alpha": 10.0, "pool_max_length": 32}}),
        evaluation=dict(hs_limit=3, fa_limit=3, max_new_tokens=3, batch_size=4, analyze_samples=2),
    )


def test_interrupted_experiment_resumes_to_the_same_results(tiny_dir, tmp_path, monkeypatch):
    full = run_experiment(_config(tiny_dir), tmp_path / "a", judge=KeywordJudge())
    assert len(full["records"]) == 2 + 4  # base + aligned, then 2 defenses x 2 ratios
    assert {r["defense"] for r in full["records"]} == {"base", "aligned", "sft", "surgery"}
    assert all(r["fa_n"] == 3 for r in full["records"])
    # HS is the keyword judge's share of non-refusals among each model's saved answers, in percent
    answers = [[json.loads(line)["response"] for line in path.read_text().splitlines()]
               for path in sorted((tmp_path / "a" / "stages").glob("eval-*/hs_beavertails.jsonl"))]
    assert len(answers) == len(full["records"]) and all(len(a) == 3 for a in answers)
    expected = [100 * sum("sorry" not in r for r in a) / len(a) for a in answers]
    assert sorted(r["hs_beavertails"] for r in full["records"]) == pytest.approx(sorted(expected))

    calls = {"n": 0}
    original = exp_mod.Experiment.finetune

    def crash_on_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(exp_mod.Experiment, "finetune", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(tiny_dir), tmp_path / "b", judge=KeywordJudge())
    partial = json.loads((tmp_path / "b" / "results.json").read_text())  # the cells answered before the stop
    assert partial["complete"] is False and len(partial["records"]) == 4  # base, aligned, the two models before
    assert "**Not finished**" in write_report(tmp_path / "b").read_text()
    monkeypatch.setattr(exp_mod.Experiment, "finetune", original)
    resumed = run_experiment(_config(tiny_dir), tmp_path / "b", judge=KeywordJudge())

    def strip(res):  # wall times differ from run to run
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in res["records"]]

    assert strip(resumed) == strip(full)
    report = write_report(tmp_path / "b")
    text = report.read_text()
    assert "| sft | surgery | none | sst2 | 0.5 | 1 |" in text and (tmp_path / "b" / "fa.png").is_file()
    for stage in ("align-sft s1", "ft-surgery-sst2-p0.5-s1 (from align-sft s1)",
                  "eval of ft-sft-sst2-p0.0-s1 (from align-sft s1)", "eval of align-sft s1"):
        assert f"| {stage} | " in text
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["records"] == resumed["records"] and saved["complete"] is True

    # Run cell by cell: the base model's evaluation, then each model right after its training
    experiment = exp_mod.Experiment(_config(tiny_dir), tmp_path / "empty", judge=KeywordJudge())
    jobs = experiment.schedule(experiment.plan())
    assert [j["stage"] for j in jobs] == ["evaluation", "alignment", "evaluation"] + ["finetuning", "evaluation"] * 4
    assert all(b["from"] == a["folder"] for a, b in zip(jobs[1:], jobs[2:]) if b["stage"] == "evaluation")

    # Results kept without weights or answers (as a study is committed): nothing is trained again
    stages = tmp_path / "b" / "stages"
    for path in stages.glob("*/model"):
        shutil.rmtree(path)
    for path in stages.glob("eval-*/*.jsonl"):
        path.unlink()
    trained = []

    def recording(method):
        def run(self, job, *args):
            trained.append(job["folder"])
            return method(self, job, *args)
        return run

    monkeypatch.setattr(exp_mod.Experiment, "align", recording(exp_mod.Experiment.align))
    monkeypatch.setattr(exp_mod.Experiment, "finetune", recording(original))
    assert strip(run_experiment(_config(tiny_dir), tmp_path / "b", judge=KeywordJudge())) == strip(full)
    assert trained == []
    # One model's results lost: only its chain is trained again (a finished stage whose model is gone
    # runs again, although its upstream model is new)
    lost = next(j for j in jobs if j["stage"] == "evaluation" and j["record"]["defense"] == "surgery")
    (tmp_path / "b" / lost["folder"] / "eval.json").unlink()
    again = run_experiment(_config(tiny_dir), tmp_path / "b", judge=KeywordJudge())
    assert trained == [jobs[1]["folder"], lost["from"]]
    assert strip(again) == strip(full)


def test_a_study_runs_a_seed_at_a_time(tiny_dir, tmp_path, capsys):
    from sinkguard.cli import main

    config = _config(tiny_dir)
    config.seeds = [1, 2]
    experiment = exp_mod.Experiment(config, tmp_path / "run", judge=KeywordJudge())
    whole = experiment.plan()
    assert {j["seed"] for j in experiment.plan([2])} == {2}
    assert experiment.plan([2]) == [j for j in whole if j["seed"] == 2] and len(whole) == 2 * len(experiment.plan([2])) + 1
    with pytest.raises(SinkguardError, match=r"seeds \[3\] are not in the config's seeds \[1, 2\]"):
        experiment.plan([3])
    # the base model does not depend on the seed: evaluated once
    assert [j["seed"] for j in whole if j["stage"] == "evaluation" and j["record"]["defense"] == "base"] == [1]
    # a post-fine-tuning defense limited to some fine-tuning defenses' models
    config.post_finetuning = exp_mod.PostFinetuningConfig(defenses=["antidote"], after=["sft"])
    repaired = [j for j in exp_mod.Experiment(config, tmp_path / "run").plan() if j["stage"] == "post_finetuning"]
    assert len(repaired) == 2 * 2 and all("/ft-sft-" in "/" + j["from"].split("stages/")[-1] for j in repaired)
    with pytest.raises(SinkguardError, match="after"):
        ExperimentConfig(post_finetuning={"defenses": ["antidote"], "after": ["sfft"]})
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"name: c\nmodel: {tiny_dir}\nseeds: [1, 2]\n")
    assert main(["run", str(yaml_file), "--dry-run", "--seeds", "2"]) == 0
    assert "seed=1" not in capsys.readouterr().out
    assert main(["run", str(yaml_file), "--dry-run", "--seeds", "two"]) == 2
    assert "--seeds takes seeds separated by commas" in capsys.readouterr().err


def test_a_run_of_some_seeds_keeps_the_other_seeds_results(tiny_dir, tmp_path):
    config = _config(tiny_dir)
    config.seeds = [1, 2]
    config.finetuning.defenses, config.finetuning.poison_ratios = ["sft"], [0.5]
    config.evaluation.analyze_samples = 0
    experiment = exp_mod.Experiment(config, tmp_path / "run", judge=KeywordJudge())
    first = experiment.run([1])
    assert first["complete"] is False and {r["seed"] for r in first["records"]} == {1}
    both = experiment.run([2])  # seed 1's records are kept, in plan order: the study reads whole
    assert both["complete"] is True
    assert [(r["defense"], r["seed"]) for r in both["records"]] == [
        ("base", 1), ("aligned", 1), ("sft", 1), ("aligned", 2), ("sft", 2)]
    assert both["records"][:3] == first["records"]
    # a kept record needs its evaluation folder: one that is gone (or was made with other settings) is dropped
    seed1 = [j for j in experiment.plan([1]) if j["stage"] == "evaluation" and j["record"]["defense"] == "sft"]
    (tmp_path / "run" / seed1[0]["folder"] / "eval.json").unlink()
    again = experiment.run([2])
    assert again["complete"] is False and ("sft", 1) not in [(r["defense"], r["seed"]) for r in again["records"]]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["records"] == again["records"]


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(SinkguardError, match="unknown key"):
        ExperimentConfig(finetuning={"poison": [0.1]})
    with pytest.raises(SinkguardError, match=r"poison_ratios must be in \[0, 1\], got 1.5"):
        ExperimentConfig(finetuning={"poison_ratios": [1.5]})
    bad = tmp_path / "x.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SinkguardError, match="not valid YAML"):
        ExperimentConfig.from_yaml(bad)
    with pytest.raises(SinkguardError, match="not found"):
        ExperimentConfig.from_yaml(tmp_path / "none.yaml")
