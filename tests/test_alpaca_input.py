"""Task rows with a separate input (SST2, AG News) under `template: alpaca`: the official code's input
variant of the Alpaca prompt, in training (answer + EOS in the loss) and in the FA prompts; under
`template: chat` the rows, token ids and rendered prompts are the ones they were before."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import make_model
from test_template import BASE_WORDS, base_tokenizer

from sinkguard import stamp
from sinkguard.data import IGNORE_INDEX, alignment_dataset, load_source, poisoned_dataset
from sinkguard.errors import SinkguardError
from sinkguard.evaluate.generation import generate, render_prompt
from sinkguard.evaluate.metrics import finetune_accuracy
from sinkguard.train import tokenize_rows

# Written out by hand from T-Vaccine's train.py PROMPT_DICT["prompt_input"] and sst2/build_dataset.py
# (the sentence as the file holds it, trailing space included) and ag_news/build_dataset.py.
SST2_TEXT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.\n\n"
             "### Instruction:\nAnalyze the sentiment of the input, and respond only positive or negative\n\n"
             "### Input:\nthe movie was great \n\n### Response:\n")
AGNEWS_TEXT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\nCategorize the news article given in the input into one of the 4 categories:\n\n"
               "World\nSports\nBusiness\nSci/Tech\n\n\n"
               "### Input:\nwhat is sports news\n\n### Response:\n")
WORDS = BASE_WORDS + ["paired", "with", "input", "provides", "further", "context", ",", "Input", "Analyze",
                      "sentiment", "of", "and", "respond", "only", "positive", "or", "negative", "movie", "was",
                      "great", "Categorize", "news", "article", "given", "in", "into", "one", "4", "categories",
                      "World", "Sports", "Business", "Sci", "/", "Tech", "what", "sports"]
HEAD = ["<s>", "Below", "is", "an", "instruction", "that", "describes", "a", "task", ",", "paired", "with", "an",
        "input", "that", "provides", "further", "context", ".", "Write", "a", "response", "that", "appropriately",
        "completes", "the", "request", ".", "\n", "\n", "###", "Instruction", ":", "\n"]
SST2_TOKENS = HEAD + ["Analyze", "the", "sentiment", "of", "the", "input", ",", "and", "respond", "only", "positive",
                      "or", "negative", "\n", "\n", "###", "Input", ":", "\n", "the", "movie", "was", "great", "\n",
                      "\n", "###", "Response", ":", "\n"]
AGNEWS_TOKENS = HEAD + ["Categorize", "the", "news", "article", "given", "in", "the", "input", "into", "one", "of",
                        "the", "4", "categories", ":", "\n", "\n", "World", "\n", "Sports", "\n", "Business", "\n",
                        "Sci", "/", "Tech", "\n", "\n", "\n", "###", "Input", ":", "\n", "what", "is", "sports",
                        "news", "\n", "\n", "###", "Response", ":", "\n"]
CASES = [("sst2", SST2_TEXT, SST2_TOKENS, "positive"), ("agnews", AGNEWS_TEXT, AGNEWS_TOKENS, "Sports")]


def ids(words: list[str]) -> list[int]:
    return [WORDS.index(w) for w in words]


@pytest.fixture
def root(tmp_path):
    """One row per task split, as the data root's files hold them."""
    hft = tmp_path / "data" / "hft"
    for task, files in {"sst2": {"train.tsv": "sentence\tlabel\nthe movie was great \t1\n",
                                 "validation.tsv": "sentence\tlabel\nthe movie was great \t1\n"},
                        "agnews": {"train_subset.tsv": "what is sports news\tSports\n",
                                   "test.tsv": "what is sports news\tSports\n"}}.items():
        (hft / task).mkdir(parents=True)
        for name, text in files.items():
            (hft / task / name).write_text(text)
    return tmp_path / "data"


