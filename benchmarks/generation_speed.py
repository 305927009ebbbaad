"""Generations per second of the evaluation's greedy decoding: what batching, length sorting and
dropping finished rows buy.

All variants run in this one invocation, on the bundled model, at one thread, on the same prompts
(half harmful BeaverTails test prompts, half benign AlpacaEval ones, so answer lengths vary as in
a study), all greedy with a KV cache:
  one_by_one        batch size 1, transformers' generate (the baseline)
  file_order        batches of --batch in the prompts' own order, transformers' generate
  length_sorted     batches of --batch, longest prompt first, transformers' generate (rows stay
                    in the batch until its longest answer ends): `sinkguard.evaluate.generate`
  shrinking_sorted  the same batches; a row leaves the batch and KV cache when it ends
                    (`generate(decoder="shrinking")`)
Rounds interleave the variants so machine load hits all alike; the best round of each counts.
Usage: python benchmarks/generation_speed.py [--prompts 32] [--batch 16] [--max-new-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

VARIANTS = ("one_by_one", "file_order", "length_sorted", "shrinking_sorted")


def prompts(n: int) -> list[str]:
    """`n` prompts alternating harmful (BeaverTails test) and benign (AlpacaEval held-out)."""
    from sinkguard.data import benign_eval_prompts, harmful_eval_prompts

    harmful, benign = harmful_eval_prompts("beavertails", n), benign_eval_prompts(n)
    return [p for pair in zip(harmful, benign, strict=True) for p in pair][:n]


def run(variant: str, model, ids: list[list[int]], batch: int, max_new_tokens: int, pad: int,
        eos: list[int]) -> tuple[float, dict[int, list[int]]]:
    """Seconds to answer every prompt with `variant`'s batching, and the answers by index."""
    from sinkguard.evaluate.generation import _generate_batch

    order = list(range(len(ids)))
    if variant.endswith("_sorted"):
        order.sort(key=lambda i: (-len(ids[i]), i))
    size = 1 if variant == "one_by_one" else batch
    decoder = "shrinking" if variant == "shrinking_sorted" else "hf"
    answers = {}
    start = time.perf_counter()
    for k in range(0, len(order), size):
        chunk = order[k:k + size]
        for i, out in zip(chunk, _generate_batch(model, [ids[i] for i in chunk], max_new_tokens, pad, eos, decoder),
                          strict=True):
            answers[i] = out
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sinkguard.evaluate.generation import _eos_ids, encode_prompt, render_prompt
    from sinkguard.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    ids = [encode_prompt(tok, render_prompt(tok, p)) for p in prompts(args.prompts)]
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    best: dict[str, float] = {}
    answers: dict[str, dict[int, list[int]]] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            seconds, answers[variant] = run(variant, model, ids, args.batch, args.max_new_tokens, pad, eos)
            best[variant] = min(best.get(variant, float("inf")), seconds)
    rate = {v: args.prompts / best[v] for v in VARIANTS}
    new_tokens = {v: sum(len(a) for a in answers[v].values()) for v in VARIANTS}
    same = {v: sum(answers[v][i] == answers["one_by_one"][i] for i in range(len(ids))) / len(ids) for v in VARIANTS}
    result = {
        "model": args.model, "prompts": args.prompts, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(), "seconds": best, "generations_per_s": rate, "new_tokens": new_tokens,
        "answers_equal_to_one_by_one": same,
        "speedup_length_sorted_vs_one_by_one": rate["length_sorted"] / rate["one_by_one"],
        "speedup_length_sorted_vs_file_order": rate["length_sorted"] / rate["file_order"],
        "speedup_shrinking_vs_length_sorted": rate["shrinking_sorted"] / rate["length_sorted"],
        "speedup_shrinking_vs_one_by_one": rate["shrinking_sorted"] / rate["one_by_one"],
    }
    if args.json:
        print(json.dumps(result))
        return
    for v in VARIANTS:
        print(f"{v:14s} {best[v]:7.1f} s  {rate[v]:6.3f} generations/s  {new_tokens[v]} new tokens  "
              f"{100 * same[v]:.0f}% answers equal to one_by_one")
    print(f"length_sorted vs one_by_one: {result['speedup_length_sorted_vs_one_by_one']:.2f}x; "
          f"vs file_order: {result['speedup_length_sorted_vs_file_order']:.2f}x; shrinking_sorted vs "
          f"length_sorted: {result['speedup_shrinking_vs_length_sorted']:.2f}x, vs one_by_one: "
          f"{result['speedup_shrinking_vs_one_by_one']:.2f}x")


if __name__ == "__main__":
    main()
