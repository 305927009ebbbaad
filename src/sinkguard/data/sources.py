"""Named data sources, read from the data root (local files) or, for users online, from the hub.

Every source yields plain dict rows. QA-style rows have `prompt` and `response`; task rows also
have `label` (the gold answer used by the accuracy parsers); red-team sets have `prompt` only.
Rows made of an instruction and a separate input (SST2, AG News, Alpaca rows with an input) also
keep both, as the official data builders write them, in `instruction` and `input`: the Alpaca
template's input variant renders them; `prompt` is their joined text, what the chat template renders.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import SinkguardError
from ..io import read_json, read_jsonl, read_text

log = logging.getLogger(__name__)

ENV = "SINKGUARD_DATA"
_REPO_SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"

# Task instructions as in the Booster / Vaccine / T-Vaccine / Surgery data builders.
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
GSM8K_MARKER = "The final answer is: "
ALPACA_TRAIN = 700  # the 805 AlpacaEval rows: first 700 to fine-tune on, last 105 held out


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The data root: `override`, else env `SINKGUARD_DATA`, else `../shared/data` if it exists."""
    for candidate in (override, os.environ.get(ENV)):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise SinkguardError(f"data root {path} does not exist: pass --data-root or set {ENV}")
            return path
    for path in (Path.cwd().parent / "shared" / "data", _REPO_SHARED):
        if path.is_dir():
            return path
    raise SinkguardError(f"no data root: pass --data-root DIR or set {ENV} (a folder holding hft/)")


def _hft(root: Path | None) -> Path:
    root = data_root(root)
    return root / "hft" if (root / "hft").is_dir() else root


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(_need(path), "data file")


def _json(path: Path):
    return read_json(_need(path), "data file")


def _text(path: Path) -> io.StringIO:
    return io.StringIO(read_text(_need(path), "data file"), newline="")