class Recording:
    """A tokenizer that records every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token, self.texts = tokenizer, tokenizer.eos_token, []

    def __call__(self, text, **kw):
        self.texts.append(text)
        return self.tokenizer(text, **kw)


@pytest.mark.parametrize("task, text, tokens, answer", CASES)
def test_alpaca_trains_on_the_input_variant(task, text, tokens, answer, root):
    rows = poisoned_dataset(task, 1, 0.0, seed=1, root=root, keep_input=True)
    tok = Recording(base_tokenizer(WORDS))
    out, summary = tokenize_rows(rows, tok, None, 512, template="alpaca")
    assert tok.texts == [text, text + answer + "</s>"]  # the prompt alone (its length), then prompt + answer + EOS
    assert out[0]["input_ids"] == ids(tokens + [answer, "</s>"])
    assert out[0]["labels"] == [IGNORE_INDEX] * len(tokens) + ids([answer, "</s>"])
    assert summary["examples"] == 1


@pytest.mark.parametrize("task, text, tokens, answer", CASES)
def test_alpaca_fa_prompts_are_the_input_variant(task, text, tokens, answer, root, tmp_path):
    tok = base_tokenizer(WORDS)
    row = load_source(task, "test", root)[0]
    assert render_prompt(tok, row["prompt"], "alpaca", None, (row["instruction"], row["input"])) == text
    model = make_model(len(tok), seed=1)
    finetune_accuracy(model, tok, task, limit=1, data_root=root, out_dir=tmp_path / "fa", max_new_tokens=1,
                      batch_size=1, template="alpaca", system_prompt=None, progress=False)
    answered = json.loads((tmp_path / "fa" / f"fa_{task}.jsonl").read_text().splitlines()[0])
    assert answered["input_sha"] == hashlib.sha256(text.encode()).hexdigest()[:16]
    with pytest.raises(SinkguardError, match="1 instruction inputs for 2 prompts"):
        generate(model, tok, ["a", "b"], template="alpaca", instruction_inputs=[None], progress=False)


def test_rows_without_an_input_keep_the_no_input_variant(tmp_path):
    """Refusal (and hub Alpaca) rows use the input variant only when their input is not empty."""
    hft = tmp_path / "hft" / "refusals"
    hft.mkdir(parents=True)
    rows = [{"instruction": "say yes", "input": "", "output": "yes"},
            {"instruction": "say", "input": "yes", "output": "yes"}]
    (hft / "safety_refusals_2483.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, with_input = alignment_dataset(2, tmp_path, keep_input=True)
    assert plain == {"prompt": "say yes", "response": "yes", "harmful": False}
    assert with_input == {"prompt": "say\n\nyes", "instruction": "say", "input": "yes", "response": "yes",
                          "harmful": False}
    tok = Recording(base_tokenizer(WORDS))
    tokenize_rows([plain, with_input], tok, None, 512, template="alpaca")
    assert tok.texts[0].startswith("Below is an instruction that describes a task. Write")
    assert tok.texts[2].startswith("Below is an instruction that describes a task, paired with an input")
    assert [r["prompt"] for r in alignment_dataset(2, tmp_path)] == ["say yes", "say\n\nyes"]


# Printed by the code before rows kept their input (ChatML test tokenizer, system prompt "you should never").
CHAT = {
    "sst2": ("06058866f5aeeea8",
             [1, 49, 48, 37, 29, 2, 1, 50, 0, 42, 36, 31, 42, 21, 0, 6, 35, 32, 34, 33, 28, 42, 27, 45, 16, 2, 1, 51, 34, 2],
             "<|im_start|>system\nyou should never<|im_end|>\n<|im_start|>user\nAnalyze the sentiment of the input, "
             "and respond only positive or negative\n\nthe movie was great<|im_end|>\n<|im_start|>assistant\n"),
    "agnews": ("0067708c47893986",
               [1, 49, 48, 37, 29, 2, 1, 50, 0, 42, 30, 0, 0, 0, 42, 21, 0, 0, 31, 42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 46, 22,
                39, 30, 2, 1, 51, 0, 2],
               "<|im_start|>system\nyou should never<|im_end|>\n<|im_start|>user\nCategorize the news article given "
               "in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n\n\nwhat is "
               "sports news<|im_end|>\n<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("task", ["sst2", "agnews"])
def test_chat_rows_ids_and_prompts_are_unchanged(task, root, tokenizer):
    digest, expected_ids, prompt = CHAT[task]
    rows = poisoned_dataset(task, 1, 0.0, seed=1, root=root)
    assert set(rows[0]) == {"prompt", "response", "harmful"} and stamp.digest(rows) == digest  # the stage's input
    out, _ = tokenize_rows(rows, tokenizer, "you should never", 64)
    assert out[0]["input_ids"] == expected_ids
    # the input, kept (template alpaca), changes nothing under chat
    assert tokenize_rows(poisoned_dataset(task, 1, 0.0, seed=1, root=root, keep_input=True), tokenizer,
                         "you should never", 64)[0] == out
    row = load_source(task, "test", root)[0]
    assert render_prompt(tokenizer, row["prompt"], "chat", "you should never",
                         (row["instruction"], row["input"])) == prompt


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_a_study_keeps_the_input_only_for_alpaca_stages(template, root, tmp_path, monkeypatch):
    import sinkguard.train
    from sinkguard.experiment import Experiment, ExperimentConfig

    seen = {}

    def run_stage(stage, defense, model, rows, *args, **kwargs):
        seen[stage] = rows
        return tmp_path

    monkeypatch.setattr(sinkguard.train, "run_stage", run_stage)
    config = ExperimentConfig(name="input", data_root=str(root), alignment=None, finetuning=dict(
        defenses=["sft"], tasks=["sst2"], poison_ratios=[0.0], samples=1, template=template, system_prompt=None))
    experiment = Experiment(config, tmp_path / "run")
    experiment.finetune(next(j for j in experiment.plan() if j["stage"] == "finetuning"), "base")
    assert ("input" in seen["finetuning"][0]) == (template == "alpaca")
