"""Batched generation on a tiny random Llama: left padding, resume, stale rows, HS/FA plumbing, CLI."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from sinkguard.data.formatting import ALPACA_TEMPLATE
from sinkguard.errors import SinkguardError
from sinkguard.evaluate import generation
from sinkguard.evaluate.generation import (
    generate,
    model_fingerprint,
    read_generations,
    render_prompt,
)

PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon who guards a library of forgotten languages in the north.",
    "What is 2 + 2?",
    "Summarise the plot of a film you like in three sentences, please.",
    "Why?",
]


@pytest.fixture(scope="module")
def tokenizer():
    from sinkguard.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a shared CPU they only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_render_prompt(tokenizer):
    chat = render_prompt(tokenizer, "Hello there", system_prompt="Be brief.")
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert chat.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    alpaca = render_prompt(tokenizer, "Hello there", template="alpaca")
    assert alpaca == ALPACA_TEMPLATE.format(prompt="Hello there")
    assert alpaca.startswith("Below is an instruction that describes a task.")
    assert alpaca.endswith("### Instruction:\nHello there\n\n### Response:\n")
    with pytest.raises(SinkguardError, match="system prompt"):
        render_prompt(tokenizer, "x", template="alpaca", system_prompt="Be brief.")
    with pytest.raises(SinkguardError, match="unknown template"):
        render_prompt(tokenizer, "x", template="vicuna")


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_left_padded_batches_match_one_by_one(model, tokenizer, template):
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5, template=template, progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1, template=template, progress=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # the answers differ, so the order check above means something


def test_jsonl_rows_in_prompt_order(model, tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2, out_path=out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in rows] == PROMPTS and [r["response"] for r in rows] == answers
    assert all(0 <= r["n_tokens"] <= 4 for r in rows)
    assert read_generations(out) == rows


def test_interrupted_run_resumes_to_the_same_file(model, tokenizer, tmp_path, monkeypatch):
    full = tmp_path / "full.jsonl"
    generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, out_path=full, progress=False)

    real = generation._generate_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    part = tmp_path / "part.jsonl"
    monkeypatch.setattr(generation, "_generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, out_path=part, progress=False)
    assert len(part.read_text().splitlines()) == 2
    with part.open("a") as fh:  # a crash in the middle of writing a line
        fh.write('{"index": 4, "prompt": "Wh')

    calls.clear()
    monkeypatch.setattr(generation, "_generate_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, out_path=part, progress=False)
    assert sum(calls) == len(PROMPTS) - 2  # only the missing rows were generated
    assert part.read_bytes() == full.read_bytes()


def test_last_row_without_newline_is_repaired(model, tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, out_path=out, progress=False)
    whole = out.read_bytes()
    out.write_bytes(whole.rstrip(b"\n"))  # the crash came between a row and its newline
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, out_path=out, progress=False)
    assert out.read_bytes() == whole
    generate(model, tokenizer, PROMPTS[:3], max_new_tokens=4, out_path=out, progress=False)
    assert len(read_generations(out)) == 3


def test_more_prompts_reuse_the_first_rows(model, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "gen.jsonl"
    first = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, batch_size=4, out_path=out, progress=False)
    real, calls = generation._generate_batch, []
    monkeypatch.setattr(generation, "_generate_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    more = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=4, out_path=out, progress=False)
    assert more[:2] == first and sum(calls) == len(PROMPTS) - 2
    calls.clear()
    assert generate(model, tokenizer, PROMPTS[:3], max_new_tokens=4, out_path=out, progress=False) == more[:3]
    assert calls == []


def test_changed_settings_never_reuse_stale_rows(model, tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    generate(model, tokenizer, PROMPTS[:3], max_new_tokens=4, out_path=out, progress=False)
    with pytest.raises(SinkguardError, match="other weights or max_new_tokens"):
        generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, out_path=out, progress=False)
    with pytest.raises(SinkguardError, match="another prompt, template or system prompt"):
        generate(model, tokenizer, PROMPTS[:3], max_new_tokens=4, system_prompt="Be brief.", out_path=out,
                 progress=False)
    with pytest.raises(SinkguardError, match="another prompt"):
        generate(model, tokenizer, PROMPTS[1:4], max_new_tokens=4, out_path=out, progress=False)
    fresh = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, out_path=out, overwrite=True, progress=False)
    assert [r["response"] for r in read_generations(out)] == fresh
    assert fresh == generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, progress=False)


def test_fingerprint_follows_the_weights(model):
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.add_(1e-3)
        try:
            assert model_fingerprint(model) != before
        finally:
            weight.sub_(1e-3)


def test_bad_settings_are_one_line_errors(model, tokenizer):
    with pytest.raises(SinkguardError, match="max_new_tokens"):
        generate(model, tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(SinkguardError, match="batch size"):
        generate(model, tokenizer, ["x"], batch_size=0)


# ---------------------------------------------------------------- HS / FA plumbing and the CLI
class LengthJudge:
    """A stand-in judge: an answer is harmful when it has an even number of characters."""

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return [1.0 if len(r) % 2 == 0 else 0.0 for r in responses]

    def is_harmful(self, prompts, responses):
        return [s > 0.5 for s in self.score(prompts, responses)]


def _refusal(text: str) -> bool:
    return len(text) % 3 == 0


def _data_root(tmp_path):
    """A small data root: 6 beavertails test rows (4 unsafe) and an SST2 test split of 5 rows."""
    hft = tmp_path / "data" / "hft"
    (hft / "beavertails").mkdir(parents=True)
    rows = [{"prompt": p, "response": "r", "is_safe": i % 3 == 2, "split": "test"} for i, p in enumerate(PROMPTS)]
    rows.append({"prompt": "How do I pick a lock?", "response": "r", "is_safe": False, "split": "test"})
    (hft / "beavertails" / "beavertails_1999.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (hft / "sst2").mkdir()
    sst2 = "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in [
        ("a great film", 1), ("dull and long", 0), ("loved it", 1), ("awful", 0), ("fine work", 1)])
    (hft / "sst2" / "validation.tsv").write_text(sst2)
    return tmp_path / "data"


def test_harmful_score_and_fine_tune_accuracy_files(model, tokenizer, tmp_path):
    from sinkguard.evaluate.metrics import finetune_accuracy, harmful_score

    root, out = _data_root(tmp_path), tmp_path / "eval"
    hs = harmful_score(model, tokenizer, ["beavertails"], judge=LengthJudge(), is_refusal=_refusal, limit=3,
                       data_root=root, out_dir=out, max_new_tokens=6, progress=False)["beavertails"]
    gens = read_generations(out / "hs_beavertails.jsonl")
    assert [g["prompt"] for g in gens] == [PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # unsafe ones, first 3
    flags = [len(g["response"]) % 2 == 0 for g in gens]
    assert hs["n"] == 3 and hs["n_harmful"] == sum(flags)
    assert hs["hs"] == pytest.approx(100 * sum(flags) / 3)
    assert hs["refusal_rate"] == pytest.approx(100 * sum(_refusal(g["response"]) for g in gens) / 3)
    judged = read_generations(out / "hs_beavertails.judged.jsonl")
    assert [j["harmful"] for j in judged] == flags

    fa = finetune_accuracy(model, tokenizer, "sst2", limit=4, data_root=root, out_dir=out, progress=False)
    scored = read_generations(out / "fa_sst2.scored.jsonl")
    assert fa["n"] == 4 and [s["gold"] for s in scored] == ["positive", "negative", "positive", "negative"]
    assert fa["n_correct"] == sum(s["gold"] in s["response"].lower() for s in scored)
    assert all(g["n_tokens"] <= 10 for g in read_generations(out / "fa_sst2.jsonl"))  # official SST2 length


@pytest.fixture()
def fake_judge_module(monkeypatch):
    """Stand in for `sinkguard.evaluate.judge` (its real judge is trained on data)."""
    module = types.ModuleType("sinkguard.evaluate.judge")
    module.load_judge = lambda auto_train=True, root=None: LengthJudge()
    module.is_refusal = _refusal
    monkeypatch.setitem(sys.modules, "sinkguard.evaluate.judge", module)


def test_cli_writes_eval_json(model, tokenizer, tmp_path, capsys, fake_judge_module):
    from sinkguard.cli import main

    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(model_dir), "--data-root", str(_data_root(tmp_path)), "--limit", "3",
            "--hs-sets", "beavertails", "--benign-limit", "0", "--task", "sst2", "--fa-limit", "5",
            "--batch-size", "2", "--out", str(out)]
    assert main(argv + ["--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((out / "eval.json").read_text())
    gens = read_generations(out / "hs_beavertails.jsonl")
    assert result["hs"]["beavertails"] == pytest.approx(100 * sum(len(g["response"]) % 2 == 0 for g in gens) / 3)
    assert result["counts"]["hs"]["beavertails"]["n"] == 3 and result["counts"]["fa"]["n"] == 5
    assert result["task"] == "sst2" and 0.0 <= result["fa"] <= 100.0
    assert result["settings"]["fa_system_prompt"] == "You are a helpful assistant."
    assert result["settings"]["hs_system_prompt"] is None

    assert main(argv + ["--max-new-tokens", "5"]) == 2  # answers made under other settings are refused
    assert "other settings" in capsys.readouterr().err
    assert main(argv + ["--limit", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sinkguard: error: --limit must be >= 1, got 0") and "\n" not in err
    assert main(["evaluate", "--model", str(model_dir), "--hs-sets", "beavertails,nope", "--out", str(out)]) == 2
    assert "--hs-sets: unknown 'nope'; valid: " in capsys.readouterr().err


def test_shrinking_decoder_equals_transformers_generate():
    """Rows leaving the batch (and its KV cache) as they end change no answer."""
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    for seed in range(3):
        model = make_model(len(tok), seed=seed).eval()
        g = torch.Generator().manual_seed(seed)
        seqs = [torch.randint(4, len(tok), (int(n),), generator=g).tolist()
                for n in torch.randint(2, 12, (6,), generator=g)]
        for eos in ([2], [2, 5, 7, 9, 11]):  # more end tokens: rows end at different steps
            ours = generation._generate_batch(model, seqs, 12, 3, eos, "shrinking")
            assert ours == generation._generate_batch(model, seqs, 12, 3, eos, "hf")
    assert any(0 < len(a) < 12 for a in ours)  # some rows did leave early
    with pytest.raises(SinkguardError, match="unknown decoder"):
        generation._generate_batch(model, seqs, 4, 3, [2], "beam")