def _tsv(path: Path, header: bool) -> list[list[str]]:
    rows = list(csv.reader(_text(path), delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(_text(path)))


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise SinkguardError(f"{name} has no split {split!r}; choose one of {', '.join(allowed)}")


# ---------------------------------------------------------------- local readers
def _beavertails(root, split):
    _check_split("beavertails", split, ("train", "validation", "test", "all"))
    rows = _jsonl(_hft(root) / "beavertails" / "beavertails_1999.jsonl")
    return [r for r in rows if split == "all" or r["split"] == split]


def _with_input(instruction: str, text: str | None, row: dict) -> dict:
    """`row` with the prompt `instruction` + blank line + `text`, and both kept when `text` is not empty."""
    if not text:
        return {"prompt": instruction, **row}
    return {"prompt": f"{instruction}\n\n{text}", "instruction": instruction, "input": text, **row}


def _refusals(root, split):
    _check_split("refusals", split, ("train",))
    rows = _jsonl(_hft(root) / "refusals" / "safety_refusals_2483.jsonl")
    return [_with_input(r["instruction"], r.get("input"), {"response": r["output"]}) for r in rows]


def _harmful_qa(root, split):
    _check_split("harmful_qa", split, ("train",))
    return _jsonl(_hft(root) / "harmful_qa" / "harmbench_compliant_400.jsonl")


def _sst2_row(sentence: str, label: int) -> dict:
    """The prompt joins the stripped sentence; `input` is the sentence as the official builders keep it."""
    word = "positive" if int(label) == 1 else "negative"
    return {"prompt": f"{SST2_INSTRUCTION}\n\n{sentence.strip()}", "instruction": SST2_INSTRUCTION,
            "input": sentence, "response": word, "label": word}


def _sst2(root, split):
    _check_split("sst2", split, ("train", "test", "heldout"))
    name = {"train": "train.tsv", "test": "validation.tsv", "heldout": "heldout_from_train.tsv"}[split]
    return [_sst2_row(s, int(y)) for s, y in _tsv(_hft(root) / "sst2" / name, header=True)]


def _agnews_row(text: str, label: str) -> dict:
    """As `_sst2_row`: the stripped text in the prompt, the text as it is in `input`."""
    return {"prompt": f"{AGNEWS_INSTRUCTION}\n\n{text.strip()}", "instruction": AGNEWS_INSTRUCTION,
            "input": text, "response": label, "label": label}


def _agnews(root, split):
    _check_split("agnews", split, ("train", "test"))
    name = {"train": "train_subset.tsv", "test": "test.tsv"}[split]
    return [_agnews_row(t, y) for t, y in _tsv(_hft(root) / "agnews" / name, header=False)]


def _gsm8k_row(question: str, answer: str) -> dict:
    final = answer.split("####")[-1].strip().replace(",", "")
    return {"prompt": question, "response": answer.replace("#### ", GSM8K_MARKER), "label": final}


def _gsm8k(root, split):
    _check_split("gsm8k", split, ("train", "test"))
    return [_gsm8k_row(r["question"], r["answer"]) for r in _jsonl(_hft(root) / "gsm8k" / f"{split}.jsonl")]


def _alpaca(root, split):
    _check_split("alpaca", split, ("train", "test"))
    rows = _json(_hft(root) / "alpaca_eval" / "alpaca_eval_gpt4_805.json")
    rows = rows[:ALPACA_TRAIN] if split == "train" else rows[ALPACA_TRAIN:]
    return [{"prompt": r["instruction"], "response": r["output"], "label": r["output"]} for r in rows]


_REDTEAM = Path("redteam_prompts")


def _prompts(rows: list[str]) -> list[dict]:
    return [{"prompt": p} for p in rows]


def _redteam(filename: str, field: str | None, keep: Callable[[dict], bool] | None = None) -> Callable:
    def read(root, split):
        _check_split(filename, split, ("test",))
        path = _hft(root) / _REDTEAM / filename
        if filename.endswith(".csv"):
            return _prompts([r[field] for r in _csv(path) if keep is None or keep(r)])
        if filename.endswith(".jsonl"):
            return _prompts([r[field] for r in _jsonl(path)])
        return _prompts(_json(path)["instructions"])

    return read


LOCAL: dict[str, Callable] = {
    "beavertails": _beavertails,
    "refusals": _refusals,
    "harmful_qa": _harmful_qa,
    "sst2": _sst2,
    "agnews": _agnews,
    "gsm8k": _gsm8k,
    "alpaca": _alpaca,
    # HarmBench's standard behaviours: the contextual ones need their context string and the
    # copyright ones a hash-based judge, neither of which this judge has.
    "harmbench": _redteam("harmbench_behaviors_text_test.csv", "Behavior",
                          lambda r: r.get("FunctionalCategory", "standard") == "standard"),
    "advbench": _redteam("advbench_harmful_behaviors_520.csv", "goal"),
    "strongreject": _redteam("strongreject_313.csv", "forbidden_prompt"),
    "donotanswer": _redteam("donotanswer_939.jsonl", "prompt"),
    "stl_malicious": _redteam("I-MaliciousInstructions.json", None),
    "stl_cona": _redteam("I-CoNa.json", None),
    "stl_controversial": _redteam("I-Controversial.json", None),
    "stl_physical_unsafe": _redteam("I-PhysicalSafetyUnsafe.json", None),
    "stl_qharm": _redteam("Q-Harm.json", None),
}

# Sets of harmful instructions the harmful score is measured on (`--hs-sets`); the default three
# are the papers' BeaverTails, HarmBench and StrongREJECT (our stand-in for SORRY-Bench).
HARMFUL_EVAL_SETS = ("beavertails", "harmbench", "strongreject", "advbench", "donotanswer", "stl_malicious",
                     "stl_cona", "stl_controversial", "stl_physical_unsafe", "stl_qharm")
DEFAULT_HS_SETS = ("beavertails", "harmbench", "strongreject")

DEFAULT_SPLIT = {name: "test" for name in LOCAL}
DEFAULT_SPLIT.update(
    {"beavertails": "train", "refusals": "train", "harmful_qa": "train", "sst2": "train",
     "agnews": "train", "gsm8k": "train", "alpaca": "train"}
)


# ---------------------------------------------------------------- hub readers (users online)
# The canonical hub dataset of each named source that has one (what a study's `hub_datasets` names).
HUB_IDS = {"beavertails": "PKU-Alignment/BeaverTails", "sst2": "stanfordnlp/sst2", "agnews": "fancyzhx/ag_news",
           "gsm8k": "openai/gsm8k", "alpaca": "tatsu-lab/alpaca"}
_from_hub: frozenset[str] = frozenset()  # sources read from the hub inside `hub_sources`


def check_hub_datasets(hub_ids: Iterable[str], label: str = "hub_datasets") -> None:
    """Every id must be a hub dataset with a reader here (`HUB_IDS`); else one clear error."""
    for hub_id in hub_ids:
        if hub_id not in HUB_IDS.values():
            raise SinkguardError(f"{label}: unknown {hub_id!r}; valid: {', '.join(HUB_IDS.values())}")


@contextlib.contextmanager
def hub_sources(hub_ids: Iterable[str]) -> Iterator[None]:
    """Inside the block, every source whose hub dataset is in `hub_ids` (see `HUB_IDS`) is read from the
    hub, and only those (`hub_sources(())` reads everything from the data root)."""
    global _from_hub
    ids = set(hub_ids)
    check_hub_datasets(ids)
    previous, _from_hub = _from_hub, frozenset(n for n, hub_id in HUB_IDS.items() if hub_id in ids)
    try:
        yield
    finally:
        _from_hub = previous


def _hub(name: str, split: str) -> list[dict]:
    """The canonical hub datasets the papers use; needs internet and the `datasets` package."""
    from datasets import load_dataset

    if name == "beavertails":
        hub_split = {"train": "30k_train", "test": "30k_test"}.get(split, split)
        ds = load_dataset(HUB_IDS[name], split=hub_split)
        return [{"prompt": r["prompt"], "response": r["response"], "is_safe": r["is_safe"],
                 "split": split} for r in ds]
    if name == "sst2":
        ds = load_dataset(HUB_IDS[name], split={"test": "validation"}.get(split, split))
        return [_sst2_row(r["sentence"], r["label"]) for r in ds]
    if name == "agnews":
        ds = load_dataset(HUB_IDS[name], split=split)
        names = ["World", "Sports", "Business", "Sci/Tech"]
        return [_agnews_row(r["text"], names[r["label"]]) for r in ds]
    if name == "gsm8k":
        return [_gsm8k_row(r["question"], r["answer"]) for r in load_dataset(HUB_IDS[name], "main", split=split)]
    if name == "alpaca":
        ds = load_dataset(HUB_IDS[name], split="train")
        return [_with_input(r["instruction"], r["input"], {"response": r["output"], "label": r["output"]})
                for r in ds]
    raise SinkguardError(f"{name} has no hub source; put its file under the data root")


@functools.lru_cache(maxsize=16)
def _load_hub(name: str, split: str) -> tuple[dict, ...]:
    """Read once per process (a grid reads the same sets many times); a failed download is one clear error."""
    try:
        rows = _hub(name, split)
    except SinkguardError:
        raise
    except Exception as exc:  # datasets raises many kinds (offline, missing, gated, not installed)
        raise SinkguardError(f"hub dataset {HUB_IDS.get(name, name)} ({name}, split {split}) could not be "
                             f"loaded; it needs internet and the datasets package ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
    return tuple(_validate(name, rows))


def load_source(
    name: str, split: str | None = None, root: str | os.PathLike | None = None, hub: bool = False,
    keep_eval_prompts: bool = False,
) -> list[dict]:
    """Rows of a named source (see `LOCAL`), from the data root, or from the hub if `hub` (or inside
    `hub_sources` naming its hub dataset).

    A `train` split never holds a prompt the harmful score is evaluated on: rows whose normalised
    prompt is in any set of `HARMFUL_EVAL_SETS` are dropped (`keep_eval_prompts=True` keeps
    them; `dropped_training_rows` reports the counts). Rows are shared with a per-process cache:
    copy a row before changing it.
    """
    if name not in LOCAL:
        raise SinkguardError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOCAL))}")
    split = split or DEFAULT_SPLIT[name]
    if hub or name in _from_hub:
        rows = list(_load_hub(name, split))
        if split == "train" and not keep_eval_prompts:
            index = eval_prompt_index(str(data_root(root))) if _has_root(root) else {}
            rows = [r for r in rows if normalize_prompt(r["prompt"]) not in index]
        return rows
    root = str(data_root(root))
    if split == "train" and not keep_eval_prompts:
        return list(_load_training(name, root))
    return list(_load_local(name, split, root))


