"""Data: named sources from the data root, the poisoned mixer, formatting, clear errors."""

from __future__ import annotations

import pytest

from sinkguard.cli import main
from sinkguard.data import (
    IGNORE_INDEX,
    PadCollator,
    alignment_dataset,
    attack_rows,
    encode_example,
    harmful_eval_prompts,
    load_source,
    poisoned_dataset,
    reference_pools,
)
from sinkguard.errors import SinkguardError


@pytest.mark.parametrize("n,p", [(100, 0.1), (1000, 0.15), (37, 0.2), (10, 0.0), (20, 1.0), (7, 0.05)])
def test_mixer_gives_exactly_round_pn_harmful_rows(n, p):
    rows = poisoned_dataset("sst2", n, p, seed=1)
    assert len(rows) == n
    assert sum(r["harmful"] for r in rows) == round(p * n)


def test_mixer_is_seeded_and_uses_harmful_rows():
    a = poisoned_dataset("agnews", 50, 0.2, seed=3)
    assert a == poisoned_dataset("agnews", 50, 0.2, seed=3)
    assert a != poisoned_dataset("agnews", 50, 0.2, seed=4)
    unsafe = {r["prompt"] for r in attack_rows("beavertails")}
    assert all(r["prompt"] in unsafe for r in a if r["harmful"])


def test_pools_and_attack_rows_are_disjoint_and_never_from_test():
    harmful, harmless = reference_pools()
    attack = attack_rows("beavertails")
    test_ids = {r["record_id"] for r in load_source("beavertails", "test")}
    pool_ids = {r["record_id"] for r in harmful + harmless}
    assert not pool_ids & {r["record_id"] for r in attack}
    assert not (pool_ids | {r["record_id"] for r in attack}) & test_ids
    assert all(not r["is_safe"] for r in harmful) and all(r["is_safe"] for r in harmless)


def test_harmful_eval_prompts_come_from_the_test_split():
    prompts = harmful_eval_prompts("beavertails")
    test = [r for r in load_source("beavertails", "test") if not r["is_safe"]]
    assert prompts == [r["prompt"] for r in test] and len(prompts) == 111
    assert len(harmful_eval_prompts("advbench", limit=5)) == 5


def test_task_rows_carry_gold_labels():
    assert {r["label"] for r in load_source("sst2", "test")} == {"positive", "negative"}
    assert {r["label"] for r in load_source("agnews", "test")} == {"World", "Sports", "Business", "Sci/Tech"}
    g = load_source("gsm8k", "test")[0]
    assert g["label"] == "18" and "The final answer is: 18" in g["response"]
    assert len(alignment_dataset(10)) == 10


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: poisoned_dataset("sst2", 10, 1.5), "outside"),
        (lambda: poisoned_dataset("mnist", 10, 0.1), "unknown task"),
        (lambda: poisoned_dataset("sst2", 10_000, 0.5), "harmful rows requested"),
        (lambda: poisoned_dataset("alpaca", 5000, 0.0), "train split has"),
        (lambda: load_source("nope"), "unknown dataset"),
        (lambda: load_source("sst2", "dev"), "no split"),
        (lambda: alignment_dataset(10**6), "refusal set has"),
    ],
)
def test_bad_requests_are_clear_errors(call, match):
    with pytest.raises(SinkguardError, match=match):
        call()


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(SinkguardError, match="missing under the data root"):
        load_source("sst2", root=tmp_path)
    with pytest.raises(SinkguardError, match="does not exist"):
        load_source("sst2", root=tmp_path / "nowhere")


def test_empty_field_is_reported_with_its_row(tmp_path):
    (tmp_path / "hft" / "harmful_qa").mkdir(parents=True)
    (tmp_path / "hft" / "harmful_qa" / "harmbench_compliant_400.jsonl").write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "", "response": "c"}\n'
    )
    with pytest.raises(SinkguardError, match="row 1: field 'prompt'"):
        load_source("harmful_qa", root=tmp_path)


