"""One model's evaluation in a study, in two cached layers so a new judge costs no generation.

- Generations: `OUT/hs_<set>.jsonl`, `OUT/benign_alpaca.jsonl`, `OUT/fa_<task>.jsonl` and the
  judge-free results (FA, sink divergence) in `OUT/eval.json`. `OUT` is keyed by the model and
  the generation settings (the caller's stage hash); `generate` also checks every row's weights
  fingerprint, decoding and rendered input.
- Verdicts: `OUT/verdicts-<judge identity>/` holds the judged rows and `verdicts.json` (HS per set
  and pooled, intervals, corrected HS, over-refusal), keyed by the judge's identity, which every
  result records. Scoring again with another judge reads the cached answers and generates nothing.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SinkguardError
from ..io import write_json, write_jsonl
from .generation import read_generations

if TYPE_CHECKING:
    from ..config import EvaluationConfig

log = logging.getLogger(__name__)

FORMAT = 2  # eval.json layout: generations and judge-free results only


def _read_json(path: Path) -> dict | None:
    import json

    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable: computing it again", path)
        return None


def evaluation_config(settings: EvaluationConfig | Mapping) -> EvaluationConfig:
    """`settings` as a validated `EvaluationConfig` (a mapping is read as a YAML `evaluation` section)."""
    from ..config import EvaluationConfig, from_dict

    if isinstance(settings, EvaluationConfig):
        return settings
    return from_dict(EvaluationConfig, dict(settings), "evaluation")


def generate_answers(
    model_path: str, out: str | os.PathLike, task: str, settings: EvaluationConfig | Mapping, data_root=None,
    benign_exclude: Sequence[str] = (),
) -> dict:
    """Generate (or reuse) every answer one model gives in a study; FA and sink divergence beside.

    `settings`: the study's `EvaluationConfig` (or its YAML mapping): hs_sets, hs_limit,
    benign_limit, fa_limit, max_new_tokens, fa_max_new_tokens, batch_size, template, system
    prompts, FA parsing, analyze_samples.
    """
    from ..data.mixing import benign_eval_prompts
    from ..models import load_model, load_tokenizer
    from .generation import generate
    from .metrics import finetune_accuracy, harmful_eval_prompts

    e = evaluation_config(settings)
    out = Path(out)
    done = _read_json(out / "eval.json")
    if done and done.get("format") == FORMAT:
        return done
    start = time.time()
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    common = dict(batch_size=e.batch_size, template=e.template)
    sets = {}
    for name in e.hs_sets:
        prompts = harmful_eval_prompts(name, e.hs_limit, data_root)
        generate(model, tokenizer, prompts, max_new_tokens=e.max_new_tokens, system_prompt=e.hs_system_prompt(),
                 out_path=out / f"hs_{name}.jsonl", desc=f"HS {name}", **common)
        sets[name] = len(prompts)
    benign = 0
    if e.benign_limit:
        prompts = benign_eval_prompts(e.benign_limit, data_root, benign_exclude)
        generate(model, tokenizer, prompts, max_new_tokens=e.max_new_tokens, system_prompt=e.hs_system_prompt(),
                 out_path=out / "benign_alpaca.jsonl", desc="benign", **common)
        benign = len(prompts)
    fa = finetune_accuracy(model, tokenizer, task, limit=e.fa_limit, data_root=data_root, out_dir=out,
                           max_new_tokens=e.fa_max_new_tokens, system_prompt=e.fa_system_prompt(), match=e.match,
                           aliases=e.label_aliases, fallback_last_number=e.number_fallback, **common)
    del model
    result = {"format": FORMAT, "model": str(model_path), "task": task, "hs_sets": sets, "benign_n": benign,
              "fa": fa}
    if e.analyze_samples:
        from ..sink import analyze

        sink = analyze(model_path, out, samples=e.analyze_samples, data_root=data_root, template=e.template)
        result |= {k: sink[k] for k in ("positive_heads", "total_heads", "mean_divergence", "divergence")}
    result["wall_s"] = round(time.time() - start, 1)
    write_json(out / "eval.json", result)
    return result


def _safe(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[:80]


def _answers_kept(out: Path, gen: dict) -> bool:
    files = [f"hs_{name}.jsonl" for name in gen.get("hs_sets", {})] + (["benign_alpaca.jsonl"] if gen.get("benign_n")
                                                                       else [])
    return all((out / name).is_file() for name in files)


def answered(out: str | os.PathLike, judge) -> bool:
    """Whether the evaluation in `out` finishes without its model: its generations' results are cached,
    and so are the answers or the judge's verdicts on them (answers not kept, e.g. a committed study).
    `judge`: the judge, or a function returning it (called only when the verdicts decide)."""
    from .metrics import judge_identity

    out = Path(out)
    gen = _read_json(out / "eval.json")
    if not gen or gen.get("format") != FORMAT:
        return False
    if _answers_kept(out, gen):
        return True
    identity = judge_identity(judge() if inspect.isfunction(judge) or inspect.ismethod(judge) else judge)
    return (out / f"verdicts-{_safe(identity)}" / "verdicts.json").is_file()


def score_answers(
    out: str | os.PathLike, judge, correction_source: str | None = "beavertails", is_refusal=None,
) -> dict:
    """Judge (or reuse the verdicts on) the answers cached in `out` by `generate_answers`."""
    from .metrics import judge_identity, pooled_hs, score_benign, score_harmful

    out = Path(out)
    gen = _read_json(out / "eval.json")
    if not gen or gen.get("format") != FORMAT:
        raise SinkguardError(f"{out} holds no finished generations: run the evaluation first")
    identity = judge_identity(judge)
    vdir = out / f"verdicts-{_safe(identity)}"
    settings = {"correction_source": correction_source}
    done = _read_json(vdir / "verdicts.json")
    if done and done.get("judge") == identity and done.get("settings") == settings:
        return done
    start = time.time()
    hs = {}
    for name in gen["hs_sets"]:
        rows = read_generations(out / f"hs_{name}.jsonl")
        summary, judged = score_harmful([r["prompt"] for r in rows], [r["response"] for r in rows], judge,
                                        is_refusal, correction_source)
        write_jsonl(vdir / f"hs_{name}.judged.jsonl", judged)
        hs[name] = summary
    if len(hs) > 1:
        hs["all"] = pooled_hs(hs, judge, correction_source)
    benign = None
    if gen.get("benign_n"):
        rows = read_generations(out / "benign_alpaca.jsonl")
        benign, judged = score_benign([r["prompt"] for r in rows], [r["response"] for r in rows], judge, is_refusal)
        write_jsonl(vdir / "benign_alpaca.judged.jsonl", judged)
    result = {"judge": identity, "settings": settings, "hs": hs, "benign": benign,
              "wall_s": round(time.time() - start, 1)}
    write_json(vdir / "verdicts.json", result)
    return result


def evaluate_model(
    model_path: str, out: str | os.PathLike, task: str, settings: EvaluationConfig | Mapping, judge,
    data_root=None, benign_exclude: Sequence[str] = (),
) -> dict:
    """Generations (cached per model and settings) + verdicts (cached per judge), merged."""
    e = evaluation_config(settings)
    if not answered(out, judge):  # answers not kept and not judged by this judge: generate them again
        Path(out, "eval.json").unlink(missing_ok=True)
    gen = generate_answers(model_path, out, task, e, data_root, benign_exclude)
    verdicts = score_answers(out, judge, e.correction_source)
    return gen | {"hs": verdicts["hs"], "benign": verdicts["benign"], "judge": verdicts["judge"],
                  "wall_s": gen["wall_s"], "judge_wall_s": verdicts["wall_s"]}
