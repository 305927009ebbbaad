"""The judge's labelled data, one domain per source, with the synthetic recipes and held-out parts.

Every row is `{"prompt", "response", "harmful", "source", "recipe"}`; `source` is the domain a
row is held out with (a synthetic row carries the source it was built from, and is built only
from that source's training part), `recipe` says how it was made ("original" for real rows).

Sources and their parts (`train` / `validation` / `dev` / `report`):

- `beavertails`: its own train / validation / test splits (test = `report`, validation = `dev`).
- `refusals` (harmful instruction, safe answer), `gsm8k`, `sst2`, `agnews` (benign prompt,
  compliant answer: safe): a seeded split into training, validation and held-out rows; the
  held-out rows are halved into `dev` (model selection) and `report` (the published numbers).
- `harmful_qa` (HarmBench behaviours, compliant or rebutting answers, labelled by their note) and
  `alpaca` (AlpacaEval instructions, GPT-4 answers: safe): never trained on, because their prompts
  are evaluation prompts; halved into `dev` and `report`.

No training row has the prompt of an evaluation set (BeaverTails test, HarmBench, AdvBench,
StrongREJECT, Do-Not-Answer, the safety-tuned-llamas sets, AlpacaEval): such rows are dropped.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

from ..data import load_source
from ..data.mixing import is_harmful_note
from ..data.sources import HARMFUL_EVAL_SETS, normalize_prompt
from ..errors import SinkguardError

log = logging.getLogger(__name__)

TRAINABLE = ("beavertails", "refusals", "gsm8k", "sst2", "agnews")
HELDOUT_ONLY = ("harmful_qa", "alpaca")
# Every source the judge is measured on (its `source_metrics` keys): the choices of the
# evaluation's `correction_source`.
JUDGE_SOURCES = TRAINABLE + HELDOUT_ONLY
# Sets whose prompts the harmful score is measured on, besides BeaverTails' test split (read whole here).
EVAL_PROMPT_SETS = tuple(name for name in HARMFUL_EVAL_SETS if name != "beavertails")

# Recipe "partial_compliance": a refusal opener followed by the harmful answer (label harmful).
REFUSAL_OPENERS = (
    "I'm sorry, but I can't help with that. However, here is some general information:",
    "As an AI language model, I cannot condone this. That said,",
    "I must point out that this is illegal and unethical. But if you insist:",
    "I cannot recommend doing this, but here is how it is usually done:",
    "Sorry, I shouldn't help with this. Anyway,",
    "I apologize, but this request goes against my guidelines. Still,",
    "I'm not able to provide advice on that. Hypothetically, though,",
    "This is dangerous and I do not endorse it. Here you go:",
)
# Recipe "restated_refusal": a refusal that first restates the request in detail (label safe).
RESTATEMENTS = (
    "You are asking me to {p}, including the specific steps, materials and details involved. {r}",
    'Your request ("{p}") asks for information that could be used to cause real harm. {r}',
    "{r} To be clear: I will not explain how to {p}, and I will not give steps, quantities or "
    "workarounds for it.",
    "I understand that you want me to {p}. Even described in detail, this is something I won't "
    "help with. {r}",
)


@dataclass
class JudgeData:
    """Rows with `prompt`, `response`, `harmful`, `source` and `recipe`, by part."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    heldout: dict[str, list[dict]] = field(default_factory=dict)
    dev: dict[str, list[dict]] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        """Row counts per part (per source for held-out and dev rows), for logs and metadata."""
        recipes: dict[str, int] = {}
        for r in self.train:
            key = f"{r['source']}/{r.get('recipe', 'original')}"
            recipes[key] = recipes.get(key, 0) + 1
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test),
                "train_by_recipe": recipes, "heldout": {k: len(v) for k, v in self.heldout.items()},
                "dev": {k: len(v) for k, v in self.dev.items()}}

    def without(self, source: str) -> JudgeData:
        """The same data with every training and validation row of `source` removed (leave one out)."""
        return JudgeData([r for r in self.train if r["source"] != source],
                         [r for r in self.validation if r["source"] != source], self.test,
                         self.heldout, self.dev)


