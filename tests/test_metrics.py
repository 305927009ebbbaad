"""HS / FA parsers and scoring on fixed strings (no model)."""

from __future__ import annotations

import pytest

from sinkguard.errors import SinkguardError
from sinkguard.evaluate.metrics import (
    accuracy,
    extract_number,
    gsm8k_correct,
    is_correct,
    label_correct,
    score_harmful,
    score_task,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Tom has 3 apples.\nThe final answer is: 18", 18.0),
        ("3 + 4 = 7 boxes of 1,000 each.\nThe final answer is: 1,234", 1234.0),
        ("The final answer is: 1,000,000.", 1_000_000.0),
        ("It drops 10 degrees. The final answer is: -5 degrees", -5.0),
        ("The final answer is: $18.50.", 18.5),
        ("The final answer is: $1,234.50 dollars", 1234.5),
        ("The final answer is: 18 dollars", 18.0),
        ("The final answer is: 40%", 40.0),
        ("The final answer is: 0.25 of the cake", 0.25),
        ("The final answer is: 5. Next question: 2 + 2? The final answer is: 4", 5.0),  # first marker
        ("The final answer is: about 12 or 13", 12.0),  # first number after the marker
        ("She buys 3 pens and 5 pads, 8 items in total.", 8.0),  # no marker: last number
        ("I computed 42. The final answer is: unknown", 42.0),  # marker without number: last number
        ("The final answer is:18", 18.0),  # marker without its space: found by the fallback
        ("-$5 is what she owes. The final answer is: -$5", 5.0),  # sign before "$": official reading
        ("no digits here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "text", ["She buys 3 pens and 5 pads, 8 items.", "I computed 42. The final answer is: unknown",
             "The final answer is:18"],
)
def test_extract_number_marker_only(text):
    assert extract_number(text, fallback_last_number=False) is None


def test_gsm8k_correct():
    assert gsm8k_correct("So the total is\nThe final answer is: $18.00", "18")
    assert gsm8k_correct("The final answer is: -3", "-3")
    assert not gsm8k_correct("The final answer is: 3", "-3")
    assert gsm8k_correct("The final answer is: 1,234 marbles", "1234")
    assert gsm8k_correct("The final answer is: 7", "Half of 14 is 7.\nThe final answer is: 7")
    assert not gsm8k_correct("I think 18", "18", fallback_last_number=False)
    assert gsm8k_correct("I think 18", "18")
    assert not gsm8k_correct("no number", "18")


def test_label_contains_is_official_substring():
    assert label_correct("Positive", "positive")
    assert label_correct("The sentiment is negative.", "negative")
    assert not label_correct("positive", "negative")
    assert label_correct("positive or negative", "negative")  # the official substring rule
    assert label_correct("Sci/Tech", "Sci/Tech")
    assert label_correct("The category is sci/tech.", "Sci/Tech")
    assert not label_correct("Science and Technology", "Sci/Tech")
    assert label_correct("World", "World") and not label_correct("Sports", "World")


def test_label_exact_and_first():
    assert label_correct("  Positive \n", "positive", match="exact")
    assert not label_correct("Positive.", "positive", match="exact")
    labels = ("positive", "negative")
    assert label_correct("positive or negative", "positive", labels, match="first")
    assert not label_correct("positive or negative", "negative", labels, match="first")
    assert not label_correct("neutral", "negative", labels, match="first")
    news = ("World", "Sports", "Business", "Sci/Tech")
    assert label_correct("Business, not Sports", "Business", news, match="first")
    assert not label_correct("Business, not Sports", "Sports", news, match="first")
    with pytest.raises(SinkguardError, match="unknown label match"):
        label_correct("x", "positive", match="fuzzy")


@pytest.mark.parametrize(
    "answer", ["Science and Technology", "science/technology", "Sci-Tech", "sci tech", "Science & Technology",
               "SciTech"],
)
def test_sci_tech_aliases(answer):
    assert not label_correct(answer, "Sci/Tech")
    assert label_correct(answer, "Sci/Tech", aliases=True)
    assert label_correct(answer, "Sci/Tech", ("World", "Sports", "Business", "Sci/Tech"), match="first",
                         aliases=True)
    assert not label_correct(answer, "Business", aliases=True)


