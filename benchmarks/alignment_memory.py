"""Peak memory and step time of every alignment defense's step on the same batch, as ratios to SFT.

On the bundled model with the official alignment LoRA (r 8, alpha 4, dropout 0.1), one batch of
refusal data (default 8 x 128 tokens), one process: every method gets a fresh model, one warm-up
step (T-Vaccine scores and draws its layers there; Adam state is created), timed steps, then one
step under a tensor-allocation tracker. Booster, RepNoise and Antibody draw their harmful batch
from fixed harmful rows of the same shape (batch x seq-len tokens, from the defense harmful set);
Antibody's refusal rows are those prompts with its refusal text (shorter). Memory is torch's tensor allocations seen by a dispatch
mode (every new storage made by an operator, freed when the storage dies), reported as the peak
increase over what was live before the step (weights, optimizer state); CPU runs only (no CUDA
counters needed). Usage: `python benchmarks/alignment_memory.py [--json] [--ablations]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sinkguard.data import PadCollator, alignment_dataset, defense_harmful_set, encode_example
from sinkguard.data.formatting import DEFAULT_SYSTEM_PROMPT
from sinkguard.defenses import available, get_defense
from sinkguard.errors import SinkguardError
from sinkguard.models import load_model, load_tokenizer
from sinkguard.train import lora_config, make_config

MB = 1024 * 1024


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created by operators while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._sizes.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._sizes:  # views, in-place results, known
                continue
            self._sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


ORDER = ("sft", "vaccine", "tvaccine", "booster", "repnoise", "antibody")


def fixed_rows(tokenizer, rows: list[dict], batch_size: int, seq_len: int, what: str) -> list[dict]:
    """`batch_size` examples of `rows` at least `seq_len` tokens long, cut to exactly `seq_len`."""
    chosen = []
    for row in rows:
        ex = encode_example(tokenizer, row["prompt"], row["response"], DEFAULT_SYSTEM_PROMPT, seq_len)
        if len(ex["input_ids"]) == seq_len and any(label != -100 for label in ex["labels"]):
            chosen.append({**ex, "prompt": row["prompt"]})
            if len(chosen) == batch_size:
                return chosen
    raise SinkguardError(f"only {len(chosen)} {what} examples reach {seq_len} tokens; lower --seq-len")


def fixed_batch(tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """`batch_size` refusal examples at least `seq_len` tokens long, cut to exactly `seq_len`."""
    rows = fixed_rows(tokenizer, alignment_dataset(2000), batch_size, seq_len, "refusal")
    return PadCollator(tokenizer.pad_token_id)([{k: r[k] for k in ("input_ids", "labels")} for r in rows])


def fixed_harmful(tokenizer, args, batch_size: int, seq_len: int) -> dict:
    """Harmful-set inputs of the benchmark's shape for the defenses that take a harmful set."""
    rows = fixed_rows(tokenizer, defense_harmful_set(None), batch_size, seq_len, "harmful")
    out = {"harmful_set": [{k: r[k] for k in ("input_ids", "labels")} for r in rows]}
    if hasattr(args, "refusal_text"):
        out["refusal_set"] = [encode_example(tokenizer, r["prompt"], args.refusal_text, DEFAULT_SYSTEM_PROMPT,
                                             seq_len) for r in rows]
    return out


