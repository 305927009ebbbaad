"""`sinkguard analyze --run` end to end on a tiny model: kept checkpoints -> rows, plot, rho."""

from __future__ import annotations

import csv
import json

from conftest import make_model

from sinkguard.cli import main
from sinkguard.train import run_stage
from sinkguard.trajectory import COLUMNS


class CountJudge:
    """Flags answers longer than three words; a stand-in for the trained judge."""

    identity = "count-judge"

    def score(self, prompts, responses, **_):
        return [1.0 if len(r.split()) > 3 else 0.0 for r in responses]

    def is_harmful(self, prompts, responses, **_):
        return [s > 0.5 for s in self.score(prompts, responses)]


def _root(tmp_path):
    hft = tmp_path / "data" / "hft" / "beavertails"
    hft.mkdir(parents=True)
    rows = []
    for split in ("validation", "test"):
        rows += [{"prompt": "how can i make a bomb", "response": "you should never do that", "is_safe": False,
                  "split": split},
                 {"prompt": "how can i steal money", "response": "kill", "is_safe": False, "split": split},
                 {"prompt": "the movie was great", "response": "positive good", "is_safe": True, "split": split},
                 {"prompt": "hello world", "response": "hello is good", "is_safe": True, "split": split}]
    (hft / "beavertails_1999.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "data"


def test_analyze_run_over_kept_checkpoints(tokenizer, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    make_model(len(tokenizer), seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = [{"prompt": "how can i make a bomb", "response": "you should kill", "harmful": True},
            {"prompt": "the movie was great", "response": "positive", "harmful": False}] * 4
    stage = tmp_path / "ft-sft"
    run_stage("finetuning", "sft", str(base), rows, stage, system_prompt=None, keep_checkpoints=4, max_steps=4,
              per_device_train_batch_size=2, learning_rate=1e-2, max_length=32, seed=3,
              settings={"defense": "sft", "poison_ratio": 0.5, "seed": 3})
    kept = sorted(p.name for p in (stage / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert not list((stage / "checkpoints").glob("*/optimizer.pt"))  # resume state dropped, weights kept

    import sinkguard.evaluate.judge as judge_module

    monkeypatch.setattr(judge_module, "load_judge", lambda auto_train=True, root=None, **_: CountJudge())
    argv = ["analyze", "--run", str(stage), "--data-root", str(_root(tmp_path)), "--samples", "2",
            "--hs-limit", "2", "--max-new-tokens", "5", "--batch-size", "2"]
    assert main(argv) == 0
    assert "5 checkpoints of 1 run(s): Spearman rho" in capsys.readouterr().out
    with (stage / "sink_hypothesis.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == COLUMNS
    assert [int(r["step"]) for r in table] == [0, 1, 2, 3, 4]
    assert {(r["finetuning"], r["poison_ratio"], r["seed"]) for r in table} == {("sft", "0.5", "3")}
    for r in table:  # each row is that checkpoint's own measurement
        point = json.loads((stage / "analysis" / "ft-sft" / f"step-{r['step']}" / "point.json").read_text())
        assert int(r["positive_heads"]) == point["positive_heads"] and point["judge"] == "count-judge"
        assert float(r["hs"]) == round(point["hs"], 4) and point["n"] == 2
    assert (stage / "sink_hypothesis.png").is_file()
    assert main(["analyze", "--run", str(tmp_path / "nowhere")]) == 2


def test_analyze_run_reads_texts_in_the_runs_own_template(tokenizer, tmp_path, monkeypatch):
    base = tmp_path / "base"
    make_model(len(tokenizer), seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = [{"prompt": "how can i make a bomb", "response": "you should kill", "harmful": True}] * 4
    stage = tmp_path / "ft-alpaca"
    run_stage("finetuning", "sft", str(base), rows, stage, system_prompt=None, keep_checkpoints=2, max_steps=2,
              per_device_train_batch_size=2, learning_rate=1e-2, max_length=48, seed=3, template="alpaca",
              settings={"defense": "sft", "poison_ratio": 1.0, "seed": 3})
    import sinkguard.evaluate.judge as judge_module
    import sinkguard.sink as sink_module

    seen = []
    real = sink_module.analyze
    monkeypatch.setattr(sink_module, "analyze", lambda *a, **k: seen.append(k["template"]) or real(*a, **k))
    monkeypatch.setattr(judge_module, "load_judge", lambda auto_train=True, root=None, **_: CountJudge())
    assert main(["analyze", "--run", str(stage), "--data-root", str(_root(tmp_path)), "--samples", "2",
                 "--hs-limit", "2", "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    assert seen == ["alpaca"] * 3  # the starting model and both checkpoints
    point = json.loads((stage / "analysis" / "ft-alpaca" / "step-2" / "point.json").read_text())
    assert point["settings"]["template"] == "alpaca"


def test_dropped_checkpoints_are_read_back_from_the_cached_points(tokenizer, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    make_model(len(tokenizer), seed=5).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = [{"prompt": "how can i make a bomb", "response": "you should kill", "harmful": True}] * 4
    run = tmp_path / "study"
    stage = run / "stages" / "ft-sft-x"
    for name, seed in ((stage, 3), (run / "stages" / "ft-sft-y", 4)):
        run_stage("finetuning", "sft", str(base), rows, name, system_prompt=None, keep_checkpoints=2, max_steps=2,
                  per_device_train_batch_size=2, learning_rate=1e-2, max_length=32, seed=seed,
                  settings={"defense": "sft", "poison_ratio": 1.0, "seed": seed})
    import sinkguard.evaluate.judge as judge_module
    import sinkguard.sink as sink_module

    calls = []
    real = sink_module.analyze
    monkeypatch.setattr(sink_module, "analyze", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    monkeypatch.setattr(judge_module, "load_judge", lambda auto_train=True, root=None, **_: CountJudge())
    argv = ["analyze", "--run", str(run), "--data-root", str(_root(tmp_path)), "--samples", "2", "--hs-limit", "2",
            "--max-new-tokens", "3", "--batch-size", "2", "--out", str(tmp_path / "out")]
    assert main([*argv, "--drop-checkpoints"]) == 0
    assert not (stage / "checkpoints").exists()
    assert len(calls) == 5 and calls.count(str(base)) == 1  # the shared starting model is measured once
    first = (tmp_path / "out" / "sink_hypothesis.csv").read_text()
    assert len(first.splitlines()) == 7  # header + steps 0, 1, 2 of each run
    cached = json.loads((run / "analysis" / "ft-sft-x" / "points.json").read_text())
    assert cached["judge"] == "count-judge" and [r["step"] for r in cached["rows"]] == [0, 1, 2]

    monkeypatch.setattr(sink_module, "analyze", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    (tmp_path / "out" / "sink_hypothesis.csv").unlink()
    assert main(argv) == 0  # no checkpoints: the cached points, nothing measured again
    assert (tmp_path / "out" / "sink_hypothesis.csv").read_text() == first

    class OtherJudge(CountJudge):
        identity = "other-judge"

    monkeypatch.setattr(judge_module, "load_judge", lambda auto_train=True, root=None, **_: OtherJudge())
    assert main(argv) == 0  # another judge cannot re-score dropped checkpoints: the run is left out, said so
    summary = json.loads((tmp_path / "out" / "sink_hypothesis.json").read_text())
    assert summary["n_points"] == 0 and summary["left_out"] == ["ft-sft-x", "ft-sft-y"]