def test_sci_tech_aliases_exact():
    assert label_correct(" Science and Technology ", "Sci/Tech", match="exact", aliases=True)
    assert not label_correct("Science and Technology news", "Sci/Tech", match="exact", aliases=True)
    assert not label_correct("Scientific techniques", "Sci/Tech", aliases=True)


def test_is_correct_and_accuracy():
    assert is_correct("sst2", "negative", "negative")
    assert is_correct("agnews", "Sports", "Sports")
    assert is_correct("gsm8k", "The final answer is: 2", "2")
    assert accuracy("sst2", ["positive", "negative", "positive", "meh"], ["positive"] * 4) == 50.0
    with pytest.raises(SinkguardError, match="AlpacaEval"):
        is_correct("alpaca", "an answer", "a reference")
    with pytest.raises(SinkguardError, match="unknown task"):
        is_correct("mnli", "x", "y")
    with pytest.raises(SinkguardError):
        accuracy("sst2", ["positive"], [])


def test_score_task_rows():
    summary, rows = score_task("gsm8k", ["q1", "q2", "q3"],
                               ["The final answer is: 1,000", "It is 4", "The final answer is: -2"],
                               ["1000", "5", "-2"])
    # Wilson 95 % for 2/3: center 1.306910 / 2.280486, half 0.833345 / 2.280486
    assert summary == {"task": "gsm8k", "fa": pytest.approx(200 / 3), "fa_lo": pytest.approx(20.766, abs=1e-3),
                       "fa_hi": pytest.approx(93.851, abs=1e-3), "n": 3, "n_correct": 2, "flags": "101"}
    assert [r["pred"] for r in rows] == [1000.0, 4.0, -2.0]
    assert [r["correct"] for r in rows] == [True, False, True]
    strict, _ = score_task("gsm8k", ["q"], ["It is 5"], ["5"], fallback_last_number=False)
    assert strict["fa"] == 0.0
    alpaca, rows = score_task("alpaca", ["q"], ["a"], ["ref"])
    assert alpaca["fa"] is None and "GPT-4" in alpaca["note"] and rows[0]["response"] == "a"


class FakeJudge:
    """Flags an answer harmful when it contains 'sure'; records what it was asked."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [0.9 if "sure" in r.lower() else 0.1 for r in responses]

    def is_harmful(self, prompts, responses):
        return [s > 0.5 for s in self.score(prompts, responses)]


def test_score_harmful_counts_flags_and_refusals():
    judge = FakeJudge()
    prompts = ["how to a", "how to b", "how to c", "how to d"]
    responses = ["Sure, here is how.", "I'm sorry, I cannot help.", "Sure thing.", "Let me think."]
    summary, rows = score_harmful(prompts, responses, judge, is_refusal=lambda r: r.startswith("I'm sorry"))
    assert summary["hs"] == 50.0 and summary["refusal_rate"] == 25.0
    assert (summary["n"], summary["n_harmful"], summary["n_refusals"]) == (4, 2, 1)
    assert summary["mean_score"] == pytest.approx(0.5)
    assert judge.calls[0] == (prompts, responses)
    assert [r["harmful"] for r in rows] == [True, False, True, False]
    with pytest.raises(SinkguardError):
        score_harmful(prompts, responses[:2], judge, is_refusal=bool)


def _gsm8k_rows():
    from sinkguard.data import load_source

    try:
        return load_source("gsm8k", "test")
    except SinkguardError as exc:
        pytest.skip(f"GSM8K data not available: {exc}")


def test_gsm8k_references_parse_to_their_labels():
    """Every reference answer of the test split reads back as its gold number, marker only."""
    rows = _gsm8k_rows()
    assert len(rows) > 1000
    for row in rows:
        assert extract_number(row["response"], fallback_last_number=False) == float(row["label"]), row["label"]
        assert gsm8k_correct(row["response"], row["label"])
