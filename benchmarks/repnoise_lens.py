"""RepNoise's loss step with the LM head on the counted positions only, against the official
all-position computation, on real batches.

The logit lens (the LM head on each of the 31 hidden states) is most of RepNoise's cost. The
official `masked_token_ce_loss` runs the head on every position and then zeroes or ignores most of
them; `sinkguard` runs it only where a position counts (a target and unzeroed logits) and adds the
constant log(V) of the zeroed ones. Both are timed here on the same batches (the training's: the
alignment rows in random batches of 8 against fresh harmful batches, padded as in training), forward
and backward of the full RepNoise loss through the LoRA model, and their losses and LoRA gradients
compared. Usage: `python benchmarks/repnoise_lens.py [--batches 3] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.utils.checkpoint import checkpoint

from sinkguard.data import PadCollator, alignment_dataset, defense_harmful_set, encode_example
from sinkguard.data.formatting import DEFAULT_SYSTEM_PROMPT
from sinkguard.defenses import repnoise
from sinkguard.models import load_model, load_tokenizer
from sinkguard.train import lora_config


def all_positions_ce(head, hidden, mask, targets, vocab_size, use_checkpoint=True, token_chunk=0):
    """The official masked CE: the head on every position, logits zeroed where `mask[:, :-1]` is False."""
    keep = mask[:, :-1] if mask is not None else None

    def ce_sum(h, k):
        logits = head(h).float()
        if k is not None:
            logits = logits * k.unsqueeze(-1).to(logits.dtype)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")

    total = checkpoint(ce_sum, hidden[:, :-1], keep, use_reentrant=False) if use_checkpoint \
        else ce_sum(hidden[:, :-1], keep)
    return total / (targets != -100).sum().clamp(min=1)


def batches(tokenizer, n: int, size: int, max_length: int, seed: int) -> list[tuple[dict, dict]]:
    """`n` (harmful, alignment) batch pairs drawn as in training: random rows, padded to the longest."""
    rng = random.Random(seed)
    collate = PadCollator(tokenizer.pad_token_id)

    def batch(rows):
        return collate([encode_example(tokenizer, r["prompt"], r["response"], DEFAULT_SYSTEM_PROMPT, max_length)
                        for r in rng.sample(rows, size)])

    align, harmful = alignment_dataset(200), defense_harmful_set(None)
    return [(batch(harmful), batch(align)) for _ in range(n)]


def step(model, harmful, harmless) -> tuple[float, float, list[torch.Tensor]]:
    """(seconds, loss, LoRA gradients) of one forward and backward of the RepNoise loss."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    terms = repnoise.repnoise_terms(model, harmful, harmless, generator=torch.Generator().manual_seed(0))
    loss = repnoise.repnoise_loss(terms, 0.1, 0.001)
    loss.backward()
    seconds = time.perf_counter() - start
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    return seconds, loss.item(), grads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=43)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tokenizer = load_tokenizer(a.model)
    model = get_peft_model(load_model(a.model), lora_config(r=8, alpha=4, dropout=0.0))
    counted = total = 0
    times = {"all positions": 0.0, "counted positions": 0.0}
    worst = 0.0
    for harmful, harmless in batches(tokenizer, a.batches, a.batch_size, a.max_length, a.seed):
        mask, targets = repnoise.official_targets(harmful["input_ids"], harmless["input_ids"])
        counted += int(((targets != -100) & mask[:, :-1]).sum())
        total += targets.numel()
        fast = step(model, harmful, harmless)
        gathered = repnoise.masked_ce
        repnoise.masked_ce = all_positions_ce
        try:
            slow = step(model, harmful, harmless)
        finally:
            repnoise.masked_ce = gathered
        times["counted positions"] += fast[0]
        times["all positions"] += slow[0]
        assert abs(fast[1] - slow[1]) <= 1e-4 * max(1.0, abs(slow[1])), (fast[1], slow[1])
        for g_fast, g_slow in zip(fast[2], slow[2]):
            scale = g_slow.abs().max().item() or 1.0
            worst = max(worst, (g_fast - g_slow).abs().max().item() / scale)
    print(f"{a.batches} batch pairs of {a.batch_size} x <= {a.max_length} tokens, {a.threads} thread(s); "
          f"harmful positions through the head: {counted} of {total} ({100 * counted / total:.1f} %)")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds / a.batches:7.1f} s per step (forward + backward of the RepNoise loss)")
    print(f"speed-up: {times['all positions'] / times['counted positions']:.2f}x; "
          f"largest LoRA-gradient difference / largest gradient: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
