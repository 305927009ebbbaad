"""`sinkguard evaluate`: harmful score on harmful prompt sets and fine-tune accuracy on a task."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import SinkguardError
from .common import add_data_root, add_model


def hs_set_names() -> list[str]:
    """Names accepted by `--hs-sets`."""
    from ..data.sources import HARMFUL_EVAL_SETS

    return sorted(HARMFUL_EVAL_SETS)


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="harmful score (HS) and fine-tune accuracy (FA) of a model",
        description="Greedy answers to harmful prompts judged by the harmfulness judge (HS, with the "
                    "keyword refusal rate beside it) and to a task's test split (FA). Answers are "
                    "written to OUT as they come: rerun the same command to resume.",
    )
    add_model(p, default=None)
    add_data_root(p)
    p.add_argument("--hs-sets", default="beavertails,harmbench,strongreject",
                   help="comma-separated harmful prompt sets, or 'none' (default %(default)s; known: "
                        "beavertails = the test split's unsafe prompts, harmbench = its standard behaviours, "
                        "strongreject, advbench, donotanswer, stl_*); several sets are also pooled as 'all'")
    p.add_argument("--task", choices=["sst2", "agnews", "gsm8k", "alpaca"], default=None,
                   help="task for FA (alpaca: answers only, AlpacaEval needs a GPT-4 judge)")
    p.add_argument("--limit", type=int, default=100,
                   help="first N prompts of each HS set (default %(default)s: 300 prompts over the default sets)")
    p.add_argument("--benign-limit", type=int, default=200,
                   help="benign AlpacaEval prompts for the over-refusal rate (default %(default)s; 0: none)")
    p.add_argument("--correction-source", default="beavertails",
                   help="judge source whose sensitivity/specificity correct the HS (default %(default)s)")
    p.add_argument("--fa-limit", type=int, default=None, help="first N test rows for FA (default all)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length cap for HS and FA (default: official lengths, HS 512, "
                        "SST2/AG News 10, GSM8K 512)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default %(default)s)")
    p.add_argument("--template", choices=["chat", "alpaca"], default="chat",
                   help="prompt format: the model's chat template, or the official HS script's Alpaca prompt")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt for HS and FA (default: none for HS, 'You are a helpful assistant.' "
                        "for FA, as the official scripts; '' for none)")
    p.add_argument("--match", choices=["contains", "exact", "first"], default="contains",
                   help="SST2/AG News: label word in the answer (official), whole answer equal to it, "
                        "or first label word named")
    p.add_argument("--label-aliases", action="store_true",
                   help="AG News: also accept spelled-out 'Sci/Tech' forms (Science and Technology, ...)")
    p.add_argument("--no-number-fallback", action="store_true",
                   help="GSM8K: score answers without 'The final answer is: N' as wrong (official: last number)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--overwrite", action="store_true",
                   help="discard answers in OUT generated under other settings instead of stopping")
    p.add_argument("--out", required=True, help="output folder: hs_*.jsonl, fa_*.jsonl, eval.json")
    p.add_argument("--json", action="store_true", help="print eval.json as one JSON object on stdout")
    p.set_defaults(func=run)


def _parse_sets(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if [n.lower() for n in names] in ([], ["none"]):
        return []
    known = hs_set_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SinkguardError(f"unknown harmful prompt set(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _check(args: argparse.Namespace) -> None:
    if args.benign_limit < 0:
        raise SinkguardError(f"--benign-limit must be >= 0, got {args.benign_limit}")
    for flag in ("limit", "fa_limit", "max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SinkguardError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.template == "alpaca" and args.system_prompt:
        raise SinkguardError("--system-prompt needs --template chat (the Alpaca prompt has no system turn)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate.generation import write_json
    from ..evaluate.judge import load_judge
    from ..evaluate.metrics import (
        FA_SYSTEM_PROMPT,
        HS_MAX_NEW_TOKENS,
        benign_refusal,
        finetune_accuracy,
        harmful_score,
        judge_identity,
    )
    from ..models import load_model, load_tokenizer

    sets = _parse_sets(args.hs_sets)
    _check(args)
    if not sets and not args.task and not args.benign_limit:
        raise SinkguardError("nothing to evaluate: give --hs-sets and/or --task")
    hs_system = args.system_prompt or None
    if args.system_prompt is not None:
        fa_system = args.system_prompt or None
    else:
        fa_system = None if args.template == "alpaca" else FA_SYSTEM_PROMPT
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    out = Path(args.out)
    start = time.time()
    model = load_model(args.model, dtype=args.dtype, device=device)
    tokenizer = load_tokenizer(args.model)
    common = dict(data_root=args.data_root, out_dir=out, batch_size=args.batch_size, template=args.template,
                  overwrite=args.overwrite)
    judge = load_judge(auto_train=True, root=args.data_root) if sets or args.benign_limit else None
    hs = harmful_score(model, tokenizer, sets, judge=judge, limit=args.limit, system_prompt=hs_system,
                       max_new_tokens=args.max_new_tokens or HS_MAX_NEW_TOKENS,
                       correction_source=args.correction_source, **common) if sets else {}
    benign = benign_refusal(model, tokenizer, judge=judge, limit=args.benign_limit, system_prompt=hs_system,
                            max_new_tokens=args.max_new_tokens or HS_MAX_NEW_TOKENS,
                            **common) if args.benign_limit else None
    fa = finetune_accuracy(model, tokenizer, args.task, limit=args.fa_limit, system_prompt=fa_system,
                           max_new_tokens=args.max_new_tokens, match=args.match, aliases=args.label_aliases,
                           fallback_last_number=not args.no_number_fallback, **common) if args.task else None
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
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "json", "verbose")}
                    | {"hs_system_prompt": hs_system, "fa_system_prompt": fa_system},
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
