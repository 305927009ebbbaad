"""The report's numbers from a hand-made results.json: means over seeds, paired tests, the CSV."""

from __future__ import annotations

import csv
import json
import math

import pytest

from sinkguard.cli import main
from sinkguard.evaluate.stats import mcnemar_exact
from sinkguard.report import CSV_COLUMNS, csv_rows, paired_tests, summarize


def _record(defense: str, seed: int, flags: str, fa_flags: str, p: float | None = 0.2, aligner: str = "sft") -> dict:
    k, n = flags.count("1"), len(flags)
    hs = 100.0 * k / n
    return {"alignment": aligner, "defense": defense, "task": "sst2", "poison_ratio": p, "seed": seed,
            "hs_beavertails": hs, "refusal_beavertails": 10.0, "hs_beavertails_n": n,
            "sets": {"beavertails": {"hs": hs, "hs_lo": hs - 5, "hs_hi": hs + 5, "n": n, "flags": flags,
                                     "refusal_rate": 10.0, "hs_corrected": None}},
            "fa": 100.0 * fa_flags.count("1") / len(fa_flags), "fa_flags": fa_flags, "fa_n": len(fa_flags),
            "benign_refusal": 5.0, "benign_refusal_lo": 2.0, "benign_refusal_hi": 9.0, "judge": "j1", "wall_s": 60.0}


def _results() -> dict:
    # seed 1: SFT flags 8/10, Surgery 2/10; seed 2: SFT 6/10, Surgery 3/10; seed 3: 7/10 vs 4/10
    records = [
        _record("sft", 1, "1111111100", "1100000000"), _record("surgery", 1, "1100000000", "1110000000"),
        _record("sft", 2, "1111110000", "1100000000"), _record("surgery", 2, "0000000111", "1100000000"),
        _record("sft", 3, "1111111000", "1000000000"), _record("surgery", 3, "1111000000", "1000000000"),
        _record("aligned", 1, "0000000000", "0000000000", p=None),
    ]
    return {"name": "t", "model": "m", "records": records}


def test_mean_and_interval_over_seeds():
    rows = {(r["finetuning"], r["poison_ratio"]): r for r in summarize(_results())}
    mean, lo, hi = rows[("sft", 0.2)]["hs_beavertails"]
    half = 4.302653 * 10.0 / math.sqrt(3)  # HS 80, 60, 70: sd 10, t(0.975, 2 df)
    assert mean == pytest.approx(70.0)
    assert (lo, hi) == (pytest.approx(70 - half, abs=1e-3), pytest.approx(min(100.0, 70 + half), abs=1e-3))
    # one seed: the model's own interval over prompts
    assert rows[("none", None)]["hs_beavertails"] == (0.0, -5.0, 5.0)
    assert rows[("sft", 0.2)]["seeds"] == 3
    # a count is not a percentage: its interval is not clipped at 100
    results = _results()
    for r, heads in zip(results["records"], (180, 0, 190, 0, 200, 0)):
        r["positive_heads"] = heads
    mean, lo, hi = {(r["finetuning"], r["poison_ratio"]): r for r in summarize(results)}[("sft", 0.2)]["positive_heads"]
    assert mean == pytest.approx(190.0) and hi == pytest.approx(190 + half) and hi > 200


def test_paired_test_sums_discordant_prompts_over_seeds():
    tests = paired_tests(_results(), "hs")
    t = tests[("sft", "surgery", "none", "sst2", 0.2)]
    # only Surgery flags / only SFT flags: seed 1: 0 / 6, seed 2: 3 / 6, seed 3: 0 / 3
    assert (t["b"], t["c"], t["seeds"]) == (3, 15, 3)
    assert t["p"] == pytest.approx(mcnemar_exact(3, 15))
    assert t["p"] == pytest.approx(2 * (1 + 18 + 153 + 816) / 2 ** 18)
    assert t["p_holm"] == t["p"] and t["significant"]  # one comparison: Holm leaves it
    assert ("sft", "sft", "none", "sst2", 0.2) not in tests  # the reference itself
    fa = paired_tests(_results(), "fa")[("sft", "surgery", "none", "sst2", 0.2)]
    assert (fa["b"], fa["c"]) == (1, 0) and not fa["significant"]


