"""How Antibody's paper-free hyper-parameters were chosen on the bundled model (cheaply).

Fine-tuning stage (forward passes only): for harmful rows (the defense harmful set, never the
attack rows) and benign SST2 train rows, r = log p(answer | prompt) - log p(refusal | prompt) per
candidate refusal text, summed or length-normalised; reports the AUROC of r (benign above harmful)
and, per tau, the harmful rows' share of the weight softmax(r / tau) in batches of 10 with one
harmful row (uniform: 0.1) and the effective number of benign rows 1 / sum(w^2) (of 9).

Alignment stage (`--alignment`): Antibody's step at the start of a LoRA alignment run (fresh
adapter, r 8 / alpha 4) on a few refusal batches, recording <g_s, g_a>, ||g_s||^2, ||g_a|| and
||g_r|| at rho = 0.1 (Booster's alpha): a_t is chosen so that lambda_t equals Booster's official
lambda (5) on the median batch, lambda_r from the ratio ||g_a|| / ||g_r||.
Usage: `python benchmarks/antibody_calibration.py [--rows 40] [--alignment --batches 4]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile

import torch

from sinkguard.data import (
    PadCollator,
    alignment_dataset,
    defense_harmful_set,
    encode_example,
    load_source,
)
from sinkguard.data.formatting import DEFAULT_SYSTEM_PROMPT
from sinkguard.defenses.antibody import (
    REFUSAL_TEXT,
    refusal_answer_ids,
    sequence_token_losses,
    with_refusal,
)
from sinkguard.errors import SinkguardError
from sinkguard.models import load_model, load_tokenizer

CANDIDATES = (REFUSAL_TEXT, "I'm sorry, but as an AI language model, I cannot help with that.",
              "I cannot help with that.")
TAUS = (0.1, 0.3, 1.0, 3.0, 10.0)


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(a positive scores above a negative), ties half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@torch.no_grad()
def log_probs(model, tokenizer, rows: list[dict], refusal: str, max_length: int) -> tuple[list, list, list, list]:
    """Per row: (sum log p(answer), answer tokens, sum log p(refusal), refusal tokens)."""
    pad = PadCollator(tokenizer.pad_token_id)
    ref_ids = refusal_answer_ids(tokenizer, refusal)
    out = ([], [], [], [])
    for i in range(0, len(rows), 8):
        chunk = [encode_example(tokenizer, r["prompt"], r["response"], DEFAULT_SYSTEM_PROMPT, max_length)
                 for r in rows[i:i + 8]]
        batch = pad(chunk)
        s, n = sequence_token_losses(model, batch)
        rs, rn = sequence_token_losses(model, with_refusal(batch, ref_ids, tokenizer.pad_token_id))
        for dest, src in zip(out, (-s, n, -rs, rn)):
            dest.extend(src.tolist())
    return out


def finetuning(model, tokenizer, n: int, max_length: int, seed: int) -> dict:
    harmful = defense_harmful_set(n)
    benign = random.Random(seed).sample(load_source("sst2", "train"), n)
    rng = random.Random(seed + 1)
    result = {}
    for refusal in CANDIDATES:
        h = log_probs(model, tokenizer, harmful, refusal, max_length)
        b = log_probs(model, tokenizer, benign, refusal, max_length)
        for norm in (False, True):
            def score(v, i, norm=norm):
                return v[0][i] / v[1][i] - v[2][i] / v[3][i] if norm else v[0][i] - v[2][i]
            rh = [score(h, i) for i in range(len(harmful))]
            rb = [score(b, i) for i in range(len(benign))]
            row = {"auroc": round(auroc(rb, rh), 3), "r_benign_median": round(statistics.median(rb), 2),
                   "r_harmful_median": round(statistics.median(rh), 2), "tau": {}}
            for tau in TAUS:
                shares, ess = [], []
                for _ in range(200):
                    batch = torch.tensor([rng.choice(rh)] + rng.sample(rb, 9))
                    w = torch.softmax(batch / tau, 0)
                    shares.append(float(w[0]))
                    wb = w[1:] / w[1:].sum()
                    ess.append(float(1 / (wb ** 2).sum()))
                row["tau"][tau] = {"harmful_share": round(statistics.mean(shares), 4),
                                   "benign_ess": round(statistics.mean(ess), 2)}
            result[f"{refusal} | {'mean' if norm else 'sum'}"] = row
    return result


def alignment(model_name: str, tokenizer, batches: int, max_length: int, seed: int) -> dict:
    from peft import get_peft_model

    from sinkguard.defenses import get_defense
    from sinkguard.train import lora_config, make_config

    torch.manual_seed(seed)
    model = get_peft_model(load_model(model_name), lora_config(r=8, alpha=4, dropout=0.1))
    spec = get_defense("antibody", "alignment")
    with tempfile.TemporaryDirectory() as tmp:
        args = make_config("antibody", "alignment", tmp, per_device_train_batch_size=8, max_length=max_length,
                           save_strategy="no", disable_tqdm=True, seed=seed, a_t=0.0, lambda_r=0.0, rho=0.1)
        extra = spec.trainer_cls.defense_inputs(args, tokenizer, None)
        trainer = spec.trainer_cls(model=model, args=args, train_dataset=[{"input_ids": [0]}],
                                   data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                                   **extra)
        trainer.current_gradient_accumulation_steps = 1
        rows = alignment_dataset(8 * batches)
        pad = PadCollator(tokenizer.pad_token_id)
        for k in range(batches):
            batch = pad([encode_example(tokenizer, r["prompt"], r["response"], DEFAULT_SYSTEM_PROMPT, max_length)
                         for r in rows[8 * k:8 * k + 8]])
            trainer.state.global_step = k
            trainer.training_step(trainer.model, dict(batch))
            trainer.model.zero_grad(set_to_none=True)
        rec = trainer._extra
    dot, sq = rec["gs_dot_ga"], [n ** 2 for n in rec["gs_norm"]]
    a_t = statistics.median(d + 5.0 * s for d, s in zip(dot, sq))
    ratio = statistics.median(a / r for a, r in zip(rec["alignment_grad_norm"], rec["refusal_grad_norm"]))
    return {"gs_dot_ga": dot, "gs_norm_sq": sq, "alignment_grad_norm": rec["alignment_grad_norm"],
            "refusal_grad_norm": rec["refusal_grad_norm"], "harmful_loss_drop": rec["harmful_loss_drop"],
            "a_t_for_lambda_5": a_t, "alignment_over_refusal_grad_norm": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=40, help="harmful and benign rows each (fine-tuning part)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--alignment", action="store_true", help="also measure the alignment-stage gradients")
    p.add_argument("--batches", type=int, default=4, help="alignment batches of 8 (with --alignment)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=43)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    try:
        tokenizer = load_tokenizer(a.model)
        model = load_model(a.model).eval()
        out = {"model": a.model, "finetuning": finetuning(model, tokenizer, a.rows, a.max_length, a.seed)}
        if a.alignment:
            out["alignment"] = alignment(a.model, tokenizer, a.batches, a.max_length, a.seed)
    except SinkguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