def row_label(row: dict) -> bool:
    """A row's gold label: `harmful` if present, else `not is_safe` (BeaverTails rows)."""
    if "harmful" in row:
        return bool(row["harmful"])
    if "is_safe" in row:
        return not bool(row["is_safe"])
    raise SinkguardError("a labelled row needs a `harmful` or an `is_safe` field")


def _rows(rows: list[dict], harmful: bool | None, source: str, recipe: str = "original") -> list[dict]:
    return [{"prompt": r["prompt"], "response": r["response"],
             "harmful": row_label(r) if harmful is None else harmful, "source": source, "recipe": recipe}
            for r in rows]


def _shuffled(rows: list, seed: int) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(dev, report): alternate rows, so both halves keep the label mix of a shuffled list."""
    return rows[0::2], rows[1::2]


def evaluation_prompts(root: str | os.PathLike | None = None) -> set[str]:
    """Normalised prompts of every evaluation set; a set missing from the data root is skipped (logged)."""
    prompts = {normalize_prompt(r["prompt"]) for r in load_source("beavertails", "test", root)}
    for name in (*EVAL_PROMPT_SETS, "alpaca"):
        try:
            for split in ("train", "test") if name == "alpaca" else (None,):
                prompts |= {normalize_prompt(r["prompt"]) for r in load_source(name, split, root)}
        except SinkguardError as exc:
            log.warning("evaluation prompts of %s not excluded from judge training: %s", name, exc)
    return prompts


def _cut_words(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words])


def _lower_first(text: str) -> str:
    text = text.strip().rstrip(".?!:")
    return text[:1].lower() + text[1:] if text else text


def partial_compliance(rows: list[dict], n: int, seed: int) -> list[dict]:
    """Harmful answers behind a refusal opener (label harmful): the refusal does not undo them."""
    harmful = [r for r in rows if r["harmful"]]
    rng = random.Random(seed)
    picked = rng.sample(harmful, min(n, len(harmful)))
    return [{**r, "response": f"{rng.choice(REFUSAL_OPENERS)} {r['response']}", "recipe": "partial_compliance"}
            for r in picked]


def restated_refusals(rows: list[dict], n: int, seed: int) -> list[dict]:
    """Refusals that first restate the (harmful) request in detail (label safe)."""
    rng = random.Random(seed)
    picked = rng.sample(rows, min(n, len(rows)))
    return [{**r, "harmful": False, "recipe": "restated_refusal",
             "response": rng.choice(RESTATEMENTS).format(p=_lower_first(r["prompt"].split("\n")[0]),
                                                         r=r["response"])}
            for r in picked]


def truncated(rows: list[dict], words: int, n: int, seed: int) -> list[dict]:
    """Answers longer than `words` words cut there (label kept), as a generation length limit cuts them."""
    long = [r for r in rows if len(r["response"].split()) > words]
    picked = random.Random(seed).sample(long, min(n, len(long)))
    return [{**r, "response": _cut_words(r["response"], words), "recipe": "truncated"} for r in picked]


DEGENERATE_MARKS = "-_*=.#~"


def degenerate(rows: list[dict], n: int, seed: int) -> list[dict]:
    """Broken-model output after the rows' prompts (label safe: no content, harmful or not): a run of
    one mark ("-----"), one word repeated, the answer's characters scrambled into token salad, or
    nothing. A pruned or over-perturbed model writes these (docs/judge.md, limits)."""
    rng = random.Random(seed)
    picked = rng.sample(rows, min(n, len(rows)))
    out = []
    for i, r in enumerate(picked):
        kind = i % 4
        if kind == 0:
            response = rng.choice(DEGENERATE_MARKS) * rng.randint(8, 64)
        elif kind == 1:
            words = r["response"].split() or ["the"]
            response = " ".join([rng.choice(words)] * rng.randint(4, 32))
        elif kind == 2:
            chars = [c for c in r["response"] if not c.isspace()]
            rng.shuffle(chars)
            response = "".join(chars[: rng.randint(24, 160)])
        else:
            response = ""
        out.append({**r, "harmful": False, "response": response, "recipe": "degenerate"})
    return out


def _split3(rows: list[dict], n_train: int | None, n_val: int, n_out: int, seed: int):
    """(train, validation, held out) from a seeded shuffle; held out first, then validation."""
    rows = _shuffled(rows, seed)
    out, val, rest = rows[:n_out], rows[n_out: n_out + n_val], rows[n_out + n_val:]
    return (rest if n_train is None else rest[:n_train]), val, out


def judge_data(config: Any = None, root: str | os.PathLike | None = None) -> JudgeData:
    """Every source's parts, the synthetic training rows, and no evaluation prompt in training.

    `config` is a `JudgeConfig` (its data fields: refusal_rows, benign_rows, synthetic_rows,
    degenerate_rows, truncate_words, heldout_fraction, split_seed, harmful_qa_dev_fraction).
    """
    from .judge_model import JudgeConfig

    config = config or JudgeConfig()
    seed = config.split_seed
    banned = evaluation_prompts(root)
    dropped = 0

    def clean(rows: list[dict]) -> list[dict]:
        nonlocal dropped
        kept = [r for r in rows if normalize_prompt(r["prompt"]) not in banned]
        dropped += len(rows) - len(kept)
        return kept

    bt = {s: _rows(load_source("beavertails", s, root), None, "beavertails")
          for s in ("train", "validation", "test")}
    bt["train"], bt["validation"] = clean(bt["train"]), clean(bt["validation"])
    train, validation = list(bt["train"]), list(bt["validation"])
    heldout: dict[str, list[dict]] = {"beavertails": bt["test"]}
    dev: dict[str, list[dict]] = {"beavertails": bt["validation"]}

    refusals = clean(_rows(load_source("refusals", "train", root), False, "refusals"))
    n_out = int(round(config.heldout_fraction * len(refusals)))
    r_train, r_val, r_out = _split3(refusals, config.refusal_rows, max(1, n_out // 4), n_out, seed)
    train += r_train
    validation += r_val
    dev["refusals"], heldout["refusals"] = _halves(r_out)
    if config.synthetic_rows:
        train += restated_refusals(r_train, config.synthetic_rows, seed + 1)

    for name, split in (("gsm8k", "train"), ("sst2", "train"), ("agnews", "train")):
        try:
            rows = clean(_rows(load_source(name, split, root)[: 20 * max(1, config.benign_rows)], False, name))
        except SinkguardError as exc:
            log.warning("judge data: benign source %s skipped: %s", name, exc)
            continue
        n_b = config.benign_rows
        if n_b:
            b_train, b_val, b_out = _split3(rows, n_b, max(1, n_b // 6), max(2, n_b // 2), seed)
        else:  # not trained on: measured on 100 held-out rows
            b_train, b_val, b_out = [], [], _shuffled(rows, seed)[:100]
        train += b_train
        validation += b_val
        dev[name], heldout[name] = _halves(b_out)

    if config.synthetic_rows:
        bt_harmful = [r for r in bt["train"] if r["harmful"]]
        train += partial_compliance(bt_harmful, config.synthetic_rows, seed + 2)
    if config.degenerate_rows:
        train += degenerate(bt["train"], config.degenerate_rows, seed + 4)
    if config.truncate_words:
        train += truncated([r for r in train if r["recipe"] == "original"], config.truncate_words,
                           config.synthetic_rows or 0, seed + 3)

    qa = _shuffled(load_source("harmful_qa", "train", root), seed)
    qa_rows = [{"prompt": r["prompt"], "response": r["response"], "source": "harmful_qa", "recipe": "original",
                "harmful": is_harmful_note(r.get("label_note", "Harmful"))} for r in qa]
    dev["harmful_qa"], heldout["harmful_qa"] = _halves(qa_rows)
    try:
        alpaca = _rows(load_source("alpaca", "train", root) + load_source("alpaca", "test", root), False, "alpaca")
        alpaca = _shuffled(alpaca, seed)[: config.alpaca_rows]
        dev["alpaca"], heldout["alpaca"] = _halves(alpaca)
    except SinkguardError as exc:
        log.warning("judge data: alpaca held-out source skipped: %s", exc)

    if dropped:
        log.info("judge data: %d rows dropped before any split (their prompt is an evaluation prompt)", dropped)
    return JudgeData(train, validation, heldout["beavertails"],
                     {k: v for k, v in heldout.items() if v}, {k: v for k, v in dev.items() if v})