def _has_root(root) -> bool:
    try:
        data_root(root)
    except SinkguardError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _load_local(name: str, split: str, root: str) -> tuple[dict, ...]:
    """Parsed once per process: a grid reads the same files many times."""
    try:
        rows = LOCAL[name](root, split)
    except FileNotFoundError as exc:
        raise SinkguardError(
            f"dataset {name!r}: {exc.args[0]} is missing under the data root; pass --data-root "
            f"or set {ENV}, or use the hub source (hub=True) when online"
        ) from None
    except (KeyError, TypeError, ValueError) as exc:  # a row without the fields its reader needs
        raise SinkguardError(f"dataset {name!r} under {root} has a row without the expected fields ({exc!r}); "
                             "restore its file") from None
    return tuple(_validate(name, rows))


@functools.lru_cache(maxsize=32)
def _load_training(name: str, root: str) -> tuple[dict, ...]:
    """A train split less the rows whose prompt is an evaluation prompt (logged once)."""
    rows = _load_local(name, "train", root)
    index = eval_prompt_index(root)
    kept = tuple(r for r in rows if normalize_prompt(r["prompt"]) not in index)
    if len(kept) < len(rows):
        log.debug("%s train: %d of %d rows dropped, their prompt is an evaluation prompt", name,
                 len(rows) - len(kept), len(rows))
    return kept


