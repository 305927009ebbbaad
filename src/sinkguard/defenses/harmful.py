"""The harmful (prompt, harmful answer) set an alignment defense trains against, and its batches.

Booster, RepNoise and Antibody draw a harmful batch at every step besides the alignment batch.
The rows come from `sinkguard.data.defense_harmful_set` (BeaverTails train rows disjoint from
the attack rows and never from an evaluation split). Batches are a pure function of (seed, step,
micro-batch), so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import random

import torch

from ..data import PadCollator, defense_harmful_set, encode_example
from ..errors import SinkguardError


def harmful_rows(tokenizer, n: int, max_length: int, system_prompt: str | None,
                 data_root=None, template: str = "chat") -> list[dict]:
    """The first `n` rows of the defense harmful set (`n` = 0: all of them), tokenised like the
    alignment rows (the stage's template, loss on the answer only); rows with no answer token left are dropped."""
    if n < 0:
        raise SinkguardError(f"bad_sample_num must be >= 0 (0 = every available row), got {n}")
    rows = defense_harmful_set(n or None, data_root)
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], system_prompt, max_length, template)
               for r in rows]
    encoded = [e for e in encoded if any(label != -100 for label in e["labels"])]
    if not encoded:
        raise SinkguardError(f"no harmful example keeps an answer token within max_length={max_length}")
    return encoded


class HarmfulBatches:
    """Reproducible harmful batches.

    `cycle`: consecutive slices of a per-epoch shuffle, every row once per pass (a `RandomSampler`
    data loader that is iterated across steps: Booster). `fresh`: an independent random batch each
    time (a new data-loader iterator each step: the official RepNoise trainer).
    """

    def __init__(self, rows: list[dict], batch_size: int, pad_token_id: int | None, seed: int,
                 mode: str = "cycle") -> None:
        if not rows:
            raise SinkguardError("the harmful set is empty")
        if batch_size < 1:
            raise SinkguardError(f"the harmful batch size must be >= 1, got {batch_size}")
        if mode not in ("cycle", "fresh"):
            raise ValueError(f"mode must be 'cycle' or 'fresh', not {mode!r}")
        self.rows, self.batch_size, self.seed, self.mode = rows, min(batch_size, len(rows)), seed, mode
        self._pad = PadCollator(pad_token_id if pad_token_id is not None else 0)

    def indices(self, draw: int) -> list[int]:
        """Row indices of the `draw`-th batch of the run (0-based)."""
        n, b = len(self.rows), self.batch_size
        if self.mode == "fresh":
            return random.Random(self.seed * 1_000_003 + draw).sample(range(n), b)
        out, orders = [], {}
        for k in range(draw * b, draw * b + b):
            epoch, pos = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = list(range(n))
                random.Random(self.seed * 7_919 + epoch).shuffle(orders[epoch])
            out.append(orders[epoch][pos])
        return out

    def batch(self, draw: int) -> dict[str, torch.Tensor]:
        """The padded `draw`-th batch (input_ids, attention_mask, labels) on the CPU."""
        return self._pad([self.rows[i] for i in self.indices(draw)])
