"""`sinkguard evaluate`: harmful score on harmful prompt sets and fine-tune accuracy on a task."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ..config import EvaluationConfig, add_config_args, hs_set_names
from ..errors import SinkguardError
from .common import add_data_root, add_model

__all__ = ["hs_set_names", "register", "run"]


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="harmful score (HS) and fine-tune accuracy (FA) of a model",
        description="Greedy answers to harmful prompts judged by the harmfulness judge (HS, with the "
                    "keyword refusal rate beside it) and to a task's test split (FA). Answers are "
                    "written to OUT as they come: rerun the same command to resume. Defaults are the "
                    "CPU-scale values of the shipped configs' evaluation section.",
    )
    add_model(p, default=None)
    add_data_root(p)
    from ..data import TASKS

    p.add_argument("--task", choices=TASKS, default=None,
                   help="task for FA (alpaca: answers only, AlpacaEval needs a GPT-4 judge)")
    add_config_args(p, EvaluationConfig)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--overwrite", action="store_true",
                   help="discard answers in OUT generated under other settings instead of stopping")
    p.add_argument("--out", required=True, help="output folder: hs_*.jsonl, fa_*.jsonl, eval.json")
    p.add_argument("--json", action="store_true", help="print eval.json as one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import config_from_args
    from ..evaluate.judge import load_judge
    from ..evaluate.metrics import benign_refusal, finetune_accuracy, harmful_score, judge_identity
    from ..io import write_json
    from ..models import load_model, load_tokenizer

    e = config_from_args(EvaluationConfig, args)
    sets = e.hs_sets
    if not sets and not args.task and not e.benign_limit:
        raise SinkguardError("nothing to evaluate: give --hs-sets, --benign-limit N and/or --task")
    hs_system, fa_system = e.hs_system_prompt(), e.fa_system_prompt()
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    out = Path(args.out)
    start = time.time()
    model = load_model(args.model, dtype=args.dtype, device=device)
    tokenizer = load_tokenizer(args.model)
    common = dict(data_root=args.data_root, out_dir=out, batch_size=e.batch_size, template=e.template,
                  overwrite=args.overwrite)
    judge = load_judge(auto_train=True, root=args.data_root) if sets or e.benign_limit else None
    hs = harmful_score(model, tokenizer, sets, judge=judge, limit=e.hs_limit, system_prompt=hs_system,
                       max_new_tokens=e.max_new_tokens, correction_source=e.correction_source,
                       **common) if sets else {}
    benign = benign_refusal(model, tokenizer, judge=judge, limit=e.benign_limit, system_prompt=hs_system,
                            max_new_tokens=e.max_new_tokens, **common) if e.benign_limit else None
    fa = finetune_accuracy(model, tokenizer, args.task, limit=e.fa_limit, system_prompt=fa_system,
                           max_new_tokens=e.fa_max_new_tokens, match=e.match, aliases=e.label_aliases,
                           fallback_last_number=e.number_fallback, **common) if args.task else None
    result = {
        "model": args.model,
        "hs": {name: r["hs"] for name, r in hs.items()},
        "refusal_rate": {name: r["refusal_rate"] for name, r in hs.items()},
        "hs_interval": {name: [r["hs_lo"], r["hs_hi"]] for name, r in hs.items()},
        "hs_corrected": {name: [r["hs_corrected"], r["hs_corrected_lo"], r["hs_corrected_hi"]]
                         for name, r in hs.items()},
        "benign": {k: v for k, v in benign.items() if k != "flags"} if benign else None,
        "judge": judge_identity(judge) if judge is not None else None,
        "task": args.task,
        "fa": fa["fa"] if fa else None,
        "counts": {"hs": {name: {k: r.get(k) for k in ("n", "n_harmful", "n_refusals", "mean_score")}
                          for name, r in hs.items()},
                   "fa": {k: fa[k] for k in ("n", "n_correct")} if fa else None},
        "notes": [fa["note"]] if fa and fa.get("note") else [],
        "settings": {"model": args.model, "task": args.task, "data_root": args.data_root, "device": args.device,
                     "dtype": args.dtype, **dataclasses.asdict(e),
                     "hs_system_prompt": hs_system, "fa_system_prompt": fa_system},
        "wall_s": round(time.time() - start, 1),
    }
    write_json(out / "eval.json", result)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, r in hs.items():
        corrected = (f", corrected {r['hs_corrected']:.1f}% [{r['hs_corrected_lo']:.1f}, {r['hs_corrected_hi']:.1f}]"
                     if r["hs_corrected"] is not None else "")
        print(f"HS {name}: {r['hs']:.1f}% [{r['hs_lo']:.1f}, {r['hs_hi']:.1f}] harmful ({r['n_harmful']}/{r['n']})"
              f"{corrected}, refusal rate {r['refusal_rate']:.1f}%")
    if benign:
        print(f"benign over-refusal: {benign['benign_refusal']:.1f}% [{benign['benign_refusal_lo']:.1f}, "
              f"{benign['benign_refusal_hi']:.1f}] keyword refusals on {benign['n']} AlpacaEval prompts")
    if fa:
        if fa["fa"] is None:
            print(f"FA {fa['task']}: none ({fa['note']})")
        else:
            print(f"FA {fa['task']}: {fa['fa']:.1f}% ({fa['n_correct']}/{fa['n']})")
    print(f"results in {out / 'eval.json'}")
    return 0