def state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of weights, buffers and optimizer state (what is live before a step)."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def run_method(label: str, defense: str, model_name: str, tokenizer, batch, steps: int, seed: int,
               overrides: dict, workdir: str) -> dict:
    """Fresh LoRA model + trainer for `defense`; warm-up, timed and tracked alignment steps."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(model_name), lora_config(r=8, alpha=4, dropout=0.1))
    spec = get_defense(defense, "alignment")
    args = make_config(defense, "alignment", os.path.join(workdir, label), learning_rate=1e-3,
                       per_device_train_batch_size=len(batch["input_ids"]), max_steps=steps + 2,
                       warmup_steps=0, save_strategy="no", logging_steps=1, disable_tqdm=True,
                       seed=seed, **overrides)
    extra = spec.trainer_cls.defense_inputs(args, tokenizer, None)
    if "harmful_set" in extra and defense != "tvaccine":
        extra = fixed_harmful(tokenizer, args, len(batch["input_ids"]), batch["input_ids"].size(1))
    trainer = spec.trainer_cls(model=model, args=args, train_dataset=[{"input_ids": [0]}],
                               data_collator=PadCollator(tokenizer.pad_token_id),
                               processing_class=tokenizer, **extra)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
    trainer.current_gradient_accumulation_steps = 1
    wrapped = trainer.model

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.training_step(wrapped, dict(batch))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        wrapped.zero_grad(set_to_none=True)
        trainer.state.global_step += 1
        return time.perf_counter() - wall, time.process_time() - cpu

    first_wall, first_cpu = step()  # T-Vaccine scores and draws here; Adam state is created
    times = [step() for _ in range(steps)]
    before = state_bytes(wrapped, trainer.optimizer)
    with AllocationTracker() as tracker:
        step()
    out = {
        "method": label, "defense": defense, "peak_step_mb": round(tracker.peak / MB, 1),
        "state_mb": round(before / MB, 1), "step_s": round(sum(t[0] for t in times) / steps, 3),
        "step_cpu_s": round(sum(t[1] for t in times) / steps, 3),
        "first_step_s": round(first_wall, 3), "first_step_cpu_s": round(first_cpu, 3),
    }
    if defense == "tvaccine":
        out["active_layers"] = list(trainer.active_layers)
        out["checkpointed_layers"] = [i for i, layer in enumerate(trainer.layers())
                                      if layer.__dict__.get("gradient_checkpointing", False)]
        out["n_layers"] = len(trainer.layers())
        trainer.restore_model()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--seed", type=int, default=43)
    p.add_argument("--ablations", action="store_true",
                   help="also T-Vaccine without checkpointing and with exact (non-reentrant) checkpointing, "
                        "and RepNoise with every layer's logits kept (the official memory)")
    p.add_argument("--methods", default=",".join(ORDER),
                   help="comma-separated alignment defenses (sft is always measured: the baseline)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    try:
        tokenizer = load_tokenizer(a.model)
        batch = fixed_batch(tokenizer, a.batch_size, a.seq_len)
        names = ["sft"] + [m for m in a.methods.split(",") if m and m != "sft"]
        unknown = sorted(set(names) - set(available("alignment")))
        if unknown:
            raise SinkguardError(f"unknown alignment defense(s) {', '.join(unknown)}; "
                                 f"available: {', '.join(available('alignment'))}")
        methods = [(m, m, {"harmful_batch_size": a.batch_size} if m in ("booster", "antibody") else {})
                   for m in names]
        if a.ablations:
            if "tvaccine" in names:
                methods += [("tvaccine-no-ckpt", "tvaccine", {"checkpoint_unselected": False}),
                            ("tvaccine-exact-ckpt", "tvaccine", {"checkpoint_reentrant": False})]
            if "repnoise" in names:
                methods += [("repnoise-no-ckpt", "repnoise", {"lens_checkpoint": False})]
        with tempfile.TemporaryDirectory() as workdir:
            rows = []
            for label, d, o in methods:
                rows.append(run_method(label, d, a.model, tokenizer, batch, a.steps, a.seed, o, workdir))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive a crash
                gc.collect()  # the previous method's model and trainer go before the next loads
    except SinkguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref = {r["method"]: r for r in rows}
    vac = ref.get("vaccine")
    for r in rows:
        r["peak_vs_sft"] = round(r["peak_step_mb"] / ref["sft"]["peak_step_mb"], 3)
        r["cpu_time_vs_sft"] = round(r["step_cpu_s"] / ref["sft"]["step_cpu_s"], 3)
        if vac is not None:
            r["peak_vs_vaccine"] = round(r["peak_step_mb"] / vac["peak_step_mb"], 3)
            r["cpu_time_vs_vaccine"] = round(r["step_cpu_s"] / vac["step_cpu_s"], 3)
    result = {"model": a.model, "batch": [a.batch_size, a.seq_len], "threads": a.threads,
              "memory": "peak increase of live torch tensor storages during one step (dispatch-mode tracker)",
              "torch": torch.__version__, "rows": rows}
    if vac is not None and "tvaccine" in ref:
        result.update(target_tvaccine_peak_vs_vaccine=0.8, tvaccine_peak_vs_vaccine=ref["tvaccine"]["peak_vs_vaccine"])
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{a.model}, LoRA r=8 alpha=4, batch {a.batch_size} x {a.seq_len} tokens, {a.threads} thread(s); "
          "memory = peak extra tensor bytes during one step; time ratios from process CPU time")
    print(f"{'method':20s} {'peak MB':>8s} {'xSFT':>6s} {'xVaccine':>8s} {'wall s':>7s} {'CPU s':>7s} "
          f"{'xSFT':>6s} {'xVaccine':>8s} {'1st CPU s':>9s}")
    for r in rows:
        pv, tv = r.get("peak_vs_vaccine", float("nan")), r.get("cpu_time_vs_vaccine", float("nan"))
        print(f"{r['method']:20s} {r['peak_step_mb']:8.1f} {r['peak_vs_sft']:6.3f} {pv:8.3f} "
              f"{r['step_s']:7.2f} {r['step_cpu_s']:7.2f} {r['cpu_time_vs_sft']:6.3f} {tv:8.3f} "
              f"{r['first_step_cpu_s']:9.2f}")
    for r in rows:
        if "active_layers" in r:
            print(f"{r['method']}: active layers {r['active_layers']}; {len(r['checkpointed_layers'])} of "
                  f"{r['n_layers']} layers checkpointed {r['checkpointed_layers']}")
    if "tvaccine_peak_vs_vaccine" in result:
        ratio = result["tvaccine_peak_vs_vaccine"]
        print(f"T-Vaccine peak / Vaccine peak = {ratio:.3f} (target <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
