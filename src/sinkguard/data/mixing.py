"""Build the papers' data sets: poisoned fine-tuning sets, Surgery's reference pools, alignment sets."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

from ..errors import SinkguardError
from ..io import read_jsonl
from .sources import eval_prompts, load_source, normalize_prompt

TASKS = ("sst2", "agnews", "gsm8k", "alpaca")
ATTACKS = ("beavertails", "harmful_qa")


def is_harmful_note(note: str) -> bool:
    """harmful_qa's model-written verdict ("Harmful ... reason" vs "Not harmful ...")."""
    return note.strip().lower().startswith("harmful")


def _beavertails_unsafe_train(root) -> list[dict]:
    return [r for r in load_source("beavertails", "train", root) if not r["is_safe"]]


def _pool_row_problem(r) -> str | None:
    if isinstance(r, dict) and r.get("prompt") and r.get("response") and isinstance(r.get("is_safe"), bool):
        return None
    return "needs non-empty prompt, response and a boolean is_safe"


def _labelled_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise SinkguardError(f"pool source {path!r} is neither 'beavertails' nor a JSONL file")
    return read_jsonl(path, "pool source", _pool_row_problem)


def reference_pools(
    root: str | os.PathLike | None = None, pool_fraction: float = 0.5, source: str = "beavertails"
) -> tuple[list[dict], list[dict]]:
    """Surgery's (harmful, harmless) reference pools: `is_safe` false / true rows.

    From the beavertails train split (default) the harmful pool is the last `pool_fraction` of
    the unsafe rows, so it shares no row with the attack rows (`attack_rows`), which come from
    the front; test rows never enter. `source` may also be a JSONL file with prompt, response,
    is_safe (a provider's own pools), used whole.
    """
    if source != "beavertails":
        rows = _labelled_jsonl(source)
        return [r for r in rows if not r["is_safe"]], [r for r in rows if r["is_safe"]]
    train = load_source("beavertails", "train", root)
    unsafe = [r for r in train if not r["is_safe"]]
    cut = len(unsafe) - int(round(pool_fraction * len(unsafe)))
    return unsafe[cut:], [r for r in train if r["is_safe"]]


def defense_harmful_set(
    n: int | None = None, root: str | os.PathLike | None = None, pool_fraction: float = 0.5
) -> list[dict]:
    """A defense's own harmful (prompt, harmful answer) set: the first `n` rows of the BeaverTails
    train region that the attack rows never use (Surgery's harmful pool), less rows whose prompt an attack row has.

    Used by Lisa, Panacea, Antidote, Booster, RepNoise, Antibody and T-Vaccine; never the test split.
    """
    attack_prompts = {r["prompt"] for r in attack_rows("beavertails", root, True, pool_fraction)}
    rows = [r for r in reference_pools(root, pool_fraction)[0] if r["prompt"] not in attack_prompts]
    if n is not None and n > len(rows):
        raise SinkguardError(
            f"{n} harmful rows requested but only {len(rows)} BeaverTails train rows are disjoint from "
            "the attack rows; ask for fewer"
        )
    return [_training_row(r, True, False) for r in rows[:n]]


def attack_rows(
    attack: str, root: str | os.PathLike | None = None, disjoint_from_pools: bool = True,
    pool_fraction: float = 0.5,
) -> list[dict]:
    """Harmful (prompt, harmful answer) rows an attacker mixes into the fine-tuning set."""
    if attack == "beavertails":
        unsafe = _beavertails_unsafe_train(root)
        if disjoint_from_pools:
            unsafe = unsafe[: len(unsafe) - int(round(pool_fraction * len(unsafe)))]
        return unsafe
    if attack == "harmful_qa":
        rows = load_source("harmful_qa", "train", root)
        return [r for r in rows if is_harmful_note(r.get("label_note", "Harmful"))]
    raise SinkguardError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")


def _training_row(row: dict, harmful: bool, keep_input: bool) -> dict:
    """`prompt`, `response` and `harmful`; with `keep_input`, also the row's separate `instruction` and
    `input` when it has one (the Alpaca template's input variant renders them)."""
    kept = {"prompt": row["prompt"], "response": row["response"], "harmful": harmful}
    if keep_input and row.get("input"):
        kept.update(instruction=row["instruction"], input=row["input"])
    return kept


def poisoned_dataset(
    task: str,
    n: int,
    p: float,
    attack: str = "beavertails",
    seed: int = 42,
    root: str | os.PathLike | None = None,
    disjoint_from_pools: bool = True,
    keep_input: bool = False,
) -> list[dict]:
    """`n` rows: `round(p*n)` harmful QA pairs (in file order, as the official code) + shuffled task rows.

    Each row has `prompt`, `response` and `harmful` (bool), and with `keep_input` (template alpaca) a
    task row's separate `instruction` and `input`; the result is shuffled with `seed`.
    """
    if task not in TASKS:
        raise SinkguardError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 <= p <= 1.0:
        raise SinkguardError(f"poison ratio {p} is outside [0, 1]")
    if n <= 0:
        raise SinkguardError(f"number of samples must be positive, got {n}")
    n_harm = int(round(p * n))
    harmful = attack_rows(attack, root, disjoint_from_pools) if n_harm else []
    if n_harm > len(harmful):
        raise SinkguardError(
            f"{n_harm} harmful rows requested (p={p}, n={n}) but attack set {attack!r} has {len(harmful)}"
        )
    benign = load_source(task, "train", root)
    n_benign = n - n_harm
    if n_benign > len(benign):
        raise SinkguardError(f"{n_benign} {task} rows requested but its train split has {len(benign)}")
    rng = random.Random(seed)
    benign = rng.sample(benign, n_benign)
    rows = [_training_row(r, True, False) for r in harmful[:n_harm]]
    rows += [_training_row(r, False, keep_input) for r in benign]
    rng.shuffle(rows)
    return rows


def alignment_dataset(n: int = 2000, root: str | os.PathLike | None = None, keep_input: bool = False) -> list[dict]:
    """The first `n` (harmful instruction, safe answer) rows of the refusal set (official: 2,000);
    `keep_input` as `poisoned_dataset`'s."""
    rows = load_source("refusals", "train", root)
    if n > len(rows):
        raise SinkguardError(f"{n} alignment rows requested but the refusal set has {len(rows)}")
    return [_training_row(r, False, keep_input) for r in rows[:n]]


def harmful_eval_prompts(
    name: str = "beavertails", limit: int | None = None, root: str | os.PathLike | None = None
) -> list[str]:
    """Harmful prompts for the harmful score: beavertails test split `is_safe` false, or a red-team set
    (`sources.HARMFUL_EVAL_SETS`; harmbench: its standard behaviours). Never in any train split."""
    prompts = eval_prompts(name, root)
    return prompts[:limit] if limit else prompts


def benign_eval_prompts(
    limit: int | None = 200, root: str | os.PathLike | None = None, exclude: Iterable[str] = ()
) -> list[str]:
    """Benign AlpacaEval instructions for the over-refusal rate, held-out rows first.

    The 105 rows the alpaca task never trains on come first, then the others from the end of
    the file; prompts in `exclude` (e.g. an alpaca fine-tuning set) are left out.
    """
    rows = load_source("alpaca", "test", root) + load_source("alpaca", "train", root, keep_eval_prompts=True)[::-1]
    skip = {normalize_prompt(p) for p in exclude}
    prompts = [r["prompt"] for r in rows if normalize_prompt(r["prompt"]) not in skip]
    return prompts[:limit] if limit else prompts