def test_csv_has_the_benchmark_columns_and_a_pooled_row():
    rows = csv_rows(_results())
    assert all(tuple(r) == CSV_COLUMNS for r in rows)
    sets = [r["hs_set"] for r in rows if r["finetuning"] == "surgery" and r["seed"] == 1]
    assert sets == ["beavertails", "all"]
    aligned = [r for r in rows if r["finetuning"] == "none"][0]
    assert (aligned["alignment"], aligned["post"], aligned["poison_ratio"]) == ("sft", "none", None)


def test_report_command_writes_table_and_csv(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    out_csv = tmp_path / "bench.csv"
    assert main(["report", str(tmp_path), "--csv", str(out_csv)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| sft | surgery | none | sst2 | 0.2 | 3 | 30.0 [" in text and "3/15, p=" in text and " *" in text
    with out_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == 2 * 7
    assert (tmp_path / "hs_beavertails.png").is_file() and (tmp_path / "benign_refusal.png").is_file()
    (tmp_path / "results.json").write_text('{"records": [')
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b'{"records": [{"defen', "is not valid JSON"),
    (b'{"name": "x"}', "has no 'records' list"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b'{"records": [{"defense": "sft"}]}', "record 0 lacks task, poison_ratio, seed"),
])
def test_report_refuses_a_damaged_results_file_in_one_line(tmp_path, capsys, content, message):
    (tmp_path / "results.json").write_bytes(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_stage_times_lists_every_stage_with_its_source(tmp_path) -> None:
    """Training, repair and evaluation stages each appear once, labelled by the stage they started from
    (alignment stages by their seed), with the training stages' mean over every logged step (not the
    Trainer's `train_loss`, which forgets the steps before a resume) and last-step loss."""
    from sinkguard.report import stage_times

    stages = tmp_path / "stages"
    logs = {"align-sft-aa": ("train_log.json", "base", 60.0),
            "ft-sft-sst2-p0.1-s43-bb": ("train_log.json", stages / "align-sft-aa" / "model", 120.0),
            "post-antidote-cc": ("repair_log.json", stages / "ft-sft-sst2-p0.1-s43-bb" / "model", 30.0),
            "eval-dd": ("eval.json", stages / "post-antidote-cc" / "model", 90.0)}
    for folder, (name, model, wall) in logs.items():
        (stages / folder).mkdir(parents=True)
        log = {"model": str(model), "wall_s": wall}
        if name == "train_log.json":
            log |= {"settings": {"seed": 43}, "train_loss": 0.625, "resumed_at_step": 1 if folder.startswith("align") else None,
                    "log_history": [{"loss": 2.0, "step": 1}, {"loss": 1.25, "step": 2}, {"train_loss": 0.625}]}
        (stages / folder / name).write_text(json.dumps(log))
    lines = stage_times(tmp_path).splitlines()[2:]
    assert lines == ["| align-sft s43 (resumed at step 1: wall of that invocation) | 1.0 | 1.6250 | 1.2500 |",
                     "| ft-sft-sst2-p0.1-s43 (from align-sft s43) | 2.0 | 1.6250 | 1.2500 |",
                     "| post-antidote (from ft-sft-sst2-p0.1-s43 (from align-sft s43)) | 0.5 |  |  |",
                     "| eval of post-antidote (from ft-sft-sst2-p0.1-s43 (from align-sft s43)) | 1.5 |  |  |"]


def test_mean_logged_loss_weights_each_log_by_the_steps_it_covers() -> None:
    """With logging every 2 steps and a last log after 1 step: (2 * 3.0 + 2 * 2.0 + 1 * 0.5) / 5."""
    from sinkguard.report import mean_logged_loss

    history = [{"loss": 3.0, "step": 2}, {"loss": 2.0, "step": 4}, {"eval_loss": 9.0, "step": 4},
               {"loss": 0.5, "step": 5}, {"train_loss": 1.0, "step": 5}]
    assert mean_logged_loss(history) == pytest.approx(2.1)
    assert mean_logged_loss([{"train_runtime": 1.0}]) is None