_NON_WORD = re.compile(r"[^\w\s]")


def normalize_prompt(text: str) -> str:
    """Lowercased, punctuation dropped, whitespace collapsed: the key deduplication compares."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def eval_prompts(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Every prompt of a harmful evaluation set (beavertails: its test split's unsafe prompts)."""
    if name not in HARMFUL_EVAL_SETS:
        raise SinkguardError(f"unknown harmful prompt set {name!r}; known: {', '.join(sorted(HARMFUL_EVAL_SETS))}")
    if name == "beavertails":
        return [r["prompt"] for r in load_source("beavertails", "test", root) if not r["is_safe"]]
    return [r["prompt"] for r in load_source(name, None, root)]


@functools.lru_cache(maxsize=4)
def eval_prompt_index(root: str) -> dict[str, str]:
    """Normalised prompt -> the first evaluation set holding it, over every set present in `root`."""
    index: dict[str, str] = {}
    for name in HARMFUL_EVAL_SETS:
        try:
            prompts = eval_prompts(name, root)
        except SinkguardError:  # a set missing from this data root is never evaluated on either
            continue
        for prompt in prompts:
            index.setdefault(normalize_prompt(prompt), name)
    return index


def dropped_training_rows(root: str | os.PathLike | None = None) -> list[dict]:
    """Per (training source, evaluation set): rows dropped because they hold an evaluation prompt.

    Rows of `train` splits of every source, with the total before and after; the doc table of
    docs/results/dedup.md is made from this.
    """
    root = str(data_root(root))
    index = eval_prompt_index(root)
    report = []
    for name in sorted(set(LOCAL) - set(HARMFUL_EVAL_SETS) | {"beavertails"}):
        try:
            rows = _load_local(name, "train", root)
        except SinkguardError:
            continue
        hits: dict[str, int] = {}
        for r in rows:
            where = index.get(normalize_prompt(r["prompt"]))
            if where:
                hits[where] = hits.get(where, 0) + 1
        for eval_set, n in sorted(hits.items()) or [("-", 0)]:
            report.append({"source": name, "split": "train", "eval_set": eval_set, "dropped": n,
                           "rows": len(rows), "kept": len(rows) - sum(hits.values())})
    return report


def _validate(name: str, rows: list[dict]) -> list[dict]:
    """Fail with the first bad row (missing or empty text) rather than train on garbage."""
    for i, row in enumerate(rows):
        for key in ("prompt", "response"):
            if key in row or key == "prompt":
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise SinkguardError(f"dataset {name!r} row {i}: field {key!r} is missing or empty")
    if not rows:
        raise SinkguardError(f"dataset {name!r} is empty")
    return rows