LATIN1 = "d\xe9j\xe0 vu".encode("latin-1")


@pytest.mark.parametrize("source, rel, content, match", [
    ("harmful_qa", "harmful_qa/harmbench_compliant_400.jsonl", b'{"prompt": "' + LATIN1 + b'"}\n',
     r"harmbench_compliant_400.jsonl is not UTF-8 text \(byte 13\)"),
    ("harmful_qa", "harmful_qa/harmbench_compliant_400.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "re',
     r"harmbench_compliant_400.jsonl line 2 is not valid JSON \(truncated\? Unterminated string"),
    ("sst2", "sst2/train.tsv", b"sentence\tlabel\n" + LATIN1 + b"\t1\n", r"train.tsv is not UTF-8 text \(byte 16\)"),
    ("alpaca", "alpaca_eval/alpaca_eval_gpt4_805.json", b'[{"instruction": "a", "output": "b"}, {"instr',
     r"alpaca_eval_gpt4_805.json is not valid JSON \(truncated\? .* at line 1\)"),
    ("refusals", "refusals/safety_refusals_2483.jsonl", b'{"prompt": "a"}\n', r"row without the expected fields"),
])
def test_broken_data_files_are_one_clear_error(tmp_path, source, rel, content, match):
    path = tmp_path / "hft" / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(SinkguardError, match=match):
        load_source(source, root=tmp_path)


def test_broken_user_jsonl_inputs_are_one_line_errors(tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b'{"prompt": "' + LATIN1 + b'", "response": "b", "is_safe": false}\n')
    with pytest.raises(SinkguardError, match=r"pool source .*pool.jsonl is not UTF-8 text"):
        reference_pools(source=str(pool))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp')
    assert main(["judge", "score", "--input", str(pairs), "--out", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sinkguard: error: input file {pairs} line 2 is not valid JSON (truncated? Unterminated "
                   "string starting at); restore or rewrite it"]
    assert not (tmp_path / "s.jsonl").exists()


def test_labels_mask_the_prompt_and_collator_pads(tokenizer):
    ex = encode_example(tokenizer, "analyze sentiment of input good", "positive", "hello")
    n_answer = sum(label != IGNORE_INDEX for label in ex["labels"])
    assert n_answer == 2  # "positive" + <|im_end|>
    assert tokenizer.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]).startswith("positive")
    batch = PadCollator(tokenizer.pad_token_id)([ex, {"input_ids": [1, 2], "labels": [-100, 2]}])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == 2 and (batch["labels"][1, 2:] == IGNORE_INDEX).all()


def test_cli_user_mistake_is_one_line_not_a_traceback(capsys):
    code = main(["finetune", "--task", "sst2", "--poison-ratio", "2", "--out", "/tmp/never"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--poison-ratio must be in [0, 1], got 2.0" in err[0]


def test_custom_pool_source(tmp_path):
    path = tmp_path / "pools.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "is_safe": false}\n'
                    '{"prompt": "c", "response": "d", "is_safe": true}\n')
    harmful, harmless = reference_pools(source=str(path))
    assert [r["prompt"] for r in harmful] == ["a"] and [r["prompt"] for r in harmless] == ["c"]
    path.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(SinkguardError, match="boolean is_safe"):
        reference_pools(source=str(path))


def test_defense_harmful_set_shares_no_prompt_with_the_attack_rows():
    from sinkguard.data import attack_rows, defense_harmful_set

    harmful = defense_harmful_set()
    attack = {r["prompt"] for r in attack_rows("beavertails")}
    assert harmful and all(r["harmful"] for r in harmful)
    assert not attack & {r["prompt"] for r in harmful}
    assert len(defense_harmful_set(10)) == 10
    with pytest.raises(SinkguardError, match="ask for fewer"):
        defense_harmful_set(len(harmful) + 1)
